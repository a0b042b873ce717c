"""The text-conditioned U-Net of Imagen (arXiv 2205.11487), laid out as in the MinImagen article.

The conditioning is computed once per forward pass: a time vector, applied by scale-shift in every ResnetBlock, and
context tokens (time tokens + text tokens) read by cross-attention. Every attention goes through
F.scaled_dot_product_attention and honours the text padding mask.
"""
import math
from functools import partial
from typing import NamedTuple

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from einops import rearrange
from torch import nn

import registry

CROSS_EMBED_KERNELS = (3, 7, 15)  # kernel sizes of the first convolution (MinImagen CrossEmbedLayer)
FFT_MIN_KERNEL = 15  # on a CPU, kernels this large go through fft_conv2d (at 7, oneDNN is faster: docs/experiments.md)
FF_MULT = 2  # hidden width of a TransformerBlock's feed-forward layer, in multiples of its channels


class Conditioning(NamedTuple):
    """What the blocks read: the time vector and the cross-attention context with its mask."""
    time: torch.Tensor     # [b, time_cond_dim], already through the SiLU that opens every scale-shift MLP
    context: torch.Tensor  # [b, num_time_tokens + max_text_len, cond_dim]
    mask: torch.Tensor     # [b, 1, 1, num_time_tokens + max_text_len] bool, True = attend


def group_norm(channels):
    """GroupNorm with up to 8 groups, always a divisor of `channels`."""
    return nn.GroupNorm(math.gcd(8, channels), channels)


def downsample(dim_in, dim_out):
    """Halve the resolution: a 4x4 convolution with stride 2."""
    return nn.Conv2d(dim_in, dim_out, 4, stride=2, padding=1)


def upsample(dim_in, dim_out):
    """Double the resolution: nearest-neighbour upsampling then a 3x3 convolution."""
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(dim_in, dim_out, 3, padding=1))


def rechannel(dim_in, dim_out):
    """Change the channel count at the same resolution (a 3x3 convolution, or nothing when they already match)."""
    return nn.Identity() if dim_in == dim_out else nn.Conv2d(dim_in, dim_out, 3, padding=1)


def to_tokens(x):
    """Feature map [b, c, h, w] -> pixel tokens [b, h*w, c] (a view for channels_last input)."""
    return rearrange(x, "b c h w -> b (h w) c")


def to_image(tokens, height):
    """Pixel tokens [b, h*w, c] -> feature map [b, c, h, w] (a view with channels_last strides)."""
    return rearrange(tokens, "b (h w) c -> b c h w", h=height)


def coordinates(x):
    """x/y pixel coordinates in [-1, 1] for x [b, c, h, w] -> [b, 2, h, w] (CoordConv, Liu et al. 2018)."""
    b, _, h, w = x.shape
    ys, xs = (torch.linspace(-1, 1, n, device=x.device, dtype=x.dtype) for n in (h, w))
    return torch.stack(torch.meshgrid(ys, xs, indexing="ij")).expand(b, -1, -1, -1)  # [b, 2, h, w]


def doubled(tensor):
    """The batch stacked twice along dim 0 (None stays None)."""
    return None if tensor is None else torch.cat((tensor, tensor))


class SinusoidalEmbedding(nn.Module):
    """Transformer sinusoidal encoding of a time in [0, 1], scaled by 1000 so that the frequencies resolve it."""

    def __init__(self, dim):
        super().__init__()
        half = dim // 2
        self.register_buffer("freqs", torch.exp(-math.log(10_000) * torch.arange(half) / half), persistent=False)

    def forward(self, time):
        angles = 1000 * time.float()[:, None] * self.freqs  # [b, dim / 2]
        return torch.cat((angles.sin(), angles.cos()), dim=-1)  # [b, dim]


def time_mlp(dim, time_cond_dim):
    """Time in [0, 1] -> hidden state [b, time_cond_dim]: sinusoidal embedding, Linear, SiLU (MinImagen)."""
    return nn.Sequential(SinusoidalEmbedding(dim), nn.Linear(dim, time_cond_dim), nn.SiLU())


def text_neighbours(dim, kernel_size):
    """A zero-initialised convolution over the token axis [b, dim, n], added to the text tokens, or None for 1.

    Ours, not the papers': it lets each token carry its neighbours' words ("orange" learns it precedes "square"),
    so a region that attends to its colour's token also reads that colour's shape. Off (1) in the paper presets.
    """
    if kernel_size == 1:
        return None
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"text_kernel_size={kernel_size}; it must be odd and positive (1 = no mixing)")
    conv = nn.Conv1d(dim, dim, kernel_size, padding=kernel_size // 2)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


def fft_conv2d(x, conv):
    """conv(x) of a stride-1, same-padded conv through the FFT (convolution theorem): equal up to float rounding."""
    (h, w), k = x.shape[-2:], conv.kernel_size[0]
    size = [-(-(n + k - 1) // 16) * 16 for n in (h, w)]  # >= h + k - 1: no wrap-around; multiples of 16 are fast
    image, kernel = torch.fft.rfft2(x, s=size), torch.fft.rfft2(conv.weight.flip(-2, -1), s=size)  # conv2d correlates
    out = torch.fft.irfft2((image[:, None] * kernel).sum(2), s=size)  # [b, c_out, H, W]
    out = out[..., k // 2:k // 2 + h, k // 2:k // 2 + w] + conv.bias[:, None, None]  # [b, c_out, h, w]
    # conv2d's memory layout: a concatenation of mixed layouts would be copied by every conv that reads it
    last = conv.weight.is_contiguous(memory_format=torch.channels_last)
    return out.contiguous(memory_format=torch.channels_last if last else torch.contiguous_format)


class CrossEmbed(nn.Module):
    """First convolution: kernels 3, 7 and 15 in parallel, outputs concatenated (MinImagen CrossEmbedLayer)."""

    def __init__(self, dim_in, dim_out):
        super().__init__()
        widths = [dim_out // 2 ** (i + 1) for i in range(len(CROSS_EMBED_KERNELS) - 1)]  # halving per kernel size
        widths.append(dim_out - sum(widths))
        self.convs = nn.ModuleList(nn.Conv2d(dim_in, width, k, padding=k // 2)
                                   for k, width in zip(CROSS_EMBED_KERNELS, widths))

    def forward(self, x):  # on a CPU the 15x15 kernel goes through the FFT: ~5x faster than oneDNN's weight gradient
        fft = x.device.type == "cpu"
        return torch.cat([fft_conv2d(x, conv) if fft and conv.kernel_size[0] >= FFT_MIN_KERNEL else conv(x)
                          for conv in self.convs], dim=1)  # [b, dim_out, h, w]


class Attention(nn.Module):
    """Multi-head attention through SDPA: self-attention over x, or cross-attention to `context` when given."""

    def __init__(self, dim, heads, dim_head, context_dim=None):
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, heads * dim_head, bias=False)
        self.to_kv = nn.Linear(context_dim or dim, 2 * heads * dim_head, bias=False)
        self.to_out = nn.Linear(heads * dim_head, dim, bias=False)

    def forward(self, x, context=None, mask=None):
        x = self.norm(x)  # [b, n, dim]
        k, v = self.to_kv(x if context is None else context).chunk(2, dim=-1)  # [b, m, heads * dim_head] each
        q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=self.heads) for t in (self.to_q(x), k, v))
        with torch.autocast("cpu", enabled=False):  # fp32 on a CPU: its bf16 flash backward is ~4x slower (docs/)
            out = F.scaled_dot_product_attention(*(t.float() if t.is_cpu else t for t in (q, k, v)), attn_mask=mask)
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))  # [b, n, dim]


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, optional cross-attention between, time scale-shift before the second conv."""

    def __init__(self, dim_in, dim_out, *, time_cond_dim, heads, dim_head, cond_dim=None):
        super().__init__()
        self.block1 = nn.Sequential(group_norm(dim_in), nn.SiLU(), nn.Conv2d(dim_in, dim_out, 3, padding=1))
        self.cross_attn = Attention(dim_out, heads, dim_head, context_dim=cond_dim) if cond_dim else None
        self.to_scale_shift = nn.Linear(time_cond_dim, 2 * dim_out)
        self.norm2 = group_norm(dim_out)
        self.conv2 = nn.Conv2d(dim_out, dim_out, 3, padding=1)
        self.res_conv = nn.Conv2d(dim_in, dim_out, 1) if dim_in != dim_out else nn.Identity()

    def forward(self, x, cond):
        h = self.block1(x.float())  # [b, dim_out, h, w]; fp32 into GroupNorm as on CUDA (a CPU's bf16: 3x slower)
        if self.cross_attn is not None:
            h = h + to_image(self.cross_attn(to_tokens(h), cond.context, cond.mask), h.shape[2])
        scale, shift = rearrange(self.to_scale_shift(cond.time), "b (two c) -> two b c 1 1", two=2)
        h = self.norm2(h.float()) * (scale + 1) + shift  # [b, dim_out, h, w]
        return self.conv2(F.silu(h)) + self.res_conv(x)


class TransformerBlock(nn.Module):
    """Residual self-attention then a residual feed-forward layer over the pixels of a feature map."""

    def __init__(self, dim, heads, dim_head):
        super().__init__()
        self.attn = Attention(dim, heads, dim_head)
        self.ff = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, FF_MULT * dim), nn.GELU(),
                                nn.Linear(FF_MULT * dim, dim))

    def forward(self, x):
        tokens = to_tokens(x)  # [b, h*w, c]
        tokens = tokens + self.attn(tokens)
        return to_image(tokens + self.ff(tokens), x.shape[2])


class DownLevel(nn.Module):
    """Encoder level: [downsample], ResnetBlocks, [TransformerBlock], [downsample] -> (x, its N skips)."""

    def __init__(self, before, blocks, attn, after):
        super().__init__()
        self.before, self.blocks, self.attn, self.after = before, nn.ModuleList(blocks), attn, after

    def forward(self, x, cond):
        x, skips = self.blocks[0](self.before(x), cond), []
        for block in self.blocks[1:]:
            x = block(x, cond)
            skips.append(x)
        x = self.attn(x)
        return self.after(x), (*skips, x)


class UpLevel(nn.Module):
    """Decoder level: each ResnetBlock first concatenates a skip connection (the last first); optional
    TransformerBlock; upsample."""

    def __init__(self, blocks, attn, after, skip_scale):
        super().__init__()
        self.blocks, self.attn, self.after, self.skip_scale = nn.ModuleList(blocks), attn, after, skip_scale

    def forward(self, x, cond, *skips):
        for block, skip in zip(self.blocks, reversed(skips)):
            x = block(torch.cat((x, skip if self.skip_scale == 1 else skip * self.skip_scale), dim=1), cond)
        return self.after(self.attn(x))


def size_multiple(dim_mults, memory_efficient=False, **_):
    """What image sides must divide by: the U-Net halves them once per level (the efficient one at every level)."""
    return 2 ** (len(dim_mults) if memory_efficient else len(dim_mults) - 1)


class Unet(nn.Module):
    """Text-conditioned U-Net predicting the diffusion target for images [b, channels, h, w]."""

    def __init__(self, *, dim, dim_mults, text_embed_dim, channels=3, num_resnet_blocks=1, layer_attns=False,
                 layer_cross_attns=False, attn_heads=4, attn_dim_head=32, cond_dim=128, max_text_len=32,
                 num_time_tokens=2, lowres_cond=False, memory_efficient=False, coord_channels=False,
                 text_kernel_size=1):
        super().__init__()
        levels = len(dim_mults)
        blocks = registry.broadcast(num_resnet_blocks, levels, "num_resnet_blocks (one per level)")
        attns = registry.broadcast(layer_attns, levels, "layer_attns (one per level)")
        cross = registry.broadcast(layer_cross_attns, levels, "layer_cross_attns (one per level)")
        self.channels, self.text_embed_dim, self.lowres_cond = channels, text_embed_dim, lowres_cond
        self.max_text_len, self.num_time_tokens, self.coord_channels = max_text_len, num_time_tokens, coord_channels
        self.size_multiple = size_multiple(dim_mults, memory_efficient)
        time_cond_dim = 4 * dim

        # conditioning (MinImagen: to_time_hiddens, to_time_cond, to_time_tokens, text projection and pooling)
        self.time_mlp = time_mlp(dim, time_cond_dim)
        self.lowres_time_mlp = time_mlp(dim, time_cond_dim) if lowres_cond else None
        self.to_time_cond = nn.Linear(time_cond_dim, time_cond_dim)
        self.to_time_tokens = nn.Linear(time_cond_dim, num_time_tokens * cond_dim)
        self.text_to_cond = nn.Sequential(nn.Linear(text_embed_dim, cond_dim), nn.LayerNorm(cond_dim))  # Imagen §2.5
        self.text_neighbours = text_neighbours(cond_dim, text_kernel_size)
        self.to_pooled_cond = nn.Sequential(nn.Linear(cond_dim, time_cond_dim), nn.SiLU(),
                                            nn.Linear(time_cond_dim, time_cond_dim))
        self.null_text_tokens = nn.Parameter(torch.randn(max_text_len, cond_dim))
        self.null_pooled_cond = nn.Parameter(torch.randn(time_cond_dim))

        # body: encoder levels, the bottleneck, decoder levels
        resnet = partial(ResnetBlock, time_cond_dim=time_cond_dim, heads=attn_heads, dim_head=attn_dim_head)
        transformer = partial(TransformerBlock, heads=attn_heads, dim_head=attn_dim_head)
        self.init_conv = CrossEmbed(channels * (2 if lowres_cond else 1) + (2 if coord_channels else 0), dim)
        dims = [dim * m for m in dim_mults]
        self.downs, self.ups = nn.ModuleList(), nn.ModuleList()
        for i, (d_in, d_out) in enumerate(zip([dim, *dims[:-1]], dims)):
            width = d_out if memory_efficient else d_in  # efficient U-Net downsamples first (Imagen App. B.1)
            level_cond = cond_dim if cross[i] else None
            self.downs.append(DownLevel(
                before=downsample(d_in, d_out) if memory_efficient else nn.Identity(),
                blocks=[resnet(width, width, cond_dim=level_cond), *(resnet(width, width) for _ in range(blocks[i]))],
                attn=transformer(width) if attns[i] else nn.Identity(),
                after=nn.Identity() if memory_efficient else
                downsample(d_in, d_out) if i < levels - 1 else rechannel(d_in, d_out)))
            self.ups.insert(0, UpLevel(
                blocks=[resnet(d_out + width, d_out, cond_dim=level_cond),
                        *(resnet(d_out + width, d_out) for _ in range(blocks[i]))],
                attn=transformer(d_out) if attns[i] else nn.Identity(),
                after=upsample(d_out, d_in) if memory_efficient or i > 0 else rechannel(d_out, d_in),
                skip_scale=2 ** -0.5 if memory_efficient else 1.0))  # Imagen App. B.1: skips scaled by 1/sqrt(2)
        self.mid_block1 = resnet(dims[-1], dims[-1], cond_dim=cond_dim)
        self.mid_attn = transformer(dims[-1]) if attns[-1] else nn.Identity()
        self.mid_block2 = resnet(dims[-1], dims[-1], cond_dim=cond_dim)
        self.checkpointing = False  # activation checkpointing while training: see _run
        self.final_conv = nn.Conv2d(2 * dim, channels, 3, padding=1)  # reads the features and the first conv's
        nn.init.zeros_(self.final_conv.weight)  # the untrained U-Net predicts 0
        nn.init.zeros_(self.final_conv.bias)

    def forward(self, x, time, text_embeds, text_mask, *, lowres_img=None, lowres_noise_time=None, cond_drop_prob=0.0):
        """Output [b, c, h, w]; each sample's text is dropped with probability cond_drop_prob (classifier-free)."""
        b = x.shape[0]
        keep_text = (torch.rand(b, device=x.device) >= cond_drop_prob if cond_drop_prob > 0  # [b]
                     else torch.ones(b, dtype=torch.bool, device=x.device))
        return self._denoise(x, time, text_embeds, text_mask, keep_text, lowres_img, lowres_noise_time)

    def forward_with_cond_scale(self, x, time, text_embeds, text_mask, *, cond_scale=1.0, lowres_img=None,
                                lowres_noise_time=None):
        """Classifier-free guidance null + (cond - null) * cond_scale, both halves in one batch of 2b."""
        b = x.shape[0]
        if cond_scale == 1:
            return self(x, time, text_embeds, text_mask, lowres_img=lowres_img, lowres_noise_time=lowres_noise_time)
        keep_text = torch.arange(2 * b, device=x.device) < b  # [2b]: conditional half, then null half
        out = self._denoise(*map(doubled, (x, time, text_embeds, text_mask)), keep_text,
                            *map(doubled, (lowres_img, lowres_noise_time)))  # [2b, c, h, w]
        cond, null = out.chunk(2)
        return null + (cond - null) * cond_scale  # Ho & Salimans 2022, eq. 6

    def _denoise(self, x, time, text_embeds, text_mask, keep_text, lowres_img, lowres_noise_time):
        """The U-Net pass with text kept for samples where keep_text [b] is True."""
        self._check_inputs(x, text_embeds, lowres_img, lowres_noise_time)
        cond = self._condition(time, text_embeds, text_mask, keep_text, lowres_noise_time)
        if self.lowres_cond:
            x = torch.cat((x, lowres_img), dim=1)  # super-resolution: condition on the low-res image (Imagen §2.4)
        if self.coord_channels:  # absolute position, so "on the left" needs no inference from the zero padding
            x = torch.cat((x, coordinates(x)), dim=1)
        x = init = self.init_conv(x)  # [b, dim, h, w]
        skips = []
        for level in self.downs:
            x, level_skips = self._run(level, x, cond)
            skips += level_skips
        x = self._run(self._middle, x, cond)
        for level in self.ups:
            x = self._run(level, x, cond, *skips[-len(level.blocks):])
            del skips[-len(level.blocks):]
        # a full-resolution path to the output: an efficient U-Net has no block at full resolution
        return self.final_conv(torch.cat((x, init), dim=1))  # [b, channels, h, w]

    def _middle(self, x, cond):
        """The bottleneck: ResnetBlock, [TransformerBlock], ResnetBlock."""
        return self.mid_block2(self.mid_attn(self.mid_block1(x, cond)), cond)

    def _run(self, level, *inputs):
        """level(*inputs); while training with checkpointing on, its activations are recomputed in the backward pass
        instead of kept (Chen et al. 2016): less memory, one more forward pass of the levels."""
        if self.checkpointing and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(level, *inputs, use_reentrant=False)
        return level(*inputs)

    def _condition(self, time, text_embeds, text_mask, keep_text, lowres_noise_time):
        """The time vector and the context tokens (time tokens + text tokens) with their attention mask."""
        hiddens = self.time_mlp(time)  # [b, time_cond_dim]
        if self.lowres_cond:  # noise-conditioning augmentation level of the low-res image (Imagen App. E)
            hiddens = hiddens + self.lowres_time_mlp(lowres_noise_time)
        time_tokens = rearrange(self.to_time_tokens(hiddens), "b (r d) -> b r d", r=self.num_time_tokens)
        text_tokens, text_attend, pooled = self._text_condition(text_embeds, text_mask, keep_text)
        context = torch.cat((time_tokens, text_tokens), dim=1)  # [b, num_time_tokens + max_text_len, cond_dim]
        attend = F.pad(text_attend, (self.num_time_tokens, 0), value=True)  # time tokens are always attended
        time_cond = self.to_time_cond(hiddens) + pooled  # [b, time_cond_dim]
        return Conditioning(F.silu(time_cond), context, attend[:, None, None, :])

    def _text_condition(self, text_embeds, text_mask, keep_text):
        """Text tokens [b, max_text_len, cond_dim] (null where masked or dropped), where to attend, pooled text."""
        text_embeds, text_mask = text_embeds[:, :self.max_text_len], text_mask[:, :self.max_text_len]
        pad = self.max_text_len - text_embeds.shape[1]
        present = F.pad(text_mask, (0, pad), value=False)  # [b, max_text_len]: tokens, not padding
        tokens = F.pad(self.text_to_cond(text_embeds), (0, 0, 0, pad)) * present[..., None]  # [b, max_text_len, cond]
        if self.text_neighbours is not None:  # zeroed padding: nothing leaks into the real tokens' neighbours
            tokens = tokens + self.text_neighbours(tokens.transpose(1, 2)).transpose(1, 2)
        real = present & keep_text[:, None]  # [b, max_text_len]
        tokens = torch.where(real[..., None], tokens, self.null_text_tokens)  # learned null text (classifier-free)
        count = real.sum(dim=1, keepdim=True).clamp(min=1)  # [b, 1]
        pooled = self.to_pooled_cond((tokens * real[..., None]).sum(dim=1) / count)  # masked mean, [b, time_cond_dim]
        pooled = torch.where(keep_text[:, None], pooled, self.null_pooled_cond)
        attend = real | ~keep_text[:, None]  # kept samples: their real tokens; dropped samples: every null token
        return tokens, attend, pooled

    def _check_inputs(self, x, text_embeds, lowres_img, lowres_noise_time):
        """One-line ValueErrors for inputs this U-Net cannot take."""
        (c, h, w), m = x.shape[1:], self.size_multiple
        if c != self.channels:
            raise ValueError(f"image has {c} channels; this U-Net takes {self.channels}")
        if h % m or w % m:
            raise ValueError(f"image size {h}x{w} is not divisible by {m}; this U-Net needs sides that are multiples "
                             f"of {m}")
        if text_embeds.shape[-1] != self.text_embed_dim:
            raise ValueError(f"text embeddings are {text_embeds.shape[-1]} wide; this U-Net takes text_embed_dim="
                             f"{self.text_embed_dim}")
        if (lowres_img is not None, lowres_noise_time is not None) != (self.lowres_cond, self.lowres_cond):
            raise ValueError(f"lowres_img/lowres_noise_time given: {lowres_img is not None}/"
                             f"{lowres_noise_time is not None}; this U-Net (lowres_cond={self.lowres_cond}) needs "
                             f"{'both' if self.lowres_cond else 'neither'}")
        if lowres_img is not None and lowres_img.shape != x.shape:
            raise ValueError(f"lowres_img shape {tuple(lowres_img.shape)} differs from the image's "
                             f"{tuple(x.shape)}; resize it to the image size first")

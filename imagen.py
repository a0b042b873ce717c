"""The cascade: a chain of text-conditioned U-Nets, each with its own diffusion.

`Stage` is one U-Net plus its diffusion: its `forward` is the training loss (so DDP and torch.compile wrap it
whole). `Imagen` chains stages: a base model, then super-resolution models conditioned on the previous stage's
output (Imagen, arXiv 2205.11487 §2.4). Images are in [-1, 1] inside, [0, 1] at the edges.
"""
import ctypes
import dataclasses
import functools
import itertools
import json
import os
import pickle
import re

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

import data
import registry
from unet import Unet

# Per-stage settings merged under each stage's own (plain data, stored in every checkpoint).
STAGE_DEFAULTS = dict(
    family="ddpm",               # registry.FAMILIES: ddpm, or edm (Karras et al. 2022; schedule, timesteps unused)
    schedule="cosine", timesteps=1000, target="v", min_snr_gamma=5.0,  # Min-SNR-γ (arXiv 2303.09556)
    cond_drop_prob=0.1,          # classifier-free guidance training (Ho & Salimans 2022)
    lowres_aug_max=0.5,          # noise-conditioning augmentation levels drawn from [0, max] (Imagen App. E)
    crop=None,                   # super-resolution: train on random crops of this side (Imagen App. F), None = whole
)
# Sampling defaults (any command line overrides them; per-stage lists where stages differ): ancestral ddpm, 20 steps,
# as good as dpmpp-2m; static thresholding, as dynamic's division by s greys white backgrounds (docs/experiments.md)
SAMPLING_DEFAULTS = dict(sampler="ddpm", steps=20, cond_scale=3.0, lowres_noise=0.2, threshold="static",
                         threshold_p=0.995)


def resize(images, size):
    """Antialiased bilinear resize of [b, c, h, w] images to size x size, the same in training and sampling."""
    return images if images.shape[-1] == size else F.interpolate(images, size=(size, size), mode="bilinear",
                                                                 antialias=True, align_corners=False)


def random_crops(tensors, side):
    """The same random side x side window of every tensor [b, c, h, w], one window per sample, [b, c, side, side]."""
    (b, _, h, w), device = tensors[0].shape, tensors[0].device
    ys, xs = (torch.randint(n - side + 1, (b, 1), device=device) + torch.arange(side, device=device)
              for n in (h, w))  # [b, side] each: the rows and columns of each sample's window
    index = (torch.arange(b, device=device)[:, None, None], ys[:, :, None], xs[:, None, :])
    return [t.permute(0, 2, 3, 1)[index].permute(0, 3, 1, 2) for t in tensors]  # [b, c, side, side] each


class Stage(nn.Module):
    """One U-Net of the cascade with its diffusion; calling it returns the training loss."""

    def __init__(self, unet_kwargs, size, text_embed_dim, lowres_size=None, **settings):
        super().__init__()
        self.size, self.lowres_size = size, lowres_size
        self.settings = {**STAGE_DEFAULTS, **settings}
        self.unet = Unet(**unet_kwargs, text_embed_dim=text_embed_dim, lowres_cond=lowres_size is not None)
        self.family = registry.FAMILIES[self.settings["family"]]
        self.diffusion = self.family["make"](self.settings)

    def noised_lowres(self, images, level=None, generator=None):
        """The low-res condition: noised at `level` (a fraction of T), or at random levels for training."""
        b, d = images.shape[0], self.diffusion
        if level is None:  # noise-conditioning augmentation, one random level per sample (Imagen App. E)
            level = torch.rand(b, device=images.device) * self.settings["lowres_aug_max"]  # [b]
        t = d.time_for_noise_level(level, b, images.device)  # [b]
        noise = torch.randn(images.shape, generator=generator, device=images.device, dtype=images.dtype)
        return d.model_input(d.q_sample(images, t, noise), t), d.model_time(t)

    def forward(self, images, text_embeds, text_mask, layout_level=None):
        """Diffusion training loss for images [b, c, size, size] in [-1, 1] (Min-SNR or EDM weighted); with a
        layout_level, the x0 MSE at noise levels drawn from [layout_level, 1] only (train.py --layout-phase)."""
        d, s = self.diffusion, self.settings
        lowres = {}
        if self.lowres_size is not None:  # normalise -> down -> up -> noise, exactly as at sampling
            small = resize(resize(images, self.lowres_size), self.size)  # [b, c, size, size]
            if s["crop"]:  # the U-Net is convolutional: it samples whole images after training on crops
                images, small = random_crops((images, small), s["crop"])  # [b, c, crop, crop] each
            lowres["lowres_img"], lowres["lowres_noise_time"] = self.noised_lowres(small)
        b = images.shape[0]
        if layout_level is None:
            t = d.sample_times(b, images.device)  # [b]
            weight = d.loss_weight(t, s["target"], s["min_snr_gamma"])  # [b]
        else:  # where the layout is decided; Min-SNR weights these levels down to a few hundredths of an x0 MSE
            t = d.time_for_noise_level(layout_level + (1 - layout_level) * torch.rand(b, device=images.device), b,
                                       images.device)  # [b]
            weight = d.x0_loss_weight(t, s["target"])  # [b]
        noise = torch.randn_like(images, memory_format=torch.contiguous_format)  # 9x faster than into channels_last
        x_t = d.q_sample(images, t, noise)
        out = self.unet(d.model_input(x_t, t), d.model_time(t), text_embeds, text_mask,
                        cond_drop_prob=s["cond_drop_prob"], **lowres)
        target = d.training_target(images, noise, t, s["target"])
        mse = (out.float() - target).pow(2).mean(dim=(1, 2, 3))  # [b]
        return (mse * weight).mean()

    @torch.no_grad()
    def sample(self, text_embeds, text_mask, prev=None, *, sampler, steps, cond_scale, lowres_noise, threshold,
               generator=None, edit=None):
        """Images [b, c, size, size] in [-1, 1] from noise, conditioned on text and the previous stage's output;
        `edit` (a diffusion.Edit at this size, in [-1, 1]) starts from and/or keeps part of a given image."""
        b, d = text_embeds.shape[0], self.diffusion
        lowres = {}
        if self.lowres_size is not None:  # a larger given image goes down to lowres_size first, as in training
            small = resize(resize(prev, self.lowres_size), self.size)  # [b, c, size, size]
            lowres["lowres_img"], lowres["lowres_noise_time"] = self.noised_lowres(small, lowres_noise, generator)

        def denoise(x, t):
            return self.unet.forward_with_cond_scale(d.model_input(x, t), d.model_time(t), text_embeds, text_mask,
                                                     cond_scale=cond_scale, **lowres).float()

        shape = (b, self.unet.channels, self.size, self.size)
        x = d.prior_std * torch.randn(shape, device=text_embeds.device, generator=generator)
        return registry.SAMPLERS[sampler](denoise, x, d, steps, target=self.settings["target"],
                                          threshold=threshold, generator=generator, edit=edit)


def fixed_noise_loss(stage, images, text_embeds, text_mask):
    """A stage's training loss on uint8 images [b, 3, s, s] at its size, with every random draw (timesteps, noise,
    low-res augmentation, text drops) taken from one fixed seed: it changes only when the weights do, so checkpoints
    can be compared on held-out images (train.py logs it, eval.py --data prints it)."""
    images = resize(data.to_signed(images), stage.size)  # [b, 3, size, size]
    devices = [images.device] if images.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.manual_seed(data.HOLDOUT_SEED)
        return stage(images, text_embeds, text_mask).item()


def training_cost(config, k, batch_size, checkpointing=False):
    """{parameters, flops, bytes} of one training step of stage k at this batch size, counted on the meta device (no
    memory, no time): FLOPs of the forward and backward pass (torch.utils.flop_counter), and the memory training
    needs in fp32: weights, gradients, AdamW's two moments and the EMA (5 copies), plus the activations the
    backward pass keeps (saved-tensor hooks)."""
    from torch.utils.flop_counter import FlopCounterMode
    saved = []

    def keep(tensor):
        saved.append(tensor.numel() * tensor.element_size())
        return tensor
    with torch.device("meta"):
        stage = build_stages(config)[k].to("meta")  # the diffusion's coefficients are computed on the host
        stage.unet.checkpointing = checkpointing
        size, n, d = stage.size, config["max_text_len"], config["text_embed_dim"]
        inputs = torch.zeros(batch_size, 3, size, size), torch.zeros(batch_size, n, d), torch.ones(batch_size, n).bool()
        with FlopCounterMode(display=False) as counter:
            with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
                loss = stage(*inputs)
            loss.backward()
    parameters = sum(p.numel() for p in stage.parameters())
    return dict(parameters=parameters, flops=counter.get_total_flops(), bytes=5 * 4 * parameters + sum(saved))


def build_stages(config):
    """nn.ModuleList of Stages from a cascade config (the dict every checkpoint stores)."""
    stages, sizes = config["stages"], [s["size"] for s in config["stages"]]
    return nn.ModuleList(Stage(s["unet_kwargs"], s["size"], config["text_embed_dim"], sizes[k - 1] if k else None,
                               **{key: v for key, v in s.items() if key in STAGE_DEFAULTS})
                         for k, s in enumerate(stages))


class Imagen(nn.Module):
    """A cascade of Stages; `sample` runs the chain."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.stages = build_stages(config)

    def samplers(self):
        """The registered samplers that run on every stage."""
        refused = {name for stage in self.stages for name in stage.family["refuses"]}
        return [name for name in registry.SAMPLERS.names() if name not in refused]

    @torch.no_grad()
    def sample(self, text_embeds, text_mask, *, stop_at=None, start_at=0, start_images=None, generator=None,
               edit=None, **options):
        """Run stages [start_at, stop_at) on text embeddings [b, n, d]; images [b, c, s, s] in [0, 1].

        `options` override the config's sampling settings; sampler, steps and cond_scale may be per-stage lists.
        `edit`, a diffusion.Edit with its image in [0, 1] at any size, applies at stage start_at (resized to it);
        with a mask (keep) the later stages keep the image's pixels at their sizes too.
        """
        n = len(self.stages)
        stop_at = n if stop_at is None else stop_at
        if not 0 <= start_at < stop_at <= n:
            raise ValueError(f"stages [{start_at}, {stop_at}) out of range; this cascade has {n} U-Nets")
        if (start_at > 0) != (start_images is not None):
            raise ValueError(f"start_at={start_at} needs start_images exactly when it is above 0 (the low-res input)")
        opts = {**SAMPLING_DEFAULTS, **self.config.get("sampling", {}),
                **{k: v for k, v in options.items() if v is not None}}
        threshold = registry.THRESHOLDS[opts["threshold"]]
        if registry.THRESHOLDS.canonical(opts["threshold"]) == "dynamic":  # at its percentile (Imagen §2.3)
            threshold = functools.partial(threshold, p=opts["threshold_p"])
        steps, scales, samplers = (registry.broadcast(opts[key], n, f"{key} (one per U-Net)")
                                   for key in ("steps", "cond_scale", "sampler"))
        for k in range(start_at, stop_at):
            registry.check_sampler(samplers[k], self.stages[k].settings["family"], k)
        images = None if start_images is None else start_images * 2 - 1
        for k in range(start_at, stop_at):
            images = self.stages[k].sample(text_embeds, text_mask, images, sampler=samplers[k], steps=steps[k],
                                           cond_scale=scales[k], lowres_noise=opts["lowres_noise"],
                                           threshold=threshold, generator=generator,
                                           edit=stage_edit(edit, self.stages[k].size, k == start_at))
        return ((images + 1) / 2).clamp(0, 1)


def stage_edit(edit, size, first):
    """An Edit (image in [0, 1]) at one stage: resized, in [-1, 1]; after the first stage only with a mask, in full."""
    if edit is None or not (first or edit.keep is not None):
        return None
    keep = None if edit.keep is None else resize(edit.keep, size)  # [b, 1, size, size]
    return dataclasses.replace(edit, image=resize(edit.image * 2 - 1, size), keep=keep,
                               strength=edit.strength if first else 1.0)


def to_pil(image):
    """[3, h, w] in [0, 1] -> PIL RGB image."""
    return Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


def save_grid(images, path, nrow):
    """Tile images [n, 3, h, w] in [0, 1] into rows of `nrow` and save as PNG (2 px white gaps)."""
    n, _, h, w = images.shape
    rows = -(-n // nrow)
    grid = torch.ones(3, rows * (h + 2) - 2, nrow * (w + 2) - 2)
    for i, img in enumerate(images.float().cpu()):
        r, c = divmod(i, nrow)
        grid[:, r * (h + 2):r * (h + 2) + h, c * (w + 2):c * (w + 2) + w] = img
    to_pil(grid).save(path)


def reuse_freed_memory(device):
    """On a CPU, keep freed tensors' memory for the next step: glibc's malloc returns it to the OS and faults it back
    in page by page every step otherwise (docs/experiments.md; PyTorch's CPU tuning guide swaps allocators for it)."""
    if device.type == "cpu" and os.name == "posix" and hasattr(libc := ctypes.CDLL(None), "mallopt"):  # glibc, musl
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: blocks up to 32 MB (glibc's most) come from the heap ...
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: ... which keeps up to 1 GB free at its top


# ---- checkpoints: one self-describing file per U-Net, so stages can train as parallel jobs in one folder ----

def checkpoint_path(out_dir, k):
    return os.path.join(out_dir, f"unet{k}.pt")


def save_checkpoint(state, path, keep=0):
    """Write atomically; the previous checkpoint stays until the new one is complete and loadable. With keep > 0 it
    also stays on as unetK-stepNNNNNN.pt (not found as a stage), the newest `keep` of them."""
    def write_and_verify(tmp):
        torch.save(state, tmp)
        load_checkpoint(tmp, mmap=True)  # reads the archive's index: a short or corrupt write fails here

    if keep and os.path.exists(path):
        stem, ext = os.path.splitext(path)
        older = f"{stem}-step{load_checkpoint(path, mmap=True)['step']:06d}{ext}"
        if not os.path.exists(older):
            os.link(path, older)  # the same bytes under a second name: no copy
    data.write_atomically(path, write_and_verify)
    for older in older_checkpoints(path)[:-keep] if keep else []:
        os.remove(older)


def older_checkpoints(path):
    """The unetK-stepNNNNNN.pt files kept beside checkpoint `path`, oldest first."""
    folder, stem = os.path.dirname(path) or ".", os.path.splitext(os.path.basename(path))[0]
    pattern = re.compile(rf"{re.escape(stem)}-step(\d+)\.pt")
    steps = {int(m.group(1)): f for f in os.listdir(folder) if (m := pattern.fullmatch(f))}
    return [os.path.join(folder, steps[s]) for s in sorted(steps)]


def load_checkpoint(path, device="cpu", mmap=False):
    """Load a checkpoint dict without unpickling code (torch.load weights_only=True); mmap: tensors read lazily."""
    try:
        return torch.load(path, map_location=device, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        raise ValueError(f"refusing to load {path}: it is not a plain-data checkpoint ({first_line(e)})") from None
    except (RuntimeError, EOFError) as e:
        raise ValueError(f"cannot load {path}: it is truncated or not a torch.save checkpoint "
                         f"({first_line(e)})") from None


def require(state, path, keys):
    """A loaded checkpoint `state`, or a ValueError naming the first of `keys` that it lacks."""
    if missing := [key for key in keys if not isinstance(state, dict) or key not in state]:
        raise ValueError(f"{path} is not a nanoimagen checkpoint: it has no {missing[0]!r} entry")
    return state


def first_line(error):
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def find_checkpoints(ckpt):
    """{stage index: file} for a checkpoint folder, or for the folder of one checkpoint file, which stands in for its
    stage's unetK.pt (so an older unetK-stepNNNNNN.pt kept by --keep can be sampled)."""
    folder = ckpt if os.path.isdir(ckpt) else os.path.dirname(ckpt) or "."
    found = {int(m.group(1)): os.path.join(folder, f) for f in os.listdir(folder)
             if (m := re.fullmatch(r"unet(\d+)\.pt", f))}
    if m := re.fullmatch(r"unet(\d+)(-step\d+)?\.pt", os.path.basename(ckpt)):
        found[int(m.group(1))] = ckpt
    if not found:
        raise ValueError(f"no unetK.pt checkpoint in {folder!r}" + ("" if ckpt == folder else f" ({ckpt} is not one)"))
    return found


def stage_dependencies(config, k):
    """The part of a cascade config that stage k's weights depend on: the text encoder and stages 0..k."""
    return dict(encoder=config["encoder"], text_embed_dim=config["text_embed_dim"],
                max_text_len=config["max_text_len"], stages=config["stages"][:k + 1])


def first_difference(a, b, key=""):
    """(key, a's value, b's value) at the first place where nested dicts/lists a and b differ; None if equal."""
    if isinstance(a, dict) and isinstance(b, dict):
        children = [(f"{key}.{n}" if key else n, a.get(n), b.get(n)) for n in [*a, *(n for n in b if n not in a)]]
    elif isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):  # a tuple equals its JSON list
        if len(a) != len(b):
            return f"len({key})", len(a), len(b)
        children = [(f"{key}[{i}]", x, y) for i, (x, y) in enumerate(zip(a, b))]
    else:
        return None if a == b else (key, a, b)
    return next(filter(None, (first_difference(x, y, path) for path, x, y in children)), None)


def cascade_mismatch(old, new, k):
    """'' if stage k of config `old` fits cascade config `new`; else the first difference as 'key: old -> new'."""
    found = first_difference(stage_dependencies(old, k), stage_dependencies(new, k))
    return f"{found[0]}: {found[1]!r} -> {found[2]!r}" if found else ""


def load_trained(ckpt, ema):
    """(config, {stage: U-Net weights}, {stage: its steps and settings}) of a checkpoint folder/file."""
    files = find_checkpoints(ckpt)
    weights = "ema" if ema else "model"
    states = {k: require(load_checkpoint(f, mmap=True), f, ("config", weights)) for k, f in sorted(files.items())}
    config = states[min(states)]["config"]
    for k, state in states.items():  # e.g. --only-unet jobs of different commands writing into one folder
        mismatch = "stage missing" if k >= len(config["stages"]) else cascade_mismatch(state["config"], config, k)
        if mismatch:
            raise ValueError(f"{files[k]} was trained as U-Net {k} of a different cascade than {files[min(states)]} "
                             f"({mismatch})")
    history = {k: dict(steps=state.get("step"), settings=state.get("settings")) for k, state in states.items()}
    return config, {k: state[weights] for k, state in states.items()}, history


def read_safetensors(path):
    """{name: tensor} of a .safetensors file; a one-line ValueError where it is missing or unreadable."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        return load_file(path)
    except (SafetensorError, OSError) as e:
        raise ValueError(f"cannot load {path}: {first_line(e)}") from None


def export_folder(config, weights, folder, about):
    """Write weights {stage: U-Net weights} as unetK.safetensors and config.json: the cascade `config`, its sampling
    defaults and `about` (its "trained" list: each stage's steps and settings)."""
    from safetensors.torch import save_file
    os.makedirs(folder, exist_ok=True)
    for k, state in weights.items():
        save_file({name: t.contiguous() for name, t in state.items()}, os.path.join(folder, f"unet{k}.safetensors"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        sampling = {**SAMPLING_DEFAULTS, **config.get("sampling", {})}
        json.dump(dict(cascade=config, sampling=sampling, **about), f, indent=1)


def load_export_folder(folder):
    """(config, {stage: U-Net weights}, {stage: its steps and settings}) of a folder written by export_folder."""
    path = os.path.join(folder, "config.json")
    try:
        with open(path) as f:
            about = json.load(f)
        config, trained = dict(about["cascade"]), list(about["trained"])
    except (OSError, ValueError, KeyError, TypeError) as e:  # unreadable, not JSON, an entry missing or of a bad type
        raise ValueError(f"{path} is not a sample.py --export config ({type(e).__name__}: {first_line(e)})") from None
    weights = {k: read_safetensors(os.path.join(folder, f"unet{k}.safetensors")) for k in range(len(trained))}
    return config, weights, dict(enumerate(trained))


def download(hub_id):
    """The folder of a Hugging Face Hub model, downloaded once into the Hub's cache."""
    from huggingface_hub import snapshot_download
    try:
        return snapshot_download(hub_id)
    except (ValueError, OSError) as e:  # not a Hub id; no such model; offline and not in the cache
        raise ValueError(f"{hub_id!r}: no such file, folder or Hugging Face Hub model ({first_line(e)})") from None


def load_weights(ckpt, ema=True):
    """(config, {stage: U-Net weights}, {stage: its steps and settings}) of a training --out folder or unetK.pt, a
    sample.py --export folder (`ema` does not apply), else a Hub id."""
    if os.path.isfile(os.path.join(ckpt, "config.json")):
        return load_export_folder(ckpt)
    return load_trained(ckpt, ema) if os.path.exists(ckpt) else load_export_folder(download(ckpt))


def load_unet(unet, weights, what):
    """Load weights into a U-Net; a one-line ValueError naming `what` and the first tensor of another name or shape."""
    def shapes(state):
        return {name: str(list(t.shape)) for name, t in state.items()}  # strings: a shape is compared whole
    if found := first_difference(shapes(weights), shapes(unet.state_dict())):
        raise ValueError(f"{what} does not fit its U-Net ({found[0]}: {found[1]} -> {found[2]}, weights -> U-Net)")
    unet.load_state_dict(weights)


def leading_stages(weights):
    """How many stages from the base on have weights in {stage: U-Net weights} (a cascade samples only those)."""
    return next(k for k in itertools.count() if k not in weights)


def load_cascade(ckpt, device="cpu", ema=True):
    """(Imagen with trained weights, number of leading stages that have weights) of any load_weights source."""
    config, weights, _ = load_weights(ckpt, ema)
    imagen = Imagen(config).eval()
    for k, w in weights.items():
        load_unet(imagen.stages[k].unet, w, f"{ckpt} U-Net {k}")
    return imagen.to(device), leading_stages(weights)

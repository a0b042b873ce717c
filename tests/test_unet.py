"""Tests for unet.py: presets, shapes, gradients, text conditioning and masking, guidance, bad input."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

import registry
from unet import Unet, fft_conv2d

TEXT_DIM = 12
# BaseTest with self- and cross-attention at every level, so that every attention path is exercised.
ATTN_TEST = dict(registry.unet_kwargs("BaseTest"), layer_attns=True, layer_cross_attns=True)
MIX_TEST = dict(ATTN_TEST, text_kernel_size=3)  # ... and a convolution over neighbouring text tokens
SMALL_PRESETS = ["BaseTest", "SuperTest", "BaseSmall", "BaseTiny", "SuperSmall", MIX_TEST]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and then do not fight other processes for the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def preset_kwargs(preset):
    """A preset (name or dict) as the cascade builds it: Super* presets as super-resolution stages."""
    if isinstance(preset, dict):
        return preset
    return dict(registry.unet_kwargs(preset), lowres_cond=preset.startswith("Super"))


def make_unet(preset, seed=0):
    """A U-Net with a random (not zero) final conv, so that its output depends on everything before it."""
    torch.manual_seed(seed)
    unet = Unet(**preset_kwargs(preset), text_embed_dim=TEXT_DIM)
    torch.nn.init.normal_(unet.final_conv.weight, std=0.1)
    return unet


def make_inputs(unet, batch=2, size=8, text_len=5, seed=1):
    """Random (x, time, text_embeds, text_mask) and the low-res kwargs the U-Net needs; the first token is real."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, unet.channels, size, size, generator=g)
    text = torch.randn(batch, text_len, TEXT_DIM, generator=g)
    mask = torch.rand(batch, text_len, generator=g) > 0.3
    mask[:, 0] = True
    lowres = {}
    if unet.lowres_cond:
        lowres = dict(lowres_img=torch.randn(x.shape, generator=g), lowres_noise_time=torch.rand(batch, generator=g))
    return (x, torch.rand(batch, generator=g), text, mask), lowres


def test_every_preset_builds_and_reports_its_size():
    with torch.device("meta"):  # no memory, no init time
        rows = [(name, sum(p.numel() for p in Unet(**preset_kwargs(name), text_embed_dim=512).parameters()))
                for name in registry.UNETS.names()]
    print("\n" + "\n".join(f"{name:<12}{params:>15,}" for name, params in rows))
    sizes = dict(rows)
    assert set(sizes) == set(registry.UNETS.names())
    assert 1.5e9 < sizes["Base"] < 1.8e9  # ~1.6B with 512-d text, as in the references
    assert sizes["BaseTest"] < 1e5 and sizes["SuperTest"] < 1e5  # MinImagen's BaseTest built the 1.6B Base


def test_preset_names_are_case_and_separator_insensitive():
    assert registry.UNETS["base-test"] is registry.UNETS["BaseTest"] is registry.UNETS["basetest"]
    assert registry.UNETS["super_small"] is registry.UNETS["SuperSmall"]


@pytest.mark.parametrize("preset", SMALL_PRESETS)
def test_forward_backward_gives_finite_gradients_for_every_parameter(preset):
    unet = make_unet(preset)
    args, lowres = make_inputs(unet, size=16)
    out = unet.forward_with_cond_scale(*args, cond_scale=3.0, **lowres)  # both halves: every parameter takes part
    assert out.shape == args[0].shape
    out.square().mean().backward()
    for name, p in unet.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_untrained_unet_predicts_zero():
    unet = Unet(**registry.unet_kwargs("BaseTest"), text_embed_dim=TEXT_DIM)
    args, _ = make_inputs(unet)
    assert unet(*args).eq(0).all()


@pytest.mark.parametrize("preset", ["BaseTest", ATTN_TEST])
def test_dropped_text_is_ignored_and_kept_text_matters(preset):
    unet = make_unet(preset)
    (x, t, text, mask), _ = make_inputs(unet)
    other = torch.randn_like(text)
    dropped = [unet(x, t, tx, mask, cond_drop_prob=1.0) for tx in (text, other)]
    kept = [unet(x, t, tx, mask, cond_drop_prob=0.0) for tx in (text, other)]
    torch.testing.assert_close(dropped[0], dropped[1], rtol=0, atol=0)
    assert (kept[0] - kept[1]).abs().max() > 1e-4


@settings(max_examples=25, deadline=None)
@given(extra=st.integers(1, 20), real=st.integers(1, 8), mix=st.booleans())
def test_padding_tokens_do_not_change_the_output(extra, real, mix):
    unet = make_unet(MIX_TEST if mix else ATTN_TEST)  # max_text_len 16: with extra padding the text is also truncated
    if mix:
        torch.nn.init.normal_(unet.text_neighbours.weight, std=0.1)  # trained-like, so that padding could leak
    (x, t, _, _), _ = make_inputs(unet)
    text = torch.randn(2, real, TEXT_DIM)
    mask = torch.ones(2, real, dtype=torch.bool)
    padded_text = torch.cat((text, torch.randn(2, extra, TEXT_DIM)), dim=1)  # garbage under mask False
    padded_mask = torch.cat((mask, torch.zeros(2, extra, dtype=torch.bool)), dim=1)
    out = unet(x, t, text, mask)
    # attention over a longer masked sequence sums in another order; through the network's layers that rounding
    # grows to ~6 float32 ulps of the output's scale (seen: 1.3e-6 at scale 1.7), so allow 64
    tol = 64 * torch.finfo(torch.float32).eps * out.abs().max().item()
    torch.testing.assert_close(unet(x, t, padded_text, padded_mask), out, rtol=0, atol=tol)
    leaked = unet(x, t, padded_text, torch.ones_like(padded_mask))  # the padding mask dropped: garbage is attended
    assert (leaked - out).abs().max() > 100 * tol  # the tolerance is far below what a leaking mask changes (>4000x)


@settings(max_examples=25, deadline=None)
@given(c_in=st.integers(1, 6), c_out=st.integers(1, 5), k=st.sampled_from([1, 3, 7, 15]), h=st.integers(1, 40),
       w=st.integers(1, 40), layout=st.sampled_from([torch.contiguous_format, torch.channels_last]),
       seed=st.integers(0, 2**16))
def test_fft_convolution_equals_conv2d_and_its_gradients(c_in, c_out, k, h, w, layout, seed):
    torch.manual_seed(seed)  # a failing example replays exactly
    # float64: float32 FFTs round to ~1e-6 of the summed terms' scale, which a gradient's sum can cancel far below
    conv = torch.nn.Conv2d(c_in, c_out, k, padding=k // 2).double().to(memory_format=layout)
    x = torch.randn(3, c_in, h, w, dtype=torch.float64).to(memory_format=layout).requires_grad_()
    fft, reference = fft_conv2d(x, conv), conv(x)
    if conv.weight.is_contiguous() != conv.weight.is_contiguous(memory_format=torch.channels_last):  # unambiguous
        last = [y.is_contiguous(memory_format=torch.channels_last) for y in (fft, reference)]
        assert last[0] == last[1]  # the same memory layout: a mix of layouts makes the next conv copy its input

    def output_and_gradients(y):
        return y, *torch.autograd.grad(y.square().sum(), (x, conv.weight, conv.bias))

    for a, b in zip(output_and_gradients(fft), output_and_gradients(reference)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-9 * b.abs().max().item())  # a wrong crop or flip: O(1)


def test_text_neighbours_start_as_identity_and_mix_adjacent_tokens_only():
    mixing = make_unet(MIX_TEST)
    plain = Unet(**ATTN_TEST, text_embed_dim=TEXT_DIM)
    plain.load_state_dict({k: v for k, v in mixing.state_dict().items() if not k.startswith("text_neighbours")})
    args, _ = make_inputs(mixing)
    torch.testing.assert_close(mixing(*args), plain(*args), rtol=0, atol=0)  # zero-initialised: no change at first

    torch.nn.init.normal_(mixing.text_neighbours.weight, std=0.1)
    text = torch.randn(1, 6, TEXT_DIM)
    changed = text.clone()
    changed[:, 3] += 1  # change token 3 only
    keep, mask = torch.ones(1, dtype=torch.bool), torch.ones(1, 6, dtype=torch.bool)
    for unet, moved in ((plain, [3]), (mixing, [2, 3, 4])):  # kernel 3: token 3's neighbours see it too
        tokens, changed_tokens = (unet._text_condition(tx, mask, keep)[0] for tx in (text, changed))
        differs = (tokens - changed_tokens).abs().amax(dim=-1)[0] > 1e-6  # [max_text_len]
        assert differs.nonzero().flatten().tolist() == moved


def test_kept_text_masks_out_the_null_tokens_and_dropped_text_attends_them():
    unet = make_unet(ATTN_TEST)
    args, _ = make_inputs(unet)  # the mask has False entries and the text is shorter than max_text_len
    kept, dropped = unet(*args), unet(*args, cond_drop_prob=1.0)
    with torch.no_grad():
        unet.null_text_tokens.add_(torch.randn_like(unet.null_text_tokens))
    torch.testing.assert_close(unet(*args), kept, rtol=0, atol=1e-6)
    assert (unet(*args, cond_drop_prob=1.0) - dropped).abs().max() > 1e-4


@pytest.mark.parametrize("preset", ["BaseTest", "SuperTest"])
def test_batched_guidance_equals_the_two_pass_formula(preset):
    unet = make_unet(preset)
    args, lowres = make_inputs(unet, batch=3)
    scale = 4.0
    cond, null = (unet(*args, cond_drop_prob=p, **lowres) for p in (0.0, 1.0))
    guided = unet.forward_with_cond_scale(*args, cond_scale=scale, **lowres)
    torch.testing.assert_close(guided, null + (cond - null) * scale, rtol=0, atol=1e-5)
    torch.testing.assert_close(unet.forward_with_cond_scale(*args, cond_scale=1.0, **lowres), cond)


def test_super_resolution_output_depends_on_the_low_res_image():
    unet = make_unet("SuperTest")
    args, lowres = make_inputs(unet)
    other = dict(lowres, lowres_img=torch.randn_like(lowres["lowres_img"]))
    assert (unet(*args, **lowres) - unet(*args, **other)).abs().max() > 1e-4


def test_channels_last_and_bf16_autocast():
    unet = make_unet(ATTN_TEST)
    (x, *rest), _ = make_inputs(unet, size=16)
    reference = unet(x, *rest)
    x_cl = x.to(memory_format=torch.channels_last)
    torch.testing.assert_close(unet(x_cl, *rest), reference, rtol=1e-4, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        close = unet(x_cl, *rest)
        out = unet(x_cl, *rest, cond_drop_prob=0.5)
    assert (close.float() - reference).abs().max() < 0.05 * reference.abs().max()  # bf16's rounding, no more
    out.float().square().mean().backward()
    assert out.shape == x.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("change, expected", [
    (lambda x, text: (x[:, :2], text), "image has 2 channels; this U-Net takes 3"),
    (lambda x, text: (x[..., :6, :6], text), "image size 6x6 is not divisible by 4"),
    (lambda x, text: (x, text[..., :5]), "text embeddings are 5 wide; this U-Net takes text_embed_dim=12"),
])
def test_bad_input_gives_a_one_line_value_error(change, expected):
    unet = make_unet("SuperTest")  # efficient with 2 levels: sides must be multiples of 4
    (x, t, text, mask), lowres = make_inputs(unet)
    x, text = change(x, text)
    lowres["lowres_img"] = lowres["lowres_img"][:, :x.shape[1], :x.shape[2], :x.shape[3]]
    with pytest.raises(ValueError, match=expected) as error:
        unet(x, t, text, mask, **lowres)
    assert "\n" not in str(error.value)


def test_missing_or_unexpected_low_res_input_is_a_value_error():
    unet = make_unet("SuperTest")
    args, _ = make_inputs(unet)
    with pytest.raises(ValueError, match="lowres_cond=True.*needs both"):
        unet(*args)
    with pytest.raises(ValueError, match="lowres_cond=False.*needs neither"):
        make_unet("BaseTest")(*args, lowres_img=args[0], lowres_noise_time=args[1])


def test_bad_preset_values_are_value_errors():
    with pytest.raises(ValueError, match=r"unknown unet preset 'bsae'; choose from: BaseTest, SuperTest"):
        registry.UNETS["bsae"]
    with pytest.raises(ValueError, match=r"num_resnet_blocks .*got 3 values \[1, 2, 3\]; give 1 or 2"):
        Unet(**dict(registry.unet_kwargs("BaseTest"), num_resnet_blocks=(1, 2, 3)), text_embed_dim=TEXT_DIM)
    with pytest.raises(ValueError, match=r"text_kernel_size=4; it must be odd and positive"):
        Unet(**dict(registry.unet_kwargs("BaseTest"), text_kernel_size=4), text_embed_dim=TEXT_DIM)

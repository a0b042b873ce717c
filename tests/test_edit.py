"""Editing a given image: SDEdit's start (--init-image, --strength), RePaint's kept pixels (--inpaint, --mask,
--resample) and super-resolving a given image (--start-at-unet, --image), in every sampler of both families."""
import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st
from PIL import Image

import imagen
from conftest import FAST, FEW, assert_within, never_called, randn, seeds, text
from diffusion import EDM, Diffusion, Edit, _jump_back, cosine_betas
from test_cli import run
from test_diffusion import SAMPLER_VARIANTS, oracle
from test_edm import EDM_SAMPLERS, edm_oracle

# (family, sampler): every registered sampler on each family it runs on, and the variants of the other tests
CASES = [("ddpm", name) for name in SAMPLER_VARIANTS] + [("edm", name) for name in EDM_SAMPLERS]
ONE_CALL_PER_STEP = [case for case in CASES if not case[1].startswith("heun")]
image_shapes = st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 5), st.integers(1, 5))  # [b, c, h, w]


def setup(family):
    """(diffusion, target, oracle maker, sampler table, std of x at the first level) of a family."""
    if family == "ddpm":
        diffusion = Diffusion(cosine_betas(100))
        return diffusion, "v", lambda x0: oracle(diffusion, x0, "v"), SAMPLER_VARIANTS, 1.0
    edm = EDM()
    return edm, "edm", lambda x0: edm_oracle(edm, x0), EDM_SAMPLERS, 80.0


def sample(case, denoise, shape, seed, steps, edit):
    diffusion, target, _, samplers, prior_std = setup(case[0])
    return samplers[case[1]](denoise, prior_std * randn(shape, seed), diffusion, steps, target=target, edit=edit,
                             generator=torch.Generator().manual_seed(seed))


def random_edit(shape, seed, strength=1.0, resample=1):
    """An Edit of a random image with a random mask (per sample or shared), both from seed."""
    generator = torch.Generator().manual_seed(seed)
    image = torch.rand(shape, generator=generator) * 2 - 1
    mask_batch = shape[0] if seed % 2 else 1
    keep = (torch.rand((mask_batch, 1, *shape[2:]), generator=generator) < 0.5).float()
    return Edit(image, strength, keep, resample)


@pytest.mark.parametrize("case", CASES)
@FEW
@given(shape=image_shapes, seed=seeds, steps=st.integers(1, 8), strength=st.floats(0, 1), resample=st.integers(1, 3))
def test_inpainting_ends_with_the_kept_pixels_of_the_image_exactly(case, shape, seed, steps, strength, resample):
    edit = random_edit(shape, seed, strength, resample)
    out = sample(case, lambda x, t: torch.tanh(x), shape, seed, steps, edit)  # any model, even a wrong one
    keep = edit.keep.expand(shape).bool()
    assert out.shape == shape and torch.isfinite(out).all() and torch.equal(out[keep], edit.image[keep])


@pytest.mark.parametrize("case", CASES)
@FEW
@given(shape=image_shapes, seed=seeds, steps=st.integers(1, 8), resample=st.integers(1, 3))
def test_inpainting_with_an_oracle_fills_the_unknown_pixels_with_the_truth(case, shape, seed, steps, resample):
    truth = torch.rand(shape, generator=torch.Generator().manual_seed(seed + 1)) * 1.8 - 0.9
    edit = random_edit(shape, seed, resample=resample)
    keep = edit.keep.expand(shape)
    edit = Edit(keep * truth + (1 - keep) * 5.0, keep=edit.keep, resample=resample)  # the hole holds nonsense
    out = sample(case, setup(case[0])[2](truth), shape, seed, steps, edit)
    assert_within(out, truth, 1e-4)


@pytest.mark.parametrize("case", CASES)
@FAST
@given(shape=image_shapes, seed=seeds, steps=st.integers(1, 8))
def test_strength_0_returns_the_input_without_running_the_model(case, shape, seed, steps):
    image = torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    assert torch.equal(sample(case, never_called, shape, seed, steps, Edit(image, strength=0.0)), image)
    edit = random_edit(shape, seed, strength=0.0)
    assert torch.equal(sample(case, never_called, shape, seed, steps, edit), edit.image)


@pytest.mark.parametrize("case", ONE_CALL_PER_STEP)
@FAST
@given(seed=seeds, steps=st.integers(1, 12), strength=st.floats(0, 1), resample=st.integers(1, 3))
def test_strength_runs_the_chains_last_steps_and_resample_repeats_each_but_the_last(case, seed, steps, strength,
                                                                                     resample):
    diffusion = setup(case[0])[0]
    calls = []

    def denoise(x, t):
        calls.append(t[0].item())
        return torch.sin(x)

    sample(case, denoise, (2, 1, 3, 3), seed, steps, random_edit((2, 1, 3, 3), seed, strength, resample))
    times = diffusion.sampling_times(steps)[steps - round(strength * steps):]
    assert calls == pytest.approx([t for t in times[:-1] for _ in range(resample)] + times[-1:])


@pytest.mark.parametrize("family", ["ddpm", "edm"])
@FEW
@given(seed=seeds, data=st.data())
def test_jump_back_keeps_the_forward_marginal(family, seed, data):
    diffusion, *_ = setup(family)
    steps = data.draw(st.integers(2, 30))
    i = data.draw(st.integers(0, steps - 2))
    alpha, sigma = diffusion.alphas_sigmas(diffusion.sampling_times(steps))
    x0 = torch.linspace(-1, 1, 5)[:, None]  # [5, 1]: five data points, 20,000 draws each
    x = alpha[i + 1] * x0 + sigma[i + 1] * randn((5, 20_000), seed)
    back = _jump_back(x, alpha, sigma, i, torch.Generator().manual_seed(seed + 1))
    assert_within(back.mean(1, keepdim=True), alpha[i] * x0, 0.03 * sigma[i] + 1e-6)
    assert_within(back.std(1), sigma[i].expand(5), 0.03 * sigma[i] + 1e-6)


@pytest.mark.parametrize("kwargs, message", [
    (dict(strength=1.5), "strength 1.5 must be in \\[0, 1\\]"),
    (dict(strength=-0.1), "strength -0.1"),
    (dict(resample=0), "resample 0 must be an integer >= 1"),
    (dict(resample=2), "resample 2 .* needs a mask"),
])
def test_bad_edits_are_refused_naming_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Edit(torch.zeros(1, 1, 2, 2), **kwargs)


# Through the cascade.

def test_cascade_inpainting_keeps_the_pixels_at_the_final_size_and_strength_0_returns_the_image(cascade):
    emb, mask = text(2)
    image = torch.rand(1, 3, 32, 32)
    keep = torch.zeros(1, 1, 32, 32)
    keep[..., :, :16] = 1  # keep the left half, paint the right
    out = cascade.sample(emb, mask, edit=Edit(image, keep=keep, resample=2), steps=3,
                         generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 3, 32, 32)
    assert_within(out[..., :16], image[..., :16].expand(2, -1, -1, -1), 1e-6)
    assert not torch.allclose(out[..., 16:], image[..., 16:].expand(2, -1, -1, -1), atol=0.05)
    same = cascade.sample(emb, mask, stop_at=1, edit=Edit(image, strength=0.0), steps=3)
    assert_within(same, imagen.resize(image, 16).clamp(0, 1).expand(2, -1, -1, -1), 1e-6)
    for sampler in ("ddim", "dpmpp-2m"):  # SDEdit through the base, the SR stage as usual
        out = cascade.sample(emb, mask, edit=Edit(image, strength=0.5), sampler=sampler, steps=4)
        assert out.shape == (2, 3, 32, 32)


def test_a_given_image_larger_than_the_low_res_input_goes_down_to_it_first(cascade):
    emb, mask = text(1)
    large = torch.rand(1, 3, 32, 32)
    outs = [cascade.sample(emb, mask, start_at=1, start_images=image, lowres_noise=0.0, steps=2,
                           generator=torch.Generator().manual_seed(0)) for image in (large, imagen.resize(large, 16))]
    assert torch.allclose(*outs, atol=1e-4)  # resize before or after the [0, 1] -> [-1, 1] map


# Through sample.py.

def write_png(path, array):
    Image.fromarray(array).save(path)
    return str(path)


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


def test_init_image_at_strength_0_returns_it(trained, tmp_path, cache_dir):
    image = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    proc = run("sample.py", "--ckpt", str(trained), "--prompt", "a red circle", "--stop-at-unet", "0",
               "--init-image", write_png(tmp_path / "in.png", image), "--strength", "0", "--steps", "3",
               "--out", str(tmp_path / "out"), "--cache-dir", cache_dir)
    assert np.array_equal(pixels(proc.stdout.split()[0]), image)
    proc = run("sample.py", "--ckpt", str(trained), "--prompt", "a red circle", "--init-image",
               str(tmp_path / "in.png"), "--sampler", "dpmpp-2m", "--steps", "4", "--out", str(tmp_path / "sdedit"),
               "--cache-dir", cache_dir)
    assert pixels(proc.stdout.split()[0]).shape == (32, 32, 3)


def test_inpaint_keeps_the_unmasked_pixels_of_the_image(trained, tmp_path, cache_dir):
    image = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    mask = np.zeros((32, 32), dtype=np.uint8)
    mask[8:24, 8:24] = 255  # paint the middle
    proc = run("sample.py", "--ckpt", str(trained), "--prompt", "a blue square", "--n-per-prompt", "2",
               "--inpaint", write_png(tmp_path / "in.png", image), "--mask", write_png(tmp_path / "m.png", mask),
               "--resample", "2", "--sampler", "ddim", "--steps", "3", "--out", str(tmp_path / "out"),
               "--cache-dir", cache_dir)
    for path in proc.stdout.split()[:2]:
        out = pixels(path)
        assert np.array_equal(out[mask == 0], image[mask == 0]) and not np.array_equal(out, image)


def test_start_at_unet_super_resolves_a_given_image(trained, tmp_path, cache_dir):
    image = np.random.default_rng(2).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    proc = run("sample.py", "--ckpt", str(trained), "--prompt", "a green triangle", "--start-at-unet", "1",
               "--image", write_png(tmp_path / "low.png", image), "--steps", "3", "--out", str(tmp_path / "out"),
               "--cache-dir", cache_dir)
    assert pixels(proc.stdout.split()[0]).shape == (32, 32, 3)


@pytest.mark.parametrize("args, needle", [
    (["--strength", "0.5"], "--strength 0.5 needs --init-image or --inpaint"),
    (["--init-image", "IMG", "--inpaint", "IMG", "--mask", "IMG"], "not both"),
    (["--inpaint", "IMG"], "--inpaint PATH and --mask PATH go together"),
    (["--mask", "IMG"], "--inpaint PATH and --mask PATH go together"),
    (["--init-image", "IMG", "--resample", "3"], "--resample 3 needs --inpaint and --mask"),
    (["--image", "IMG"], "--start-at-unet K and --image PATH go together"),
    (["--start-at-unet", "0", "--image", "IMG"], "--start-at-unet 0 out of range"),
    (["--start-at-unet", "1", "--image", "IMG", "--stop-at-unet", "0"], "--start-at-unet 1 out of range"),
    (["--init-image", "IMG", "--strength", "1.5"], "strength 1.5 must be in [0, 1]"),
    (["--inpaint", "IMG", "--mask", "IMG", "--resample", "0"], "resample 0 must be an integer >= 1"),
    (["--init-image", "/no/such.png"], "--init-image '/no/such.png': cannot read it as an image"),
    (["--init-image", "WIDE"], "is 24x16; give a square image"),
    (["--sampler", "heun"], "sampler 'heun' cannot run on U-Net 0 (ddpm diffusion)"),
    (["--sampler", "ddpm,heun"], "sampler 'heun' cannot run on U-Net 1 (ddpm diffusion)"),
    (["--steps", "2,2,2"], "--steps (one per U-Net): got 3 values"),
])
def test_bad_edit_flags_fail_with_one_line_error(trained, tmp_path, cache_dir, args, needle):
    square, wide = write_png(tmp_path / "sq.png", np.zeros((16, 16, 3), np.uint8)), str(tmp_path / "wide.png")
    write_png(wide, np.zeros((16, 24, 3), np.uint8))
    args = [{"IMG": square, "WIDE": wide}.get(a, a) for a in args]
    proc = run("sample.py", "--ckpt", str(trained), "--prompt", "x", "--steps", "2", "--out", str(tmp_path / "o"),
               "--cache-dir", cache_dir, *args, check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert needle in proc.stderr.strip().splitlines()[-1], proc.stderr

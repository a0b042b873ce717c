"""Properties of the EDM family (Karras et al. 2022, arXiv 2206.00364): preconditioning, σ distributions, samplers."""
import functools
import math

import pytest
import torch
from hypothesis import given, strategies as st

import imagen
import registry
from diffusion import EDM, Diffusion, karras_sigmas, no_threshold, sample_ddpm, sample_heun
from conftest import (FAST, FEW, assert_within, column, gaussian_x0, never_called, randn, random_cascade, seeds, shapes,
                      text, tiny_config)
from test_cli import TINY, run, train

sigmas = st.floats(-7, 5).map(math.exp)  # log-uniform over [1e-3, 150]
EDM_SAMPLERS = {**{name: registry.SAMPLERS[name] for name in registry.SAMPLERS.names()
                   if name not in registry.FAMILIES["edm"]["refuses"]},
                "heun-churn": functools.partial(sample_heun, s_churn=40.0)}


def edm_oracle(edm, x0):
    """The network output F whose denoiser D = c_skip x + c_out F is exactly x0, computed in float64."""
    def denoise(x, sigma):
        c_skip, c_out, _ = edm.preconditioning(sigma, x)
        return ((x0.double() - c_skip * x.double()) / c_out).float()
    return denoise


def gaussian_data_denoiser(edm, s):
    """F for the exact denoiser D(x; σ) = E[x0 | x] = s² / (s² + σ²) x of data ~ N(0, s²)."""
    def denoise(x, sigma):
        c_skip, c_out, _ = edm.preconditioning(sigma, x)
        x0 = gaussian_x0(x.double(), 1, column(sigma.double(), x), s)
        return ((x0 - c_skip * x.double()) / c_out).float()
    return denoise


@FAST
@given(sigmas, shapes, seeds)
def test_preconditioning_recovers_x0_and_eps_from_the_oracle_output_at_every_sigma(sigma, shape, seed):
    edm, x0, eps = EDM(), randn(shape, seed), randn(shape, seed + 1)
    sigma_batch = torch.full(shape[:1], sigma)  # [b]
    x = edm.q_sample(x0, sigma_batch, eps)
    output = edm.training_target(x0, eps, sigma_batch, "edm")
    x0_back, eps_back = edm.x0_eps_from_output(output, x, sigma_batch, "edm")
    magnitude = 1 + x0.abs() + eps.abs()
    assert_within(x0_back, x0, 1e-5 * magnitude)
    assert_within(eps_back, eps, 1e-5 * magnitude * (1 + 1 / sigma))
    assert_within(edm_oracle(edm, x0)(x, sigma_batch), output, 1e-4 * magnitude)


@FAST
@given(sigmas)
def test_preconditioning_is_table_1_and_gives_unit_variance_input_and_target(sigma):
    edm, sd = EDM(), 0.5
    sigma_batch = torch.tensor([sigma], dtype=torch.float64)
    c_skip, c_out, c_in = (c.item() for c in edm.preconditioning(sigma_batch, torch.zeros(1)))
    assert math.isclose(c_skip, sd ** 2 / (sigma ** 2 + sd ** 2), rel_tol=1e-12)
    assert math.isclose(c_out, sigma * sd / math.sqrt(sigma ** 2 + sd ** 2), rel_tol=1e-12)
    assert math.isclose(c_in, 1 / math.sqrt(sigma ** 2 + sd ** 2), rel_tol=1e-12)
    c_noise = edm.model_time(torch.tensor([sigma])).item()
    assert math.isclose(c_noise, math.log(max(sigma, 0.002)) / 4, rel_tol=1e-5, abs_tol=1e-6)  # σ_min below
    # for data of standard deviation σ_data the input and F's target have unit variance (EDM App. B.6)
    assert math.isclose(c_in ** 2 * (sd ** 2 + sigma ** 2), 1, rel_tol=1e-9)
    assert math.isclose(((1 - c_skip) ** 2 * sd ** 2 + c_skip ** 2 * sigma ** 2) / c_out ** 2, 1, rel_tol=1e-9)


def test_training_sigmas_are_log_normal_and_the_loss_is_unweighted():
    edm = EDM()
    sigma = edm.sample_times(200_000, "cpu", torch.Generator().manual_seed(0))
    assert abs(sigma.log().mean().item() + 1.2) < 0.01 and abs(sigma.log().std().item() - 1.2) < 0.01
    assert torch.equal(edm.loss_weight(sigma[:5], "edm", None), torch.ones(5))
    with pytest.raises(ValueError, match="min_snr_gamma 5.0 .* edm stage needs None"):
        edm.loss_weight(sigma[:5], "edm", 5.0)


@FAST
@given(st.floats(0.002, 80), st.integers(0, 2 ** 31 - 1))
def test_x0_loss_weight_turns_the_loss_on_f_into_the_x0_mse(sigma, seed):
    edm, g = EDM(), torch.Generator().manual_seed(seed)
    x0, eps, output = (torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64) for _ in range(3))
    sigmas = torch.full((2,), sigma, dtype=torch.float64)
    f_mse = (output - edm.training_target(x0, eps, sigmas, "edm")).pow(2).mean((1, 2, 3))  # [2]
    x0_hat = edm.x0_eps_from_output(output, edm.q_sample(x0, sigmas, eps), sigmas, "edm")[0]
    x0_mse = (x0_hat - x0).pow(2).mean((1, 2, 3))
    assert torch.allclose(f_mse * edm.x0_loss_weight(sigmas, "edm").double(), x0_mse, rtol=1e-4)


@FAST
@given(st.integers(1, 300))
def test_karras_sigmas_run_from_sigma_max_to_sigma_min_evenly_in_the_rho_th_root(steps):
    levels = torch.tensor(karras_sigmas(steps, 0.002, 80.0, 7.0), dtype=torch.float64)
    assert len(levels) == steps and math.isclose(levels[0].item(), 80.0, rel_tol=1e-12)
    if steps > 1:
        assert math.isclose(levels[-1].item(), 0.002, rel_tol=1e-9) and (levels[1:] < levels[:-1]).all()
        gaps = levels.pow(1 / 7).diff()
        assert torch.allclose(gaps, gaps[0].expand_as(gaps), rtol=1e-9, atol=0)


@FAST
@given(st.floats(0, 1))
def test_low_res_noise_levels_map_to_the_sigma_of_the_cosine_schedules_snr(level):
    sigma = EDM().time_for_noise_level(level, 2, "cpu")
    assert sigma.shape == (2,) and sigma[0] == sigma[1] and 0 <= sigma[0] <= 80
    if level < 0.99:  # below the σ_max cap: α² = cos²(π/2 level) = 1 / (1 + σ²)
        alpha_squared = math.cos(math.pi / 2 * level) ** 2
        assert math.isclose(1 / (1 + sigma[0].item() ** 2), alpha_squared, rel_tol=1e-4, abs_tol=1e-7)
    assert EDM().time_for_noise_level(0.0, 1, "cpu").item() == 0 and torch.isfinite(EDM().model_time(torch.zeros(1)))


@pytest.mark.parametrize("name", EDM_SAMPLERS)
@FEW
@given(shape=shapes, steps=st.integers(1, 20), seed=seeds)
def test_edm_samplers_recover_x0_from_an_oracle_denoiser(name, shape, steps, seed):
    edm = EDM()
    x0 = torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 1.8 - 0.9
    out = EDM_SAMPLERS[name](edm_oracle(edm, x0), 80 * randn(shape, seed + 1), edm, steps, target="edm",
                             generator=torch.Generator().manual_seed(seed))
    assert_within(out, x0, 1e-4)


def test_heun_follows_the_probability_flow_of_gaussian_data_sample_by_sample_to_second_order():
    """For data ~ N(0, s²) the ODE's exact solution is x(σ) = x(σ_max) sqrt(s² + σ²) / sqrt(s² + σ_max²)."""
    edm, s = EDM(), 0.5
    x = 80 * randn((2, 4096), 0)
    exact = x * s / math.sqrt(s ** 2 + 80 ** 2)
    errors = [(sample_heun(gaussian_data_denoiser(edm, s), x, edm, steps, target="edm", threshold=no_threshold)
               - exact).abs().max().item() for steps in (32, 64, 128)]
    assert errors[-1] < 3e-3 and errors[0] / errors[1] > 3.5 and errors[1] / errors[2] > 3.5  # halving h quarters it


@pytest.mark.parametrize("name, steps", [("heun", 64), ("heun-churn", 64), ("ddim", 200), ("dpmpp-2m", 64)])
def test_edm_samplers_draw_gaussian_data_with_the_right_spread(name, steps):
    edm = EDM()
    out = EDM_SAMPLERS[name](gaussian_data_denoiser(edm, 0.5), 80 * randn((2, 4096), 0), edm, steps, target="edm",
                             threshold=no_threshold, generator=torch.Generator().manual_seed(1))
    assert abs(out.std().item() - 0.5) < 0.02 and abs(out.mean().item()) < 0.02


@pytest.mark.parametrize("steps", [0, -1, 2.5])
@pytest.mark.parametrize("name", EDM_SAMPLERS)
def test_steps_below_1_is_an_error(name, steps):
    with pytest.raises(ValueError, match=f"steps must be an integer >= 1, got {steps}"):
        EDM_SAMPLERS[name](never_called, torch.zeros(1, 2), EDM(), steps, target="edm")


def test_each_family_refuses_the_other_familys_sampler_by_name():
    with pytest.raises(ValueError, match="sampler heun runs on EDM diffusions only, got Diffusion"):
        sample_heun(never_called, torch.zeros(1, 2), Diffusion(torch.full((10,), 0.1)), 5, target="eps")
    with pytest.raises(ValueError, match="sampler ddpm runs on Diffusion diffusions only, got EDM"):
        sample_ddpm(never_called, torch.zeros(1, 2), EDM(), 5, target="edm")
    with pytest.raises(ValueError, match="'v'.*choose from: edm"):
        EDM_SAMPLERS["heun"](never_called, torch.zeros(1, 2), EDM(), 5, target="v")


# The EDM family in the cascade.

def edm_cascade():
    return random_cascade(family="edm", target="edm", min_snr_gamma=None)


def test_edm_stages_have_a_finite_loss_with_gradients_and_sample_with_their_samplers():
    model = edm_cascade()
    for stage in model.stages:
        loss = stage(torch.rand(4, 3, stage.size, stage.size) * 2 - 1, *text(4))
        loss.backward()
        assert torch.isfinite(loss) and loss > 0 and stage.unet.final_conv.weight.grad.abs().sum() > 0
    assert model.samplers() == ["ddim", "dpmpp-2m", "heun"]
    for sampler in model.samplers():
        images = model.sample(*text(2), sampler=sampler, steps=2, generator=torch.Generator().manual_seed(0))
        assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()


def test_a_sampler_of_the_other_family_is_refused_naming_it_the_stage_and_why():
    with pytest.raises(ValueError, match="sampler 'ddpm' cannot run on U-Net 0 \\(edm diffusion\\): .*discrete"):
        edm_cascade().sample(*text(1), sampler="ddpm", steps=2)
    ddpm = imagen.Imagen(tiny_config())
    with pytest.raises(ValueError, match="sampler 'heun' cannot run on U-Net 1 \\(ddpm diffusion\\)"):
        ddpm.sample(*text(1), sampler=["ddpm", "heun"], steps=2)
    assert ddpm.samplers() == ["ddpm", "ddim", "dpmpp-2m"]


def test_old_stage_configs_without_a_family_are_ddpm_as_trained():
    stage = imagen.Imagen(tiny_config()).stages[0]
    assert "family" not in tiny_config()["stages"][0] and isinstance(stage.diffusion, Diffusion)
    assert stage.diffusion.num_timesteps == 50


# Through train.py and sample.py.

def test_train_family_edm_stores_it_and_samples_with_heun(tmp_path, cache_dir):
    train(tmp_path / "edm", cache_dir, "--family", "edm", "--steps", "2")
    stages = imagen.load_checkpoint(imagen.checkpoint_path(tmp_path / "edm", 1))["config"]["stages"]
    assert [(s["family"], s["target"], s["min_snr_gamma"]) for s in stages] == [("edm", "edm", None)] * 2
    proc = run("sample.py", "--ckpt", str(tmp_path / "edm"), "--prompt", "a red circle", "--steps", "2",
               "--out", str(tmp_path / "out"), "--cache-dir", cache_dir)
    assert len(proc.stdout.split()) == 2
    proc = run("sample.py", "--ckpt", str(tmp_path / "edm"), "--prompt", "x", "--sampler", "ddpm", "--steps", "2",
               "--out", str(tmp_path / "out"), "--cache-dir", cache_dir, check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "sampler 'ddpm' cannot run on U-Net 0 (edm diffusion)" in proc.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("args, needle", [
    (["--family", "vp"], "unknown diffusion family 'vp'"),
    (["--family", "edm", "--target", "v"], "--target 'v' for U-Net 0 (edm)"),
    (["--family", "ddpm,edm", "--target", "edm"], "--target 'edm' for U-Net 0 (ddpm)"),
])
def test_bad_family_flags_fail_with_one_line_error(tmp_path, args, needle):
    proc = run("train.py", *TINY, *args, "--out", str(tmp_path), check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert needle in proc.stderr.strip().splitlines()[-1], proc.stderr

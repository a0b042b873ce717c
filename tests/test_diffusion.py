"""Properties of diffusion.py: schedules, forward-process math, thresholds and samplers."""
import functools
import math

import pytest
import torch
from hypothesis import given, strategies as st

import registry
from conftest import FAST, FEW, assert_within, column, gaussian_x0, never_called, randn, seeds, shapes
from diffusion import (TARGETS, Diffusion, cosine_betas, dynamic_threshold, linear_betas, no_threshold,
                       sample_ddim, sample_ddpm, sample_dpmpp_2m, sampling_timesteps, static_threshold)

schedules = st.sampled_from(registry.SCHEDULES.names())
num_timesteps = st.integers(2, 2000)
targets = st.sampled_from(TARGETS)
SAMPLER_VARIANTS = {**{name: registry.SAMPLERS[name] for name in registry.SAMPLERS.names()
                       if name not in registry.FAMILIES["ddpm"]["refuses"]},  # the samplers of the ddpm family
                    "ddim-eta1": functools.partial(sample_ddim, eta=1.0)}


def make_diffusion(schedule, T):
    """A Diffusion over the named schedule with T steps."""
    return Diffusion(registry.SCHEDULES[schedule](T))


def random_times(diffusion, batch, seed):
    """Uniform training times [batch], reproducible from seed."""
    return diffusion.sample_times(batch, "cpu", torch.Generator().manual_seed(seed))


def oracle(diffusion, x0, target):
    """A denoiser that knows the data is exactly x0: returns the true eps / x0 / v for x_t, computed in float64."""
    alphas_cumprod = torch.cumprod(1 - diffusion.schedule, 0)  # [T] float64

    def denoise(x, t):
        alpha, sigma = column(alphas_cumprod[t].sqrt(), x), column((1 - alphas_cumprod[t]).sqrt(), x)
        eps = (x.double() - alpha * x0.double()) / sigma
        return {"eps": eps, "x0": x0.double(), "v": alpha * eps - sigma * x0.double()}[target].float()
    return denoise


# Schedules.

@FAST
@given(schedules, num_timesteps)
def test_betas_in_unit_interval_and_alphas_cumprod_strictly_decreasing(schedule, T):
    betas = registry.SCHEDULES[schedule](T)
    assert betas.dtype == torch.float64 and betas.shape == (T,)
    assert ((betas > 0) & (betas < 1)).all()
    diffusion = Diffusion(betas)
    assert diffusion.num_timesteps == T and diffusion.alphas_cumprod.dtype == torch.float32
    assert ((diffusion.betas > 0) & (diffusion.betas < 1)).all()
    alphas_cumprod = diffusion.alphas_cumprod
    assert ((alphas_cumprod > 0) & (alphas_cumprod < 1)).all() and (alphas_cumprod[1:] < alphas_cumprod[:-1]).all()


def test_linear_schedule_is_ddpm_at_1000_steps_and_scales_with_T():
    assert torch.allclose(linear_betas(1000)[[0, -1]], torch.tensor([1e-4, 0.02], dtype=torch.float64))
    assert torch.allclose(linear_betas(250)[[0, -1]], torch.tensor([4e-4, 0.08], dtype=torch.float64))


@FAST
@given(st.integers(2, 2000))
def test_cosine_alphas_cumprod_follow_the_cosine_until_clipped(T):
    f = lambda t: math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2  # Nichol & Dhariwal 2021, Eq. 17
    alphas_cumprod = torch.cumprod(1 - cosine_betas(T), 0)[:-1]  # the last beta is clipped at 0.999
    expected = torch.tensor([f(t + 1) / f(0) for t in range(T - 1)], dtype=torch.float64)
    assert torch.allclose(alphas_cumprod, expected, rtol=1e-9, atol=0)


# Forward process, conversions, posterior.

@FAST
@given(schedules, num_timesteps, shapes, seeds)
def test_conversions_round_trip(schedule, T, shape, seed):
    diffusion = make_diffusion(schedule, T)
    x0, eps, t = randn(shape, seed), randn(shape, seed + 1), random_times(diffusion, shape[0], seed)
    xt = diffusion.q_sample(x0, t, eps)
    alpha, sigma = column(diffusion.sqrt_alphas_cumprod[t], xt), column(diffusion.sqrt_one_minus_alphas_cumprod[t], xt)
    magnitude = 1 + xt.abs() + x0.abs() + eps.abs()
    tolerance = 1e-5 * magnitude * (1 / alpha + 1 / sigma)  # float32 error scaled by the conditioning
    assert_within(diffusion.x0_eps_from_output(eps, xt, t, "eps")[0], x0, tolerance)
    assert_within(diffusion.x0_eps_from_output(x0, xt, t, "x0")[1], eps, tolerance)
    x0_from_v, eps_from_v = diffusion.x0_eps_from_output(diffusion.training_target(x0, eps, t, "v"), xt, t, "v")
    assert_within(x0_from_v, x0, 1e-5 * magnitude)  # well conditioned: α² + σ² = 1
    assert_within(eps_from_v, eps, 1e-5 * magnitude)
    for target in TARGETS:
        output = diffusion.training_target(x0, eps, t, target)
        x0_back, eps_back = diffusion.x0_eps_from_output(output, xt, t, target)
        assert_within(x0_back, x0, tolerance)
        assert_within(eps_back, eps, tolerance)


@FAST
@given(schedules, num_timesteps, shapes, seeds)
def test_posterior_is_the_product_of_the_two_gaussians(schedule, T, shape, seed):
    betas = registry.SCHEDULES[schedule](T)  # float64
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    diffusion = Diffusion(betas)
    x0, xt, t = randn(shape, seed), randn(shape, seed + 1), random_times(diffusion, shape[0], seed)
    mean, var = diffusion.posterior(x0, xt, t)
    for i, ti in enumerate(t.tolist()):
        if ti == 0:  # q(x_{-1} | x0) is the data itself
            expected_mean, expected_var = x0[i].double(), 0.0
        else:  # N(x_t; sqrt(1 - β) x_{t-1}, β) · N(x_{t-1}; sqrt(ᾱ_{t-1}) x0, 1 - ᾱ_{t-1}), square completed
            beta, alpha_cumprod_prev = betas[ti], alphas_cumprod[ti - 1]
            expected_var = 1 / ((1 - beta) / beta + 1 / (1 - alpha_cumprod_prev))
            expected_mean = expected_var * ((1 - beta).sqrt() / beta * xt[i].double()
                                            + alpha_cumprod_prev.sqrt() / (1 - alpha_cumprod_prev) * x0[i].double())
        assert_within(mean[i].double(), expected_mean, 1e-5 * (1 + x0[i].abs() + xt[i].abs()))
        assert math.isclose(var[i].item(), expected_var, rel_tol=1e-5, abs_tol=1e-30)
    assert (diffusion.posterior_variance <= diffusion.betas).all()


@FAST
@given(schedules, num_timesteps, seeds)
def test_respaced_chain_keeps_the_marginals_and_every_time_is_the_same_chain(schedule, T, seed):
    diffusion = make_diffusion(schedule, T)
    subset = sorted(set(torch.randint(T, (5,), generator=torch.Generator().manual_seed(seed)).tolist()))
    assert torch.allclose(diffusion.respaced(subset).alphas_cumprod, diffusion.alphas_cumprod[subset], rtol=1e-5)
    same = diffusion.respaced(range(T))
    for name, buffer in diffusion.named_buffers():
        assert torch.allclose(getattr(same, name), buffer, rtol=1e-6, atol=0), name


@FAST
@given(schedules, num_timesteps, st.floats(0.5, 20), seeds)
def test_min_snr_weights_match_their_definitions(schedule, T, gamma, seed):
    diffusion = make_diffusion(schedule, T)
    t = torch.arange(T)
    alphas_cumprod = torch.cumprod(1 - diffusion.schedule, 0)
    snr = diffusion.snr(t)
    assert torch.allclose(snr.double(), alphas_cumprod / (1 - alphas_cumprod), rtol=1e-5, atol=0)
    eps_weight = diffusion.loss_weight(t, "eps", gamma)
    assert (eps_weight[snr <= gamma] == 1).all()
    assert torch.allclose(eps_weight[snr > gamma], gamma / snr[snr > gamma], rtol=1e-6)
    assert torch.allclose(diffusion.loss_weight(t, "x0", gamma), snr.clamp(max=gamma), rtol=1e-6)
    assert torch.allclose(diffusion.loss_weight(t, "v", gamma), snr.clamp(max=gamma) / (snr + 1), rtol=1e-6)
    for target in TARGETS:
        assert torch.equal(diffusion.loss_weight(t, target, None), torch.ones(T))


@FAST
@given(schedules, num_timesteps, targets, shapes, seeds)
def test_x0_loss_weight_turns_each_targets_mse_into_the_x0_mse(schedule, T, target, shape, seed):
    diffusion = make_diffusion(schedule, T)
    x0, eps, output = randn((2, *shape), seed), randn((2, *shape), seed + 1), randn((2, *shape), seed + 2)
    t = random_times(diffusion, 2, seed).clamp(max=T - 2)  # the last step of a clipped schedule has snr ~ 0
    xt = diffusion.q_sample(x0, t, eps)
    dims = tuple(range(1, x0.ndim))
    target_mse = (output - diffusion.training_target(x0, eps, t, target)).double().pow(2).mean(dims)  # [2]
    x0_mse = (diffusion.x0_eps_from_output(output, xt, t, target)[0] - x0).double().pow(2).mean(dims)  # [2]
    assert torch.allclose(target_mse * diffusion.x0_loss_weight(t, target), x0_mse, rtol=1e-3, atol=1e-6)


@FAST
@given(schedules, num_timesteps, st.integers(1, 8), seeds, st.floats(0, 1))
def test_times_noise_levels_and_model_time(schedule, T, batch, seed, level):
    diffusion = make_diffusion(schedule, T)
    t = random_times(diffusion, batch, seed)
    assert t.dtype == torch.long and t.shape == (batch,) and ((t >= 0) & (t < T)).all()
    assert torch.equal(t, random_times(diffusion, batch, seed))
    assert diffusion.time_for_noise_level(level, batch, "cpu").tolist() == [round(level * (T - 1))] * batch
    assert diffusion.time_for_noise_level(1.0, 1, "cpu").item() == T - 1
    assert diffusion.model_time(torch.tensor([0, T - 1])).tolist() == [0.0, 1.0]


# Thresholds.

@FAST
@given(shapes, seeds, st.floats(0.1, 10), st.floats(0.5, 1.0))
def test_dynamic_threshold_bounds_keeps_signs_and_order_and_is_per_sample(shape, seed, scale, p):
    x = randn(shape, seed) * scale
    out = dynamic_threshold(x, p)
    assert out.shape == x.shape and ((out >= -1) & (out <= 1)).all()
    assert torch.equal(out.sign(), x.sign())
    flat_x, flat_out = x.reshape(len(x), -1), out.reshape(len(x), -1)
    ordered = flat_out.gather(1, flat_x.argsort(dim=1))
    assert (ordered[:, 1:] >= ordered[:, :-1]).all()
    for i in range(len(x)):
        assert torch.equal(dynamic_threshold(x[i:i + 1], p), out[i:i + 1])
    inside = x / x.abs().max().clamp(min=1)
    assert torch.equal(dynamic_threshold(inside, p), inside)


def test_dynamic_threshold_divides_by_the_percentile_of_each_sample():
    x = torch.stack([torch.arange(1, 101) / 10, torch.arange(1, 101) / -200])  # [2, 100]
    s = 9.0 + 0.1 * (99 * 0.9 - 89)  # the 0.9-quantile of 0.1 ... 10.0, linearly interpolated
    expected = torch.stack([x[0].clamp(max=s) / s, x[1]])  # the second sample is already within [-1, 1]
    assert torch.allclose(dynamic_threshold(x, 0.9), expected, rtol=1e-6, atol=0)


@FAST
@given(shapes, seeds)
def test_static_threshold_clamps_and_no_threshold_is_identity(shape, seed):
    x = randn(shape, seed) * 3
    assert torch.equal(static_threshold(x), x.clamp(-1, 1))
    assert torch.equal(no_threshold(x), x)
    assert registry.THRESHOLDS["Dynamic"] is dynamic_threshold


# Samplers.

@FAST
@given(st.integers(1, 3000), st.data())
def test_sampling_timesteps_descend_evenly_from_T_minus_1_to_0(T, data):
    steps = data.draw(st.integers(1, T))
    timesteps = sampling_timesteps(T, steps)
    assert len(timesteps) == steps and timesteps[0] == T - 1
    assert all(a > b for a, b in zip(timesteps, timesteps[1:]))
    assert steps == 1 or timesteps[-1] == 0
    assert sampling_timesteps(T, T) == list(range(T - 1, -1, -1))


def test_sampling_timesteps_are_the_rounded_linspace():
    assert sampling_timesteps(1000, 10) == [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]
    assert sampling_timesteps(4, 3) == [3, 2, 0]
    assert sampling_timesteps(50, 1) == [49]


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("name", SAMPLER_VARIANTS)
@FEW
@given(schedule=schedules, T=st.integers(10, 300), shape=shapes, seed=seeds)
def test_samplers_recover_x0_from_an_oracle_denoiser(name, target, schedule, T, shape, seed):
    diffusion = make_diffusion(schedule, T)
    x0 = torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 1.8 - 0.9
    steps = T if name == "ddpm" else 10
    sampler, denoise = SAMPLER_VARIANTS[name], oracle(diffusion, x0, target)
    out = sampler(denoise, randn(shape, seed + 1), diffusion, steps, target=target,
                  generator=torch.Generator().manual_seed(seed))
    assert_within(out, x0, 1e-4)


@FAST
@given(st.sampled_from(list(SAMPLER_VARIANTS)), targets, schedules, st.integers(2, 200), shapes, seeds, st.data())
def test_samplers_work_for_each_target_on_random_shapes(name, target, schedule, T, shape, seed, data):
    diffusion = make_diffusion(schedule, T)
    steps = data.draw(st.integers(1, min(T, 12)))
    calls = []

    def denoise(x, t):
        assert x.shape == shape and t.dtype == torch.long and t.shape == shape[:1]
        calls.append(t[0].item())
        return torch.tanh(x) * (1 + diffusion.model_time(column(t, x)))

    x = randn(shape, seed)
    x_before = x.clone()
    generator = torch.Generator().manual_seed(seed)
    out = SAMPLER_VARIANTS[name](denoise, x, diffusion, steps, target=target, generator=generator)
    assert out.shape == shape and out.dtype == torch.float32 and ((out >= -1) & (out <= 1)).all()
    assert calls == sampling_timesteps(T, steps) and torch.equal(x, x_before)


@FAST
@given(targets, schedules, st.integers(2, 200), shapes, seeds, st.data())
def test_ddim_with_eta_1_is_the_respaced_ddpm(target, schedule, T, shape, seed, data):
    diffusion = make_diffusion(schedule, T)
    steps = data.draw(st.integers(1, min(T, 12)))
    denoise = lambda x, t: torch.sin(x) + diffusion.model_time(column(t, x))
    x = randn(shape, seed)
    ddpm, ddim = [sampler(denoise, x, diffusion, steps, target=target, generator=torch.Generator().manual_seed(seed))
                  for sampler in (sample_ddpm, SAMPLER_VARIANTS["ddim-eta1"])]
    assert torch.allclose(ddpm, ddim, rtol=2e-3, atol=2e-3)  # float32 cancellation in Eq. 12 at eta = 1


@pytest.mark.parametrize("name", SAMPLER_VARIANTS)
def test_same_seed_gives_bit_identical_samples(name):
    diffusion = make_diffusion("cosine", 50)
    denoise = lambda x, t: 0.5 * x + 0.1 * torch.sin(3 * x)

    def sample(seed):
        generator = torch.Generator().manual_seed(seed)
        x = torch.randn((2, 3, 4, 4), generator=generator)
        return SAMPLER_VARIANTS[name](denoise, x, diffusion, 20, target="eps", generator=generator)
    assert torch.equal(sample(0), sample(0))
    assert not torch.equal(sample(0), sample(1))


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_ddpm_with_all_steps_is_ho_et_al_algorithm_2(schedule):
    T = 50
    betas = registry.SCHEDULES[schedule](T)
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    diffusion = Diffusion(betas)
    denoise = lambda x, t: 0.3 * x + 0.2  # an eps prediction
    x = randn((3, 2, 4), 0)
    out = sample_ddpm(denoise, x, diffusion, T, target="eps", threshold=no_threshold,
                      generator=torch.Generator().manual_seed(1))
    generator = torch.Generator().manual_seed(1)
    expected = x.double()
    for t in range(T - 1, -1, -1):
        beta, alpha_cumprod = betas[t], alphas_cumprod[t]
        posterior_var = beta * (1 - alphas_cumprod[t - 1]) / (1 - alpha_cumprod) if t > 0 else 0.0
        eps = denoise(expected.float(), None).double()
        expected = (expected - beta / (1 - alpha_cumprod).sqrt() * eps) / (1 - beta).sqrt()
        expected = expected + math.sqrt(posterior_var) * torch.randn(x.shape, generator=generator).double()
    assert torch.allclose(out.double(), expected, rtol=1e-4, atol=1e-4)


FAST_SAMPLERS_STEPS = [("ddim", 100), ("ddim-eta1", 100), ("dpmpp-2m", 20)]


@pytest.mark.parametrize("name, steps, target", [("ddpm", 1000, "eps")] + [
    (name, steps, target) for name, steps in FAST_SAMPLERS_STEPS for target in TARGETS])
def test_samplers_draw_gaussian_data_with_the_right_spread(name, steps, target):
    """With the exact denoiser for data ~ N(0, 0.5²), samples have standard deviation 0.5."""
    diffusion = make_diffusion("cosine", 1000)
    alphas_cumprod = torch.cumprod(1 - diffusion.schedule, 0)

    def denoise(x, t):
        alpha, sigma = column(alphas_cumprod[t].sqrt(), x), column((1 - alphas_cumprod[t]).sqrt(), x)
        x0 = gaussian_x0(x, alpha, sigma, 0.5)
        return diffusion.training_target(x0.float(), ((x - alpha * x0) / sigma).float(), t, target)

    out = SAMPLER_VARIANTS[name](denoise, randn((2, 4096), 0), diffusion, steps, target=target,
                                 threshold=no_threshold, generator=torch.Generator().manual_seed(1))
    assert abs(out.std().item() - 0.5) < 0.02 and abs(out.mean().item()) < 0.02


# Bad input.

def test_unknown_schedule_or_sampler_names_the_allowed_ones():
    with pytest.raises(ValueError, match="linear, cosine"):
        registry.SCHEDULES["quadratic"]
    with pytest.raises(ValueError, match="ddpm, ddim, dpmpp-2m"):
        registry.SAMPLERS["euler"]
    assert registry.SCHEDULES["Cosine"] is cosine_betas and registry.SAMPLERS["DPMPP_2M"] is sample_dpmpp_2m


@pytest.mark.parametrize("T", [1, 0, -5, 2.5, "10"])
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_fewer_than_two_timesteps_is_an_error(schedule, T):
    with pytest.raises(ValueError, match="timesteps"):
        registry.SCHEDULES[schedule](T)


@pytest.mark.parametrize("betas", [[0.5, 1.5], [0.0, 0.1], [0.1, math.nan], [], [[0.1, 0.2]]])
def test_betas_outside_0_to_1_are_an_error(betas):
    with pytest.raises(ValueError, match="betas"):
        Diffusion(torch.tensor(betas, dtype=torch.float64))


@pytest.mark.parametrize("steps", [0, -1, 11, 2.5])
@pytest.mark.parametrize("name", SAMPLER_VARIANTS)
def test_steps_outside_1_to_T_is_an_error(name, steps):
    with pytest.raises(ValueError, match="steps"):
        SAMPLER_VARIANTS[name](never_called, torch.zeros(1, 2), make_diffusion("linear", 10), steps, target="eps")


def test_unknown_target_is_an_error():
    diffusion = make_diffusion("cosine", 10)
    x, t = torch.zeros(2, 3), torch.zeros(2, dtype=torch.long)
    for call in [lambda: diffusion.x0_eps_from_output(x, x, t, "noise"),
                 lambda: diffusion.training_target(x, x, t, "noise"),
                 lambda: diffusion.loss_weight(t, "noise", 5.0)]:
        with pytest.raises(ValueError, match="'noise'.*eps, x0, v"):
            call()
    for sampler in SAMPLER_VARIANTS.values():
        with pytest.raises(ValueError, match="'noise'.*eps, x0, v"):
            sampler(never_called, x, diffusion, 5, target="noise")


def test_noise_level_outside_unit_interval_is_an_error():
    with pytest.raises(ValueError, match="noise level"):
        make_diffusion("cosine", 10).time_for_noise_level(1.5, 2, "cpu")

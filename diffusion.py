"""The Gaussian diffusion process: noise schedules, the math of q(x_t | x0) and its posterior, and samplers.

Times are integers t in [0, T-1]; t = 0 is the least noisy step (alphas_cumprod[0] = 1 - betas[0]).
A model predicts one of TARGETS; every sampler turns its output into an x0 prediction, thresholds it
(Imagen §2.3) and visits `sampling_timesteps`: T-1 down to 0, evenly spaced, then lands on the clean image.
`EDM` is the other family (Karras et al. 2022): x = x0 + σ eps with a preconditioned network; its "times" are σ.
Samplers step between levels (α_i, σ_i) of x_i = α_i x0 + σ_i eps, so one driver, `_run`, serves both families and
an `Edit`: start from a given image (SDEdit) or keep part of it (RePaint).
"""
import math
from dataclasses import dataclass

import torch

TARGETS = ("eps", "x0", "v")


def _check_num_timesteps(T):
    if not isinstance(T, int) or T < 2:
        raise ValueError(f"number of timesteps must be an integer >= 2, got {T!r}")


def _check_target(target, allowed=TARGETS):
    if target not in allowed:
        raise ValueError(f"unknown prediction target {target!r}; choose from: {', '.join(allowed)}")


def linear_betas(T):
    """DDPM's linear betas 1e-4 -> 0.02 (Ho et al. 2020, §4), scaled by 1000/T as in MinImagen; float64 [T]."""
    _check_num_timesteps(T)
    scale = 1000 / T
    betas = torch.linspace(scale * 1e-4, scale * 0.02, T, dtype=torch.float64, device="cpu")
    return betas.clamp(max=0.999)  # < 1 for T <= 20


def cosine_betas(T):
    """Cosine schedule, s = 0.008, betas clipped at 0.999 (Nichol & Dhariwal 2021, Eq. 17); float64 [T]."""
    _check_num_timesteps(T)
    s = 0.008
    steps = torch.arange(T + 1, dtype=torch.float64, device="cpu")  # [T + 1]
    alphas_cumprod = torch.cos((steps / T + s) / (1 + s) * math.pi / 2) ** 2
    return (1 - alphas_cumprod[1:] / alphas_cumprod[:-1]).clamp(max=0.999)


def _column(values, x):
    """values [b] shaped to broadcast against x: [b, 1, ..., 1]."""
    return values.view(-1, *[1] * (x.ndim - 1))


def _precise(device):
    """float64 for the schedule's arithmetic; float32 on Apple's mps, which has no float64."""
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


def _noise_levels(level, batch, device):
    """Noise levels in [0, 1] (a float, or a tensor [batch] drawn in range) as _precise [batch]; a float outside is
    a ValueError (a tensor is not checked: that would wait for the device at every training step)."""
    if not torch.is_tensor(level) and not 0 <= level <= 1:
        raise ValueError(f"noise level must be in [0, 1], got {level}")
    return torch.as_tensor(level, dtype=_precise(device), device=device).expand(batch)  # [batch]


class Diffusion(torch.nn.Module):
    """Per-time coefficients of q(x_t | x0) and q(x_{t-1} | x_t, x0) (Ho et al. 2020, §2), computed in float64."""
    TARGETS = TARGETS
    prior_std = 1.0  # x_T ~ N(0, I)

    def __init__(self, betas):
        super().__init__()
        betas = torch.as_tensor(betas, dtype=torch.float64, device="cpu")  # [T], computed on the host
        if betas.ndim != 1 or len(betas) == 0 or not ((betas > 0) & (betas <= 1)).all():
            raise ValueError(f"betas must be a non-empty 1-D tensor with values in (0, 1], got {betas}")
        self.num_timesteps = len(betas)
        self.schedule = betas  # [T] float64, stays on the host: the exact source for respaced chains
        alphas_cumprod = torch.cumprod(1 - betas, 0)  # [T]
        alphas_cumprod_prev = torch.cat([betas.new_ones(1), alphas_cumprod[:-1]])  # [T]
        posterior_variance = betas * (1 - alphas_cumprod_prev) / (1 - alphas_cumprod)  # Ho et al. 2020, Eq. 7
        buffers = dict(betas=betas, alphas_cumprod=alphas_cumprod, sqrt_alphas_cumprod=alphas_cumprod.sqrt(),
                       sqrt_one_minus_alphas_cumprod=(1 - alphas_cumprod).sqrt(),
                       posterior_variance=posterior_variance,  # 0 at t = 0: the last step lands on x0
                       posterior_mean_coef1=alphas_cumprod_prev.sqrt() * betas / (1 - alphas_cumprod),  # Eq. 7
                       posterior_mean_coef2=(1 - betas).sqrt() * (1 - alphas_cumprod_prev) / (1 - alphas_cumprod))
        for name, value in buffers.items():
            self.register_buffer(name, value.float(), persistent=False)

    def _alpha_sigma(self, t, x):
        """α_t = sqrt(alphas_cumprod[t]) and σ_t = sqrt(1 - alphas_cumprod[t]), each [b, 1, ..., 1]."""
        return _column(self.sqrt_alphas_cumprod[t], x), _column(self.sqrt_one_minus_alphas_cumprod[t], x)

    def q_sample(self, x0, t, noise):
        """x_t = α_t x0 + σ_t eps (Ho et al. 2020, Eq. 4)."""
        alpha, sigma = self._alpha_sigma(t, x0)
        return alpha * x0 + sigma * noise

    def x0_eps_from_output(self, output, xt, t, target):
        """(x0, eps) implied by a model output that predicts `target`: q_sample inverted, and for v
        x0 = α_t x_t - σ_t v, eps = σ_t x_t + α_t v (Salimans & Ho 2022, App. D)."""
        _check_target(target)
        alpha, sigma = self._alpha_sigma(t, xt)
        if target == "eps":
            return (xt - sigma * output) / alpha, output
        if target == "x0":
            return output, (xt - alpha * output) / sigma
        return alpha * xt - sigma * output, sigma * xt + alpha * output

    def training_target(self, x0, eps, t, target):
        """What a model predicting `target` should output for x_t = q_sample(x0, t, eps); v = α_t eps - σ_t x0
        (Salimans & Ho 2022, §4)."""
        _check_target(target)
        if target == "v":
            alpha, sigma = self._alpha_sigma(t, x0)
            return alpha * eps - sigma * x0
        return eps if target == "eps" else x0

    def posterior(self, x0, xt, t):
        """Mean and variance of q(x_{t-1} | x_t, x0) (Ho et al. 2020, Eq. 6-7)."""
        mean = _column(self.posterior_mean_coef1[t], xt) * x0 + _column(self.posterior_mean_coef2[t], xt) * xt
        return mean, _column(self.posterior_variance[t], xt)

    def snr(self, t):
        """Signal-to-noise ratio alphas_cumprod / (1 - alphas_cumprod) at times t, [b]."""
        return (self.sqrt_alphas_cumprod[t] / self.sqrt_one_minus_alphas_cumprod[t]) ** 2

    def loss_weight(self, t, target, min_snr_gamma):
        """Min-SNR-γ loss weights for `target` (Hang et al. 2023, arXiv 2303.09556), [b]; ones if gamma is None."""
        _check_target(target)
        snr = self.snr(t)  # [b]
        if min_snr_gamma is None:
            return torch.ones_like(snr)
        clipped = snr.clamp(max=min_snr_gamma)  # [b]
        return {"eps": clipped / snr, "x0": clipped, "v": clipped / (snr + 1)}[target]

    def x0_loss_weight(self, t, target):
        """Weights [b] that turn the MSE on `target` into the MSE on x0 (Salimans & Ho 2022, §4)."""
        _check_target(target)
        snr = self.snr(t)  # [b]
        return {"eps": 1 / snr, "x0": torch.ones_like(snr), "v": 1 / (snr + 1)}[target]

    def sample_times(self, batch, device, generator=None):
        """Uniform random training times, LongTensor [batch]."""
        return torch.randint(self.num_timesteps, (batch,), device=device, generator=generator)

    def time_for_noise_level(self, level, batch, device):
        """The times round(level * (T-1)) for noise levels in [0, 1] (a float or a tensor [batch]), long [batch]."""
        return (_noise_levels(level, batch, device) * (self.num_timesteps - 1)).round().long()

    def model_time(self, t):
        """The time fed to the U-Net: t / (T-1) in [0, 1], float [b]."""
        return t.float() / (self.num_timesteps - 1)

    def model_input(self, xt, t):
        """What the U-Net sees of x_t: x_t itself."""
        return xt

    def sampling_times(self, steps):
        """The times a sampler visits: `sampling_timesteps`."""
        return sampling_timesteps(self.num_timesteps, steps)

    def alphas_sigmas(self, times):
        """α and σ at each sampling time, then (1, 0) for the clean image, each [steps + 1]."""
        alpha = torch.cat([self.sqrt_alphas_cumprod[times], self.betas.new_ones(1)])  # [steps + 1]
        sigma = torch.cat([self.sqrt_one_minus_alphas_cumprod[times], self.betas.new_zeros(1)])
        return alpha, sigma

    def respaced(self, timesteps):
        """The chain that visits only `timesteps`, its betas from alphas_cumprod ratios (Nichol & Dhariwal 2021, §4).
        A jump over a ratio below 1e-16 rounds its beta to 1; its posterior stays exact to float64 precision."""
        alphas_cumprod = torch.cumprod(1 - self.schedule, 0)[sorted(timesteps)]  # [steps]
        return Diffusion(1 - alphas_cumprod / torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]]))


class EDM(torch.nn.Module):
    """EDM's diffusion x = x0 + σ eps and its preconditioned denoiser (Karras et al. 2022, arXiv 2206.00364, Table 1).

    Its "times" are noise levels σ, float [b]; the network output F predicts target "edm": D = c_skip x + c_out F.
    """
    TARGETS = ("edm",)

    def __init__(self, sigma_data=0.5, sigma_min=0.002, sigma_max=80.0, rho=7.0, p_mean=-1.2, p_std=1.2):
        super().__init__()
        self.sigma_data, self.sigma_min, self.sigma_max, self.rho = sigma_data, sigma_min, sigma_max, rho
        self.p_mean, self.p_std = p_mean, p_std
        self.prior_std = sigma_max  # x at σ_max ~ N(0, σ_max² I) (Algorithm 2, line 2)

    def preconditioning(self, sigma, x):
        """c_skip, c_out, c_in (Table 1), each [b, 1, ..., 1]."""
        sigma, sd2 = _column(sigma.to(_precise(x.device)), x), self.sigma_data ** 2
        c_skip = sd2 / (sigma ** 2 + sd2)
        c_out = sigma * self.sigma_data / (sigma ** 2 + sd2).sqrt()
        c_in = 1 / (sigma ** 2 + sd2).sqrt()
        return c_skip, c_out, c_in

    def q_sample(self, x0, sigma, noise):
        """x = x0 + σ eps (EDM §2 with s(t) = 1, σ(t) = t)."""
        return x0 + _column(sigma, x0) * noise

    def model_input(self, x, sigma):
        """c_in x, the U-Net's input (Eq. 7)."""
        return (self.preconditioning(sigma, x)[2] * x).to(x.dtype)

    def model_time(self, sigma):
        """c_noise = ln(σ) / 4 (Table 1), float [b]; σ = 0 (a clean low-res condition) embeds as σ_min."""
        return sigma.float().clamp(min=self.sigma_min).log() / 4

    def x0_eps_from_output(self, output, x, sigma, target):
        """(x0, eps) from the network output F: D = c_skip x + c_out F (Eq. 7)."""
        _check_target(target, self.TARGETS)
        c_skip, c_out, _ = self.preconditioning(sigma, x)
        x0 = (c_skip * x + c_out * output).to(x.dtype)
        return x0, (x - x0) / _column(sigma, x)

    def training_target(self, x0, eps, sigma, target):
        """F's target (x0 - c_skip x) / c_out for x = x0 + σ eps (Eq. 8)."""
        _check_target(target, self.TARGETS)
        c_skip, c_out, _ = self.preconditioning(sigma, x0)
        return ((x0 - c_skip * self.q_sample(x0, sigma, eps)) / c_out).to(x0.dtype)

    def loss_weight(self, sigma, target, min_snr_gamma):
        """Ones: EDM's λ(σ) = 1 / c_out² makes the loss on F unweighted (Eq. 8, Table 1)."""
        _check_target(target, self.TARGETS)
        if min_snr_gamma is not None:
            raise ValueError(f"min_snr_gamma {min_snr_gamma!r} is a ddpm-family weighting; an edm stage needs None")
        return torch.ones_like(sigma, dtype=torch.float32)

    def x0_loss_weight(self, sigma, target):
        """Weights [b] that turn the MSE on F into the MSE on x0 = D: c_out² (Eq. 7)."""
        _check_target(target, self.TARGETS)
        return self.preconditioning(sigma, sigma)[1].float() ** 2  # [b]

    def sample_times(self, batch, device, generator=None):
        """Training σ with ln σ ~ N(P_mean, P_std²) (Table 1), float [batch]."""
        normal = torch.randn(batch, device=device, generator=generator)  # [batch]
        return (self.p_mean + self.p_std * normal).exp()

    def time_for_noise_level(self, level, batch, device):
        """σ = tan(π/2 level) for levels in [0, 1], capped at σ_max: the SNR of the cosine schedule at `level`."""
        # α² = cos²(π/2 level) = 1 / (1 + σ²) (Nichol & Dhariwal 2021, Eq. 17 with s = 0)
        return (_noise_levels(level, batch, device) * math.pi / 2).tan().clamp(max=self.sigma_max).float()

    def sampling_times(self, steps):
        """The levels a sampler visits: `karras_sigmas`."""
        return karras_sigmas(steps, self.sigma_min, self.sigma_max, self.rho)

    def alphas_sigmas(self, sigmas):
        """α = 1 and σ at each sampling level, then (1, 0) for the clean image, each [steps + 1]."""
        return torch.ones(len(sigmas) + 1), torch.tensor([*sigmas, 0.0])


def karras_sigmas(steps, sigma_min, sigma_max, rho):
    """`steps` levels σ_max -> σ_min evenly spaced in σ^(1/ρ) (Karras et al. 2022, Eq. 5); one step: σ_max."""
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)  # [steps]
    return ((sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho).tolist()


def dynamic_threshold(x0, p=0.995):
    """Per sample s = max(percentile_p |x0|, 1); clamp to [-s, s] and divide by s (Imagen §2.3)."""
    s = _column(torch.quantile(x0.reshape(len(x0), -1).abs(), p, dim=1).clamp(min=1), x0)  # [b, 1, ..., 1]
    return x0.clamp(-s, s) / s


def static_threshold(x0):
    """Clamp to [-1, 1] (Imagen §2.3)."""
    return x0.clamp(-1, 1)


def no_threshold(x0):
    """Leave the x0 prediction as it is."""
    return x0


def sampling_timesteps(T, steps):
    """`steps` times evenly spaced from T-1 down to 0, both included ("linspace"); one step is T-1 alone."""
    if not isinstance(steps, int) or not 1 <= steps <= T:
        raise ValueError(f"steps must be an integer in [1, {T}] (the number of timesteps), got {steps!r}")
    return torch.linspace(T - 1, 0, steps, dtype=torch.float64).round().long().tolist()


@dataclass(frozen=True)
class Edit:
    """A given image to start from and/or keep in part, applied by every sampler through `_run`."""
    image: torch.Tensor  # [b or 1, c, h, w] in [-1, 1]
    strength: float = 1.0  # SDEdit: run the last round(strength * steps) steps (Meng et al. 2022, arXiv 2108.01073)
    keep: torch.Tensor = None  # [b or 1, 1, h, w], 1 where the image is kept (RePaint, arXiv 2201.09865)
    resample: int = 1  # RePaint's U: each step runs U times, jumping back one step in between (Algorithm 1)

    def __post_init__(self):
        if not 0 <= self.strength <= 1:
            raise ValueError(f"strength {self.strength!r} must be in [0, 1] (the fraction of the chain to run)")
        if not isinstance(self.resample, int) or self.resample < 1:
            raise ValueError(f"resample {self.resample!r} must be an integer >= 1 (runs of each step)")
        if self.resample > 1 and self.keep is None:
            raise ValueError(f"resample {self.resample} jumps back to harmonise kept pixels; it needs a mask (keep)")

    def noised(self, x, alpha, sigma, generator):
        """The image at level (α, σ), shaped like x: α image + σ eps with fresh eps (Ho et al. 2020, Eq. 4)."""
        return alpha * self.image + sigma * _noise(x, generator)

    def keep_known(self, x, alpha, sigma, generator):
        """Kept pixels replaced by the image noised to x's level (RePaint, Eq. 8); x as it is without a mask."""
        return x if self.keep is None else self.keep * self.noised(x, alpha, sigma, generator) + (1 - self.keep) * x


def _run(step, x, alpha, sigma, edit, generator):
    """x at level 0 -> the clean image, `step(x, i)` taking level i to i+1, with an optional Edit.

    The Edit starts at level steps - round(strength * steps) from the noised image, replaces kept pixels after
    every step, and runs each step but the last `resample` times with a jump back between (RePaint Algorithm 1).
    """
    steps = len(alpha) - 1
    edit = edit or Edit(image=None)  # no Edit: every step from x, nothing kept (the image is never read)
    first = steps - round(edit.strength * steps)
    if first:
        x = edit.noised(x, alpha[first], sigma[first], generator)  # SDEdit: the image noised to level `first`
    x = edit.keep_known(x, alpha[first], sigma[first], generator)
    for i in range(first, steps):
        for u in range(edit.resample if i < steps - 1 else 1):
            if u:
                x = _jump_back(x, alpha, sigma, i, generator)
            x = edit.keep_known(step(x, i), alpha[i + 1], sigma[i + 1], generator)
    return x


def _jump_back(x, alpha, sigma, i, generator):
    """x at level i+1 -> level i by the forward process q(x_i | x_{i+1}) (RePaint Algorithm 1, line 10)."""
    ratio = alpha[i] / alpha[i + 1]
    return ratio * x + (sigma[i] ** 2 - (ratio * sigma[i + 1]) ** 2).clamp(min=0).sqrt() * _noise(x, generator)


def _predict_x0(denoise, x, diffusion, t, target, threshold):
    """The model's thresholded x0 prediction at time t (an integer, or σ for EDM), and t as a tensor [b]."""
    _check_target(target, diffusion.TARGETS)
    t_batch = torch.full(x.shape[:1], t, device=x.device)  # [b]: long for integer times, float for σ
    x0, _ = diffusion.x0_eps_from_output(denoise(x, t_batch).float(), x, t_batch, target)
    return threshold(x0), t_batch


def _noise(x, generator):
    """Standard Gaussian noise shaped like x, drawn from `generator`."""
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def _check_family(name, diffusion, family):
    if not isinstance(diffusion, family):
        raise ValueError(f"sampler {name} runs on {family.__name__} diffusions only, got {type(diffusion).__name__}")


def sample_ddpm(denoise, x, diffusion, steps, *, target, threshold=dynamic_threshold, generator=None, edit=None):
    """Ancestral sampling (Ho et al. 2020, Algorithm 2); steps < T uses the respaced chain (Nichol & Dhariwal 2021)."""
    _check_family("ddpm", diffusion, Diffusion)
    timesteps = sampling_timesteps(diffusion.num_timesteps, steps)
    chain = diffusion.respaced(timesteps).to(x.device)

    def step(x, i):
        x0, t_batch = _predict_x0(denoise, x, diffusion, timesteps[i], target, threshold)
        mean, variance = chain.posterior(x0, x, torch.full_like(t_batch, steps - 1 - i))
        return mean + variance.sqrt() * _noise(x, generator)  # variance is 0 on the last step: x = x0
    return _run(step, x, *diffusion.alphas_sigmas(timesteps), edit, generator)


def sample_ddim(denoise, x, diffusion, steps, *, target, threshold=dynamic_threshold, generator=None, edit=None,
                eta=0.0):
    """DDIM, deterministic at eta = 0 (Song et al. 2021, Eq. 12 and 16); on EDM, Euler (Karras et al. 2022, §3)."""
    times = diffusion.sampling_times(steps)
    alpha, sigma = diffusion.alphas_sigmas(times)

    def step(x, i):
        x0, t_batch = _predict_x0(denoise, x, diffusion, times[i], target, threshold)
        eps = (x - alpha[i] * x0) / sigma[i]
        noise_std = eta * sigma[i + 1] / sigma[i] * (1 - (alpha[i] / alpha[i + 1]) ** 2).sqrt()  # Eq. 16
        x = alpha[i + 1] * x0 + (sigma[i + 1] ** 2 - noise_std ** 2).clamp(min=0).sqrt() * eps  # Eq. 12
        return x + noise_std * _noise(x, generator)
    return _run(step, x, alpha, sigma, edit, generator)


def sample_dpmpp_2m(denoise, x, diffusion, steps, *, target, threshold=dynamic_threshold, generator=None, edit=None):
    """DPM-Solver++(2M), multistep in data prediction (Lu et al. 2022, arXiv 2211.01095, Algorithm 2)."""
    times = diffusion.sampling_times(steps)
    alpha, sigma = diffusion.alphas_sigmas(times)
    lam = alpha.log() - sigma.log()  # λ = log(α / σ), [steps + 1]
    x0s = {}  # step -> x0 prediction; keyed so that a step rerun by Edit.resample reads the previous step's

    def step(x, i):
        x0s[i] = x0 = _predict_x0(denoise, x, diffusion, times[i], target, threshold)[0]
        x0s.pop(i - 2, None)
        if i == steps - 1:
            return x0  # the last step lands on the clean image (σ = 0): x = x0
        h = lam[i + 1] - lam[i]
        # D = (1 + 1/2r) x0 - (1/2r) x0_prev with r = h_prev / h; first order on the first step and on the step
        # onto t = 0, whose large h makes extrapolation unstable (Lu et al.'s code, lower_order_final).
        second_order = i - 1 in x0s and i < steps - 2
        d = x0 + (x0 - x0s[i - 1]) * h / (2 * (lam[i] - lam[i - 1])) if second_order else x0
        return sigma[i + 1] / sigma[i] * x - alpha[i + 1] * torch.expm1(-h) * d
    return _run(step, x, alpha, sigma, edit, generator)


def sample_heun(denoise, x, diffusion, steps, *, target, threshold=dynamic_threshold, generator=None, edit=None,
                s_churn=0.0, s_tmin=0.0, s_tmax=math.inf, s_noise=1.0):
    """Heun's 2nd-order method on Karras σ steps, stochastic with s_churn > 0 (Karras et al. 2022, Algorithm 2)."""
    _check_family("heun", diffusion, EDM)
    sigmas = diffusion.sampling_times(steps)
    alpha, sigma = diffusion.alphas_sigmas(sigmas)

    def slope(x, s):
        """dx/dσ = (x - D(x; σ)) / σ, the ODE of Eq. 1 with the score of Eq. 3 and σ(t) = t."""
        return (x - _predict_x0(denoise, x, diffusion, s, target, threshold)[0]) / s

    def step(x, i):
        gamma = min(s_churn / steps, 2 ** 0.5 - 1) if s_tmin <= sigmas[i] <= s_tmax else 0.0  # γ_i
        s_hat = sigmas[i] * (1 + gamma)
        if gamma > 0:  # lines 4-6: raise the noise level to σ̂
            x = x + (s_hat ** 2 - sigmas[i] ** 2) ** 0.5 * s_noise * _noise(x, generator)
        d = slope(x, s_hat)
        x_next = x + (sigma[i + 1] - s_hat) * d  # line 8: Euler
        if i == steps - 1:
            return x_next  # σ = 0: Euler alone (line 9)
        return x + (sigma[i + 1] - s_hat) * (d + slope(x_next, sigmas[i + 1])) / 2  # line 11: the trapezoid
    return _run(step, x, alpha, sigma, edit, generator)

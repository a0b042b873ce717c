"""The Gaussian diffusion process: noise schedules, the math of q(x_t | x0) and its posterior, and samplers.

Times are integers t in [0, T-1]; t = 0 is the least noisy step (alphas_cumprod[0] = 1 - betas[0]).
A model predicts one of TARGETS; every sampler turns its output into an x0 prediction, thresholds it
(Imagen §2.3) and visits `sampling_timesteps`: T-1 down to 0, evenly spaced, then lands on the clean image.
"""
import math

import torch

TARGETS = ("eps", "x0", "v")


def _check_num_timesteps(T):
    if not isinstance(T, int) or T < 2:
        raise ValueError(f"number of timesteps must be an integer >= 2, got {T!r}")


def _check_target(target):
    if target not in TARGETS:
        raise ValueError(f"unknown prediction target {target!r}; choose from: {', '.join(TARGETS)}")


def linear_betas(T):
    """DDPM's linear betas 1e-4 -> 0.02 (Ho et al. 2020, §4), scaled by 1000/T as in MinImagen; float64 [T]."""
    _check_num_timesteps(T)
    scale = 1000 / T
    return torch.linspace(scale * 1e-4, scale * 0.02, T, dtype=torch.float64).clamp(max=0.999)  # < 1 for T <= 20


def cosine_betas(T):
    """Cosine schedule, s = 0.008, betas clipped at 0.999 (Nichol & Dhariwal 2021, Eq. 17); float64 [T]."""
    _check_num_timesteps(T)
    s = 0.008
    alphas_cumprod = torch.cos((torch.arange(T + 1, dtype=torch.float64) / T + s) / (1 + s) * math.pi / 2) ** 2
    return (1 - alphas_cumprod[1:] / alphas_cumprod[:-1]).clamp(max=0.999)


class Diffusion(torch.nn.Module):
    """Per-time coefficients of q(x_t | x0) and q(x_{t-1} | x_t, x0) (Ho et al. 2020, §2), computed in float64."""

    def __init__(self, betas):
        super().__init__()
        betas = torch.as_tensor(betas, dtype=torch.float64)  # [T]
        if betas.ndim != 1 or len(betas) == 0 or not ((betas > 0) & (betas <= 1)).all():
            raise ValueError(f"betas must be a non-empty 1-D tensor with values in (0, 1], got {betas}")
        self.num_timesteps = len(betas)
        self.schedule = betas  # [T] float64, stays on the host: the exact source for respaced chains
        alphas_cumprod = torch.cumprod(1 - betas, 0)  # [T]
        alphas_cumprod_prev = torch.cat([betas.new_ones(1), alphas_cumprod[:-1]])  # [T]
        posterior_variance = betas * (1 - alphas_cumprod_prev) / (1 - alphas_cumprod)  # Ho et al. 2020, Eq. 7
        buffers = dict(
            betas=betas,
            alphas_cumprod=alphas_cumprod,
            sqrt_alphas_cumprod=alphas_cumprod.sqrt(),
            sqrt_one_minus_alphas_cumprod=(1 - alphas_cumprod).sqrt(),
            posterior_variance=posterior_variance,
            # The variance is 0 at t = 0; clipped as in Ho et al.'s code.
            posterior_log_variance_clipped=posterior_variance.clamp(min=1e-20).log(),
            posterior_mean_coef1=alphas_cumprod_prev.sqrt() * betas / (1 - alphas_cumprod),  # Ho et al. 2020, Eq. 7
            posterior_mean_coef2=(1 - betas).sqrt() * (1 - alphas_cumprod_prev) / (1 - alphas_cumprod),
        )
        for name, value in buffers.items():
            self.register_buffer(name, value.float(), persistent=False)

    @staticmethod
    def _at(buffer, t, x):
        """buffer[t] shaped to broadcast against x."""
        return buffer[t].view(-1, *[1] * (x.ndim - 1))  # [b, 1, ..., 1]

    def _alpha_sigma(self, t, x):
        """α_t = sqrt(alphas_cumprod[t]) and σ_t = sqrt(1 - alphas_cumprod[t]), each [b, 1, ..., 1]."""
        return self._at(self.sqrt_alphas_cumprod, t, x), self._at(self.sqrt_one_minus_alphas_cumprod, t, x)

    def q_sample(self, x0, t, noise):
        """x_t = α_t x0 + σ_t eps (Ho et al. 2020, Eq. 4)."""
        alpha, sigma = self._alpha_sigma(t, x0)
        return alpha * x0 + sigma * noise

    def x0_from_eps(self, xt, t, eps):
        """Invert q_sample for x0."""
        alpha, sigma = self._alpha_sigma(t, xt)
        return (xt - sigma * eps) / alpha

    def eps_from_x0(self, xt, t, x0):
        """Invert q_sample for eps."""
        alpha, sigma = self._alpha_sigma(t, xt)
        return (xt - alpha * x0) / sigma

    def v_from(self, x0, eps, t):
        """v = α_t eps - σ_t x0 (Salimans & Ho 2022, §4 and App. D)."""
        alpha, sigma = self._alpha_sigma(t, x0)
        return alpha * eps - sigma * x0

    def x0_from_v(self, xt, t, v):
        """x0 = α_t x_t - σ_t v (Salimans & Ho 2022, App. D)."""
        alpha, sigma = self._alpha_sigma(t, xt)
        return alpha * xt - sigma * v

    def eps_from_v(self, xt, t, v):
        """eps = σ_t x_t + α_t v (Salimans & Ho 2022, App. D)."""
        alpha, sigma = self._alpha_sigma(t, xt)
        return sigma * xt + alpha * v

    def x0_eps_from_output(self, output, xt, t, target):
        """(x0, eps) implied by a model output that predicts `target`."""
        _check_target(target)
        if target == "eps":
            return self.x0_from_eps(xt, t, output), output
        if target == "x0":
            return output, self.eps_from_x0(xt, t, output)
        return self.x0_from_v(xt, t, output), self.eps_from_v(xt, t, output)

    def training_target(self, x0, eps, t, target):
        """What a model predicting `target` should output for x_t = q_sample(x0, t, eps)."""
        _check_target(target)
        if target == "v":
            return self.v_from(x0, eps, t)
        return eps if target == "eps" else x0

    def posterior(self, x0, xt, t):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x0) (Ho et al. 2020, Eq. 6-7)."""
        mean = self._at(self.posterior_mean_coef1, t, xt) * x0 + self._at(self.posterior_mean_coef2, t, xt) * xt
        return mean, self._at(self.posterior_variance, t, xt), self._at(self.posterior_log_variance_clipped, t, xt)

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

    def sample_times(self, batch, device, generator=None):
        """Uniform random training times, LongTensor [batch]."""
        return torch.randint(self.num_timesteps, (batch,), device=device, generator=generator)

    def time_for_noise_level(self, level, batch, device):
        """The times round(level * (T-1)) for noise levels in [0, 1] (a float, or a tensor [batch]), LongTensor [batch]."""
        level = torch.as_tensor(level, dtype=torch.float64, device=device).expand(batch)  # [batch]
        if not ((level >= 0) & (level <= 1)).all():
            raise ValueError(f"noise level must be in [0, 1], got {level.unique().tolist()}")
        return (level * (self.num_timesteps - 1)).round().long()

    def model_time(self, t):
        """The time fed to the U-Net: t / (T-1) in [0, 1], float [b]."""
        return t.float() / (self.num_timesteps - 1)

    def respaced(self, timesteps):
        """The chain that visits only `timesteps`, its betas from alphas_cumprod ratios (Nichol & Dhariwal 2021, §4).

        A jump over a ratio below 1e-16 rounds its beta to 1; its posterior stays exact to float64 precision.
        """
        alphas_cumprod = torch.cumprod(1 - self.schedule, 0)[sorted(timesteps)]  # [steps]
        return Diffusion(1 - alphas_cumprod / torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]]))


def dynamic_threshold(x0, p=0.995):
    """Per sample s = max(percentile_p |x0|, 1); clamp to [-s, s] and divide by s (Imagen §2.3)."""
    s = torch.quantile(x0.reshape(len(x0), -1).abs(), p, dim=1).clamp(min=1)  # [b]
    s = s.view(-1, *[1] * (x0.ndim - 1))  # [b, 1, ..., 1]
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


def _alphas_sigmas(diffusion, timesteps):
    """α and σ at each sampling time, then (1, 0) for the clean image, each [steps + 1]."""
    alpha = torch.cat([diffusion.sqrt_alphas_cumprod[timesteps], diffusion.betas.new_ones(1)])  # [steps + 1]
    sigma = torch.cat([diffusion.sqrt_one_minus_alphas_cumprod[timesteps], diffusion.betas.new_zeros(1)])
    return alpha, sigma


def _predict_x0(denoise, x, diffusion, t, target, threshold):
    """The model's thresholded x0 prediction at integer time t, and t as LongTensor [b]."""
    _check_target(target)
    t_batch = torch.full(x.shape[:1], t, dtype=torch.long, device=x.device)  # [b]
    x0, _ = diffusion.x0_eps_from_output(denoise(x, t_batch).float(), x, t_batch, target)
    return threshold(x0), t_batch


def _noise(x, generator):
    """Standard Gaussian noise shaped like x, drawn from `generator`."""
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def sample_ddpm(denoise, x, diffusion, steps, *, target, threshold=dynamic_threshold, generator=None):
    """Ancestral sampling (Ho et al. 2020, Algorithm 2); steps < T uses the respaced chain (Nichol & Dhariwal 2021)."""
    timesteps = sampling_timesteps(diffusion.num_timesteps, steps)
    chain = diffusion.respaced(timesteps).to(x.device)
    for chain_t, t in zip(range(steps - 1, -1, -1), timesteps):
        x0, t_batch = _predict_x0(denoise, x, diffusion, t, target, threshold)
        mean, variance, _ = chain.posterior(x0, x, torch.full_like(t_batch, chain_t))
        x = mean + variance.sqrt() * _noise(x, generator)  # variance is 0 on the last step: x = x0
    return x


def sample_ddim(denoise, x, diffusion, steps, *, target, threshold=dynamic_threshold, generator=None, eta=0.0):
    """DDIM over respaced timesteps, deterministic at eta = 0 (Song et al. 2021, Eq. 12 and 16)."""
    timesteps = sampling_timesteps(diffusion.num_timesteps, steps)
    alpha, sigma = _alphas_sigmas(diffusion, timesteps)
    for i, t in enumerate(timesteps):
        x0, t_batch = _predict_x0(denoise, x, diffusion, t, target, threshold)
        eps = diffusion.eps_from_x0(x, t_batch, x0)
        noise_std = eta * sigma[i + 1] / sigma[i] * (1 - (alpha[i] / alpha[i + 1]) ** 2).sqrt()  # Eq. 16
        x = alpha[i + 1] * x0 + (sigma[i + 1] ** 2 - noise_std ** 2).clamp(min=0).sqrt() * eps  # Eq. 12
        x = x + noise_std * _noise(x, generator)
    return x


def sample_dpmpp_2m(denoise, x, diffusion, steps, *, target, threshold=dynamic_threshold, generator=None):
    """DPM-Solver++(2M), multistep in data prediction (Lu et al. 2022, arXiv 2211.01095, Algorithm 2)."""
    del generator  # deterministic: the shared signature accepts one
    timesteps = sampling_timesteps(diffusion.num_timesteps, steps)
    alpha, sigma = _alphas_sigmas(diffusion, timesteps)
    lam = alpha.log() - sigma.log()  # λ = log(α / σ), [steps + 1]
    for i, t in enumerate(timesteps):
        x0, _ = _predict_x0(denoise, x, diffusion, t, target, threshold)
        if i == steps - 1:
            return x0  # from t = 0 the last step lands on the clean image (σ = 0): x = x0
        h = lam[i + 1] - lam[i]
        # D = (1 + 1/2r) x0 - (1/2r) x0_prev with r = h_prev / h; first order on the first step and on the step
        # onto t = 0, whose large h makes extrapolation unstable (Lu et al.'s code, lower_order_final).
        second_order = 0 < i < steps - 2
        d = x0 + (x0 - x0_prev) * h / (2 * (lam[i] - lam[i - 1])) if second_order else x0
        x = sigma[i + 1] / sigma[i] * x - alpha[i + 1] * torch.expm1(-h) * d
        x0_prev = x0

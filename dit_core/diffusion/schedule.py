"""The Gaussian diffusion process of DDPM / Improved DDPM, as DiT uses it.

Symbols (Ho et al. 2020; Nichol and Dhariwal 2021): beta_t the noise schedule, alpha_t = 1 - beta_t,
abar_t = prod_{s<=t} alpha_s (``alphas_cumprod``), x_0 the data, x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps.
The posterior q(x_{t-1} | x_t, x_0) = N(mu~_t, beta~_t). Timesteps are 0-based: t = 0 is the least noisy.
Coefficients are computed in float64 numpy and gathered per sample as float32 tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

VARIANCE_TYPES = ("learned_range", "fixed_small", "fixed_large")


def linear_betas(num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    """The DDPM linear schedule, scaled so that any step count spans the same noise range."""
    scale = 1000 / num_timesteps
    return np.linspace(scale * beta_start, scale * beta_end, num_timesteps, dtype=np.float64)


def cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """Improved DDPM's cosine schedule: abar(t) = cos^2(((t/T + s) / (1 + s)) * pi / 2)."""

    def abar(u: float) -> float:
        return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    return np.array(
        [min(1 - abar((i + 1) / num_timesteps) / abar(i / num_timesteps), max_beta) for i in range(num_timesteps)],
        dtype=np.float64,
    )


def make_betas(schedule: str, num_timesteps: int) -> np.ndarray:
    if schedule == "linear":
        return linear_betas(num_timesteps)
    if schedule in ("cosine", "squaredcos_cap_v2"):
        return cosine_betas(num_timesteps)
    raise ValueError(f"unknown noise schedule {schedule!r}; use 'linear' or 'cosine'")


def gather(values: np.ndarray, t: torch.Tensor, ndim: int) -> torch.Tensor:
    """values[t] as float32 on t's device, shaped (N, 1, ..., 1) to broadcast over an ndim tensor."""
    out = torch.as_tensor(values, dtype=torch.float64, device=t.device)[t.long()].float()
    return out.reshape(-1, *([1] * (ndim - 1)))


@dataclass
class GaussianDiffusion:
    """A discrete diffusion over len(betas) steps. ``timestep_map[i]`` is the original timestep that
    step i stands for (the identity unless respaced); the model is always called with it."""

    betas: np.ndarray
    variance_type: str = "learned_range"
    timestep_map: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.variance_type not in VARIANCE_TYPES:
            raise ValueError(f"variance_type={self.variance_type!r}; choose one of {VARIANCE_TYPES}")
        b = np.asarray(self.betas, dtype=np.float64)
        if b.ndim != 1 or not ((b > 0).all() and (b <= 1).all()):
            raise ValueError("betas must be a 1-D array in (0, 1]")
        self.betas = b
        self.num_timesteps = len(b)
        if self.timestep_map is None:
            self.timestep_map = np.arange(self.num_timesteps)
        alphas = 1.0 - b
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)
        # beta~_t; its log is clipped at t=0, where the posterior variance is 0.
        self.posterior_variance = b * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_log_variance_clipped = np.log(
            np.append(self.posterior_variance[1], self.posterior_variance[1:])
            if self.num_timesteps > 1
            else np.array([b[0]])
        )
        self.posterior_mean_coef1 = b * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)

    # -- forward process ------------------------------------------------------------------------

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps."""
        n = x_start.ndim
        return gather(self.sqrt_alphas_cumprod, t, n) * x_start + gather(self.sqrt_one_minus_alphas_cumprod, t, n) * noise

    def q_posterior(self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean mu~_t and log variance of q(x_{t-1} | x_t, x_0)."""
        n = x_t.ndim
        mean = gather(self.posterior_mean_coef1, t, n) * x_start + gather(self.posterior_mean_coef2, t, n) * x_t
        return mean, gather(self.posterior_log_variance_clipped, t, n).expand_as(x_t)

    def predict_xstart_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        n = x_t.ndim
        return gather(self.sqrt_recip_alphas_cumprod, t, n) * x_t - gather(self.sqrt_recipm1_alphas_cumprod, t, n) * eps

    def predict_eps_from_xstart(self, x_t: torch.Tensor, t: torch.Tensor, x_start: torch.Tensor) -> torch.Tensor:
        n = x_t.ndim
        return (gather(self.sqrt_recip_alphas_cumprod, t, n) * x_t - x_start) / gather(self.sqrt_recipm1_alphas_cumprod, t, n)

    # -- reverse process ------------------------------------------------------------------------

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """The original timesteps the network was trained on for (respaced) step indices t."""
        return torch.as_tensor(self.timestep_map, device=t.device)[t.long()]

    def split_output(self, model_output: torch.Tensor, channels: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(eps, v) of a learned-sigma output of 2C channels; (eps, None) for fixed variance."""
        if self.variance_type == "learned_range":
            if model_output.shape[1] != 2 * channels:
                raise ValueError(
                    f"learned sigma needs {2 * channels} output channels, got {model_output.shape[1]}; "
                    "set learn_sigma to match the model"
                )
            return model_output[:, :channels], model_output[:, channels:]
        return model_output[:, :channels], None

    def model_log_variance(self, v: torch.Tensor | None, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """log Sigma_theta: learned interpolation exp(v log beta_t + (1 - v) log beta~_t) (IDDPM eq. 15,
        with v mapped from [-1, 1]), or one of the fixed choices."""
        n = like.ndim
        if self.variance_type == "learned_range":
            assert v is not None
            min_log = gather(self.posterior_log_variance_clipped, t, n)
            max_log = gather(np.log(self.betas), t, n)
            frac = (v.float() + 1) / 2
            return frac * max_log + (1 - frac) * min_log
        if self.variance_type == "fixed_large":
            # beta_t, but beta~_1 at t=0 for a better decoder likelihood (as in IDDPM).
            values = np.log(np.append(self.posterior_variance[1], self.betas[1:])) if self.num_timesteps > 1 else np.log(self.betas)
            return gather(values, t, n).expand_as(like)
        return gather(self.posterior_log_variance_clipped, t, n).expand_as(like)

    def p_mean_variance(
        self, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, clip_denoised: bool = False
    ) -> dict[str, torch.Tensor]:
        """Mean and log variance of p_theta(x_{t-1} | x_t) from the network's output."""
        eps, v = self.split_output(model_output, x_t.shape[1])
        eps = eps.float()
        log_var = self.model_log_variance(v, t, x_t)
        x_start = self.predict_xstart_from_eps(x_t, t, eps)
        if clip_denoised:
            x_start = x_start.clamp(-1, 1)
        mean, _ = self.q_posterior(x_start, x_t, t)
        return {"mean": mean, "log_variance": log_var, "pred_xstart": x_start, "eps": eps}


# ---------------------------------------------------------------------------------------------
# Respacing
# ---------------------------------------------------------------------------------------------

def space_timesteps(num_timesteps: int, section_counts: int | str | Sequence[int]) -> list[int]:
    """The timesteps to keep, as in Improved DDPM: ``250`` or ``"250"`` spreads 250 steps evenly,
    ``"10,15,20"`` splits the range into sections with that many steps each, ``"ddim50"`` uses a
    constant integer stride (the DDIM paper's spacing)."""
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            want = int(section_counts[len("ddim"):])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == want:
                    return list(range(0, num_timesteps, stride))
            raise ValueError(f"cannot take exactly {want} steps with an integer stride from {num_timesteps}")
        section_counts = [int(x) for x in section_counts.split(",")]
    if isinstance(section_counts, int):
        section_counts = [section_counts]
    if not section_counts or any(c < 1 for c in section_counts):
        raise ValueError(f"step counts must be positive, got {section_counts}")
    size_per, extra = divmod(num_timesteps, len(section_counts))
    start, kept = 0, []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot take {count} steps from a section of {size} timesteps")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        kept += [start + round(stride * j) for j in range(count)]
        start += size
    return sorted(set(kept))


def respace(base: GaussianDiffusion, use_timesteps: Sequence[int]) -> GaussianDiffusion:
    """A diffusion over a subset of ``base``'s steps with the same marginals abar_t at kept steps:
    beta'_i = 1 - abar_{t_i} / abar_{t_{i-1}}."""
    keep = sorted(set(int(t) for t in use_timesteps))
    if not keep or keep[0] < 0 or keep[-1] >= base.num_timesteps:
        raise ValueError(f"timesteps to keep must lie in [0, {base.num_timesteps - 1}]")
    betas, last = [], 1.0
    for t in keep:
        abar = base.alphas_cumprod[t]
        betas.append(1 - abar / last)
        last = abar
    return GaussianDiffusion(
        betas=np.array(betas), variance_type=base.variance_type, timestep_map=base.timestep_map[np.array(keep)]
    )


def create_diffusion(
    timestep_respacing: int | str | None = None,
    noise_schedule: str = "linear",
    learn_sigma: bool = True,
    sigma_small: bool = False,
    diffusion_steps: int = 1000,
) -> GaussianDiffusion:
    """The DiT paper's diffusion (1000 linear steps, learned sigma), optionally respaced for sampling."""
    variance = "learned_range" if learn_sigma else ("fixed_small" if sigma_small else "fixed_large")
    base = GaussianDiffusion(make_betas(noise_schedule, diffusion_steps), variance_type=variance)
    if timestep_respacing in (None, "", 0):
        return base
    return respace(base, space_timesteps(diffusion_steps, timestep_respacing))

"""Training objectives: epsilon-MSE, plus Improved DDPM's variational-bound term for learned sigma.

The hybrid loss is L_simple + L_vlb where L_vlb is computed with the predicted mean held fixed
(stop-gradient on epsilon), so the bound only trains the variance (IDDPM section 3.1).
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from .schedule import GaussianDiffusion

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t, original timesteps) -> output


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(
    x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor, bin_width: float = 2.0 / 255.0
) -> torch.Tensor:
    """log p(x) of data in [-1, 1] quantised to 256 levels under N(means, e^{2 log_scales}) (DDPM's decoder)."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = _approx_standard_normal_cdf(inv_stdv * (centered + bin_width / 2))
    cdf_min = _approx_standard_normal_cdf(inv_stdv * (centered - bin_width / 2))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    cdf_delta = cdf_plus - cdf_min
    return torch.where(
        x < -0.999,
        log_cdf_plus,
        torch.where(x > 0.999, log_one_minus_cdf_min, torch.log(cdf_delta.clamp(min=1e-12))),
    )


def _mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=tuple(range(1, x.ndim)))


def vb_terms_bpd(
    diffusion: GaussianDiffusion,
    model_output: torch.Tensor,
    x_start: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
) -> torch.Tensor:
    """The bound's term for step t in bits per dimension: KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t))
    for t > 0 and the decoder's negative log-likelihood at t = 0. Shape (N,)."""
    true_mean, true_log_var = diffusion.q_posterior(x_start, x_t, t)
    out = diffusion.p_mean_variance(model_output, x_t, t)
    kl = _mean_flat(normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"])) / np.log(2.0)
    nll = -_mean_flat(discretized_gaussian_log_likelihood(x_start, out["mean"], 0.5 * out["log_variance"])) / np.log(2.0)
    return torch.where(t == 0, nll, kl)


def training_losses(
    diffusion: GaussianDiffusion,
    model_fn: ModelFn,
    x_start: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Per-sample losses at step indices t: ``loss`` (what to optimise), ``mse`` and, for learned
    sigma, ``vb``. ``model_fn`` receives x_t and the original timesteps."""
    if noise is None:
        noise = torch.randn_like(x_start)
    x_t = diffusion.q_sample(x_start, t, noise)
    model_output = model_fn(x_t, diffusion.model_timesteps(t))
    c = x_start.shape[1]
    eps, v = diffusion.split_output(model_output, c)
    terms: dict[str, torch.Tensor] = {"mse": _mean_flat((noise - eps.float()) ** 2)}
    if v is not None:
        # The mean is held fixed: the bound trains only the variance output.
        frozen = torch.cat([eps.detach(), v], dim=1)
        terms["vb"] = vb_terms_bpd(diffusion, frozen, x_start, x_t, t)
        terms["loss"] = terms["mse"] + terms["vb"]
    else:
        terms["loss"] = terms["mse"]
    return terms

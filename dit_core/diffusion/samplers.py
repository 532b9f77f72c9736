"""Samplers: DDPM (ancestral), DDIM (eta) and DPM-Solver++ (2M), separate from the model.

A sampler knows which timesteps to evaluate the network at (``model_timesteps``) and how to take
the next step from the network's output there (``step``); ``sample_loop`` is the only loop. Noise
comes from a ``torch.Generator`` or from one generator per sample, so that an image depends only
on its own seed, not on the batch it was drawn in.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Callable, Sequence

import numpy as np
import torch

from .schedule import GaussianDiffusion, gather, respace, space_timesteps

ModelFn = Callable[..., torch.Tensor]  # (x_t, original timesteps[, r: interval starts]) -> output
Generators = torch.Generator | Sequence[torch.Generator] | None

SAMPLERS = ("ddpm", "ddim", "dpm-solver++")


def randn(shape: Sequence[int], generator: Generators, device: torch.device | str = "cpu") -> torch.Tensor:
    """Standard normal noise; with a list of generators, sample i is drawn from generator i alone."""
    if generator is None or isinstance(generator, torch.Generator):
        gen_device = generator.device if generator is not None else device
        return torch.randn(tuple(shape), generator=generator, device=gen_device).to(device)
    if len(generator) != shape[0]:
        raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}; pass one per sample")
    return torch.stack([torch.randn(tuple(shape[1:]), generator=g, device=g.device) for g in generator]).to(device)


class Sampler(ABC):
    """One sampling method over a discrete diffusion. ``model_timesteps`` lists the original
    timesteps at which the network is evaluated, in order; ``step(i, x, out, generator)`` maps x at
    evaluation i (and the network's output ``out`` there) to x at evaluation i + 1 (the sample after
    the last one)."""

    model_timesteps: np.ndarray
    model_start_timesteps: np.ndarray | None = None  # r of each evaluation (MeanFlow); None: no r

    @property
    def num_evaluations(self) -> int:
        return len(self.model_timesteps)

    def reset(self) -> None:
        """Forget any history from a previous trajectory (multistep solvers)."""

    @abstractmethod
    def step(self, i: int, x: torch.Tensor, model_output: torch.Tensor, generator: Generators) -> torch.Tensor: ...


class _RespacedSampler(Sampler):
    def __init__(self, base: GaussianDiffusion, num_steps: int, clip_denoised: bool = False):
        if num_steps < 1 or num_steps > base.num_timesteps:
            raise ValueError(f"num_steps={num_steps} must lie in [1, {base.num_timesteps}]")
        self.diffusion = respace(base, space_timesteps(base.num_timesteps, num_steps))
        self.clip_denoised = clip_denoised
        self.model_timesteps = self.diffusion.timestep_map[::-1].copy()

    def _index(self, i: int, x: torch.Tensor) -> torch.Tensor:
        return torch.full((x.shape[0],), self.diffusion.num_timesteps - 1 - i, device=x.device, dtype=torch.long)


class DDPMSampler(_RespacedSampler):
    """Ancestral sampling from p_theta(x_{t-1} | x_t) with the model's (learned or fixed) variance."""

    def step(self, i: int, x: torch.Tensor, model_output: torch.Tensor, generator: Generators) -> torch.Tensor:
        t = self._index(i, x)
        out = self.diffusion.p_mean_variance(model_output, x, t, self.clip_denoised)
        if i == self.num_evaluations - 1:
            return out["mean"]  # no noise is added at t = 0
        return out["mean"] + torch.exp(0.5 * out["log_variance"]) * randn(x.shape, generator, x.device)


class DDIMSampler(_RespacedSampler):
    """DDIM (Song et al. 2021): eta = 0 is deterministic, eta = 1 matches DDPM's posterior variance."""

    def __init__(self, base: GaussianDiffusion, num_steps: int, eta: float = 0.0, clip_denoised: bool = False):
        super().__init__(base, num_steps, clip_denoised)
        if eta < 0:
            raise ValueError(f"eta={eta} must be >= 0")
        self.eta = eta

    def step(self, i: int, x: torch.Tensor, model_output: torch.Tensor, generator: Generators) -> torch.Tensor:
        d, t = self.diffusion, self._index(i, x)
        out = d.p_mean_variance(model_output, x, t, self.clip_denoised)
        x0 = out["pred_xstart"]
        eps = d.predict_eps_from_xstart(x, t, x0)  # re-derived, so clipping x0 is respected
        abar = gather(d.alphas_cumprod, t, x.ndim)
        abar_prev = gather(d.alphas_cumprod_prev, t, x.ndim)
        sigma = self.eta * torch.sqrt((1 - abar_prev) / (1 - abar)) * torch.sqrt(1 - abar / abar_prev)
        mean = x0 * torch.sqrt(abar_prev) + torch.sqrt((1 - abar_prev - sigma**2).clamp(min=0)) * eps
        if i == self.num_evaluations - 1 or self.eta == 0:
            return mean
        return mean + sigma * randn(x.shape, generator, x.device)


def dpm_solver_pp_2m_update(x: torch.Tensor, x0: torch.Tensor, prev_x0: torch.Tensor | None, sigma_ratio: float,
                            alpha_next: float, h: float, h_prev: float | None) -> torch.Tensor:
    """One DPM-Solver++(2M) update in the data prediction (Lu et al. 2022), for any Gaussian path
    x_t = alpha_t x_0 + sigma_t eps with lambda_t = log(alpha_t / sigma_t):
        x_next = (sigma_next / sigma) x - alpha_next (e^{-h} - 1) D,
        D = (1 + 1/(2 r)) x0 - 1/(2 r) x0_prev,  r = h_prev / h;
    first order (D = x0) where ``h_prev`` is None (no previous step to extrapolate from)."""
    if h_prev is None or prev_x0 is None:
        D = x0
    else:
        r = h_prev / h
        D = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * prev_x0
    return sigma_ratio * x - alpha_next * math.expm1(-h) * D


class DPMSolverPPSampler(Sampler):
    """DPM-Solver++(2M) (Lu et al. 2022), multistep second order in the data prediction x_0.

    With alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t), lambda_t = log(alpha_t / sigma_t) and
    h_i = lambda_{t_i} - lambda_{t_{i-1}}:
        x_{t_i} = (sigma_{t_i} / sigma_{t_{i-1}}) x_{t_{i-1}} - alpha_{t_i} (e^{-h_i} - 1) D_i,
        D_i = (1 + 1/(2 r_i)) x0_{i-1} - 1/(2 r_i) x0_{i-2},  r_i = h_{i-1} / h_i   (D_1 = x0_0).
    The network is evaluated at ``num_steps`` distinct timesteps from T-1 down to 0, spaced evenly
    in lambda (``spacing="logsnr"``, the paper's choice for few steps) or in t (``"linspace"``); the
    last update is first order (a large final h makes the 2M extrapolation unstable), and the last
    evaluation's x_0 prediction is the sample: ``num_steps`` network evaluations in all.
    """

    def __init__(self, base: GaussianDiffusion, num_steps: int, clip_denoised: bool = False, spacing: str = "logsnr"):
        if num_steps < 2 or num_steps > base.num_timesteps:
            raise ValueError(f"num_steps={num_steps} must lie in [2, {base.num_timesteps}] for DPM-Solver++")
        self.diffusion = base
        self.clip_denoised = clip_denoised
        lam_all = 0.5 * (np.log(base.alphas_cumprod) - np.log1p(-base.alphas_cumprod))  # decreasing in t
        last = base.num_timesteps - 1
        if spacing == "logsnr":
            grid = np.linspace(lam_all[last], lam_all[0], num_steps)
            ts = np.interp(grid, lam_all[::-1], np.arange(last, -1, -1)).round().astype(np.int64)
        elif spacing == "linspace":
            ts = np.linspace(last, 0, num_steps).round().astype(np.int64)
        else:
            raise ValueError(f"unknown DPM-Solver++ spacing {spacing!r}; use 'logsnr' or 'linspace'")
        for i in range(1, num_steps):  # distinct timesteps (rounding may merge neighbours)
            ts[i] = min(ts[i], ts[i - 1] - 1)
        for i in range(num_steps - 1, -1, -1):
            ts[i] = max(ts[i], num_steps - 1 - i)
        self.model_timesteps = base.timestep_map[ts]
        self._steps = ts
        abar = base.alphas_cumprod[ts]
        self._alpha, self._sigma, self._lambda = np.sqrt(abar), np.sqrt(1 - abar), lam_all[ts]
        self.reset()

    def reset(self) -> None:
        self._prev_x0: torch.Tensor | None = None

    def step(self, i: int, x: torch.Tensor, model_output: torch.Tensor, generator: Generators) -> torch.Tensor:
        d = self.diffusion
        t = torch.full((x.shape[0],), int(self._steps[i]), device=x.device, dtype=torch.long)
        eps, _ = d.split_output(model_output, x.shape[1])
        x0 = d.predict_xstart_from_eps(x, t, eps.float())
        if self.clip_denoised:
            x0 = x0.clamp(-1, 1)
        n = self.num_evaluations
        if i == n - 1:
            return x0
        h = self._lambda[i + 1] - self._lambda[i]
        # first order: the first step, and the last update
        h_prev = None if self._prev_x0 is None or i == n - 2 else self._lambda[i] - self._lambda[i - 1]
        prev, self._prev_x0 = self._prev_x0, x0
        return dpm_solver_pp_2m_update(x, x0, prev, self._sigma[i + 1] / self._sigma[i], self._alpha[i + 1], h, h_prev)


def make_sampler(
    name: str,
    base: GaussianDiffusion,
    num_steps: int,
    eta: float = 0.0,
    clip_denoised: bool = False,
    dpm_spacing: str = "logsnr",
) -> Sampler:
    if name == "ddpm":
        return DDPMSampler(base, num_steps, clip_denoised)
    if name == "ddim":
        return DDIMSampler(base, num_steps, eta, clip_denoised)
    if name in ("dpm-solver++", "dpmsolver++", "dpm_solver_pp"):
        return DPMSolverPPSampler(base, num_steps, clip_denoised, spacing=dpm_spacing)
    raise ValueError(f"unknown sampler {name!r}; choose one of {SAMPLERS}")


@torch.no_grad()
def sample_loop(
    sampler: Sampler,
    model_fn: ModelFn,
    noise: torch.Tensor,
    generator: Generators = None,
    progress: bool = False,
) -> torch.Tensor:
    """Run ``sampler`` from x_T = ``noise`` to a sample, one network evaluation per step."""
    sampler.reset()
    x = noise.float()
    steps = range(sampler.num_evaluations)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="sampling", leave=False)
    discrete = np.issubdtype(np.asarray(sampler.model_timesteps).dtype, np.integer)  # flow samplers: float times
    starts = sampler.model_start_timesteps
    for i in steps:
        if discrete:
            t = torch.full((x.shape[0],), int(sampler.model_timesteps[i]), device=x.device, dtype=torch.long)
        else:
            t = torch.full((x.shape[0],), float(sampler.model_timesteps[i]), device=x.device, dtype=torch.float32)
        if starts is None:
            out = model_fn(x, t)
        else:
            out = model_fn(x, t, torch.full((x.shape[0],), float(starts[i]), device=x.device, dtype=torch.float32))
        x = sampler.step(i, x, out, generator)
    return x

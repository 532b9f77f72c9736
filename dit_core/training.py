"""Pure-PyTorch training helpers: EMA of the weights, the learning-rate schedule, per-step seeds,
training latents from the stored posterior pairs, config flattening.

Determinism: the data order is a function of (seed, epoch, worker count, shuffle window, the
latents' row-group layout) (ray_jobs/latent_input.py), and every random draw of optimizer step s on
rank r (posterior sample, timesteps, noise, label dropout) comes from a seed derived from
(seed, s, r, micro-batch). A run stopped after k steps and resumed from its checkpoint therefore
continues exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import copy
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn as nn


# ----------------------------------------------------------------------------------------------
# EMA
# ----------------------------------------------------------------------------------------------

class EMA:
    """Exponential moving average of a model's parameters (and a copy of its buffers):
    ema <- d * ema + (1 - d) * theta after every optimizer step.

    ``warmup``: d = min(decay, (1 + step) / (10 + step)) at optimizer step ``step``, so that a short
    run's average is not dominated by its initial weights (with decay 0.999, 1,500 plain updates
    still leave 22% of the step-0 weights in the average). Off: d = decay, as the DiT paper's
    400k-step runs use it."""

    def __init__(self, model: nn.Module, decay: float, warmup: bool = False):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema decay={decay} must be in [0, 1)")
        self.decay = decay
        self.warmup = warmup
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    def decay_at(self, step: int | None) -> float:
        if not self.warmup or step is None:
            return self.decay
        return min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, model: nn.Module, step: int | None = None) -> None:
        weight = 1.0 - self.decay_at(step)
        ema_params = dict(self.model.named_parameters())
        for name, p in model.named_parameters():
            ema_params[name].lerp_(p.detach().to(ema_params[name].dtype), weight)
        ema_buffers = dict(self.model.named_buffers())
        for name, b in model.named_buffers():
            ema_buffers[name].copy_(b)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state_dict, strict=True)


# ----------------------------------------------------------------------------------------------
# Schedule, seeds, flattening
# ----------------------------------------------------------------------------------------------

def learning_rate(step: int, base_lr: float, warmup_steps: int) -> float:
    """Linear warm-up from base_lr / warmup_steps to base_lr over the first warmup_steps, then constant
    (the DiT paper's schedule is constant; warm-up is an option)."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    return base_lr


def derive_seed(*entropy: int) -> int:
    """A 63-bit seed that depends on every value in ``entropy`` (independent streams per tuple)."""
    return int(np.random.SeedSequence([int(e) for e in entropy]).generate_state(1, dtype=np.uint64)[0] >> 1)


def flatten(tree: Mapping[str, Any], prefix: str = "", sep: str = ".") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists and scalars are leaves."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{sep}{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            out.update(flatten(value, name, sep))
        else:
            out[name] = value
    return out


# ----------------------------------------------------------------------------------------------
# Latent data: the stored (mean, std) posterior of each image and, where stored, of its flip
# ----------------------------------------------------------------------------------------------

def noisy_latents(mean: np.ndarray, std: np.ndarray, scale_factor: float, generator: torch.Generator) -> torch.Tensor:
    """Training latents ``scale * (mean + std * eps)`` of a batch's posterior (N, C, H, W) float32."""
    mean_t, std_t = torch.from_numpy(np.ascontiguousarray(mean)), torch.from_numpy(np.ascontiguousarray(std))
    eps = torch.randn(mean_t.shape, generator=generator)
    return scale_factor * (mean_t + std_t * eps)


__all__ = [
    "EMA",
    "derive_seed",
    "flatten",
    "noisy_latents",
    "learning_rate",
]

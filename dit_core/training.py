"""Pure-PyTorch training helpers: EMA of the weights, the learning-rate schedule, reproducible data
order and per-step seeds, latent batches from the stored posterior pairs, config flattening.

Determinism: the data order of epoch e is a function of (seed, e) only, and every random draw of
optimizer step s on rank r (posterior sample, timesteps, noise, label dropout) comes from a seed
derived from (seed, s, r, micro-batch). A run stopped after k steps and resumed from its
checkpoint therefore continues exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

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

# The views of an image the encode stage can store, each with its (posterior mean, posterior std)
# columns (docs/CONTRACTS.md, ``data/latents/``): "image" always, "flip" (its horizontal mirror)
# only where training flips.
LATENT_VIEWS: dict[str, tuple[str, str]] = {"image": ("mean", "std"), "flip": ("mean_flip", "std_flip")}


@dataclass
class LatentArrays:
    """The train split in memory: posterior mean/std of each stored view, (N, C, H, W) float32, and
    labels. ``mean_flip``/``std_flip`` are None where the flip view was not stored."""

    mean: np.ndarray
    std: np.ndarray
    labels: np.ndarray  # (N,) int64
    mean_flip: np.ndarray | None = None
    std_flip: np.ndarray | None = None

    def __post_init__(self) -> None:
        if (self.mean_flip is None) != (self.std_flip is None):
            raise ValueError("mean_flip and std_flip come together: give both (the flip view) or neither")

    @property
    def has_flip(self) -> bool:
        return self.mean_flip is not None

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class BatchPlan:
    """Which rows each rank reads at each (optimizer step, micro-batch): every epoch is a fresh
    permutation from (seed, epoch), cut into global micro-batches of world * per_rank rows; rank r
    takes its own slice, so the ranks see disjoint parts of every epoch. The rows of an epoch that do
    not fill a whole global micro-batch are skipped (a different remainder every epoch)."""

    num_rows: int
    per_rank: int      # rows per rank per micro-batch
    world_size: int
    grad_accum: int
    seed: int
    flip_prob: float = 0.5  # share of samples read as their horizontal flip (0: never)

    def __post_init__(self) -> None:
        if not 0.0 <= self.flip_prob <= 1.0:
            raise ValueError(f"flip_prob={self.flip_prob} must be in [0, 1]")
        if self.batches_per_epoch < 1:
            raise ValueError(
                f"a global micro-batch of {self.per_rank * self.world_size} rows ({self.world_size} workers x "
                f"{self.per_rank}) is larger than the data ({self.num_rows} rows); lower train.batch_size"
            )

    @property
    def batches_per_epoch(self) -> int:
        return self.num_rows // (self.per_rank * self.world_size)

    def epoch_of(self, step: int, micro: int = 0) -> int:
        return (step * self.grad_accum + micro) // self.batches_per_epoch

    def rows(self, step: int, micro: int, rank: int) -> tuple[np.ndarray, np.ndarray]:
        """(row indices, flip flags) of this rank's micro-batch."""
        b = step * self.grad_accum + micro
        epoch, within = divmod(b, self.batches_per_epoch)
        rng = np.random.default_rng(derive_seed(self.seed, epoch))
        order = rng.permutation(self.num_rows)
        flips = rng.random(self.num_rows) < self.flip_prob  # one flip choice per sample per epoch
        start = (within * self.world_size + rank) * self.per_rank
        idx = order[start:start + self.per_rank]
        return idx, flips[idx]


def latent_batch(
    data: LatentArrays,
    rows: np.ndarray,
    flips: np.ndarray,
    scale_factor: float,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Training latents scale * (mean + std * eps) of the chosen view of each row, and their labels.
    Rows flagged in ``flips`` need the flip view; with none flagged it may be absent."""
    if flips.any():
        if not data.has_flip:
            raise ValueError("the batch asks for flipped rows but the latents hold no flip view "
                             "(encode with flip_views: true, or train with flip_prob 0)")
        mean = np.where(flips[:, None, None, None], data.mean_flip[rows], data.mean[rows])
        std = np.where(flips[:, None, None, None], data.std_flip[rows], data.std[rows])
    else:
        mean, std = data.mean[rows], data.std[rows]
    mean_t, std_t = torch.from_numpy(mean), torch.from_numpy(std)
    eps = torch.randn(mean_t.shape, generator=generator)
    latents = scale_factor * (mean_t + std_t * eps)
    return latents, torch.from_numpy(data.labels[rows]).long()


def micro_batches(plan: BatchPlan, step: int, rank: int) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    for micro in range(plan.grad_accum):
        rows, flips = plan.rows(step, micro, rank)
        yield micro, rows, flips


__all__ = [
    "EMA",
    "LATENT_VIEWS",
    "BatchPlan",
    "LatentArrays",
    "derive_seed",
    "flatten",
    "latent_batch",
    "learning_rate",
    "micro_batches",
]

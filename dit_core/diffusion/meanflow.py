"""The MeanFlow objective (Geng et al. 2025, "Mean Flows for One-step Generative Modeling"): the
network predicts the average velocity over an interval, and samples in one or a few evaluations.

Symbols as in ``flow``: t in [0, 1] with t = 1 pure noise, z_t = (1 - t) x + t eps, v = eps - x.
The network predicts the average velocity over [r, t], r <= t (paper, Eq. 3):
    u(z_t, r, t) = 1 / (t - r) * integral_r^t v(z_s, s) ds,     u(z_t, t, t) = v(z_t, t),
so z_r = z_t - (t - r) u(z_t, r, t) exactly. Differentiating (t - r) u in t gives the MeanFlow
identity (Eq. 6), whose right-hand side, under stop-gradient, is the training target:
    u_tgt = v - (t - r) d/dt u(z_t, r, t),   d/dt u = v . d_z u + d_t u   (a JVP, tangent (v, 0, 1) on (z, r, t)).
With r = t the target is v: the flow objective is the special case.

Loss (Eq. 9 and the adaptive weighting of Sec. 4.3): with Delta = u - sg(u_tgt) and ||.||^2 the sum
over a sample's elements, loss = sg(w) ||Delta||^2, w = 1 / (||Delta||^2 + c)^p.

Learned guidance (Sec. 4.2, Eq. 13-19 and App. B.1): the field learned is the guided one,
    v_cfg(z_t, t | y) = omega v(z_t, t | y) + (1 - omega) v(z_t, t),
whose target velocity is estimated, for a sample whose class is kept, as
    v_tilde = omega v + kappa u(z_t, t, t | y) + (1 - omega - kappa) u(z_t, t, t | null)
(the network's own r = t predictions, under stop-gradient; kappa = 0 is Eq. 16-17; the effective
guidance scale is omega / (1 - kappa)). A sample whose class is dropped learns the unconditional
field: its v_tilde is v (the official code does the same). v_tilde is also the JVP's tangent, since
the guided field's trajectories move along it. Sampling then needs no unconditional pass.

Network times: the model sees ``t * time_scale`` and ``r * time_scale`` (as under ``flow``, whose
scale is 1000, the DiT's timestep range; MeanFlow's default is 1, see ``MeanFlowSettings``); the JVP
differentiates in t in [0, 1] through that scaling, so d/dt u grows with the scale.

The JVP runs under the math attention kernel: forward-mode AD through PyTorch's flash and
memory-efficient SDPA kernels is not implemented (CPU and GPU). benchmarks/meanflow_step.py
measures this path against the alternatives.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from .flow import TIMESTEP_SAMPLING, FlowMatching
from .samplers import Generators, Sampler

# (z, r, t, y) -> network output, its first C channels u; r and t in the network's units (x time_scale)
MeanFlowModelFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# (z, r, t) -> u, r and t in [0, 1]
AverageVelocityFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class MeanFlowSettings:
    """The MeanFlow recipe; the defaults are the paper's ImageNet ones (Table 4) unless said."""

    # the network's time input is t * time_scale (recorded as ``diffusion_steps``). 1: t in [0, 1], as SiT
    # and MeanFlow's reference code; the flow objective's 1000 made the JVP target diverge on digits
    # (docs/training.md: MeanFlow; benchmarks/meanflow_time_scale.py), where 1 trained smoothly
    time_scale: float = 1.0
    timestep_sampling: str = "logit-normal"  # of t and r: uniform | logit-normal; each pair sorted so t >= r
    logit_mean: float = -0.4
    logit_std: float = 1.0
    interval_share: float = 0.25           # share of samples with r != t (the rest: r = t, the flow objective)
    guidance_omega: float = 1.0            # omega: learned guidance scale (1: none)
    guidance_kappa: float = 0.0            # kappa: mixes in the conditional prediction (App. B.1); 0: Eq. 16
    weight_power: float = 1.0              # p of the adaptive weight (0: plain squared error)
    weight_eps: float = 1e-3               # c of the adaptive weight (the paper's; the official code: 1e-2)

    def __post_init__(self) -> None:
        if self.timestep_sampling not in TIMESTEP_SAMPLING:
            raise ValueError(f"timestep_sampling={self.timestep_sampling!r}; choose one of {TIMESTEP_SAMPLING}")
        if not self.time_scale > 0 or not self.logit_std > 0:
            raise ValueError(f"time_scale={self.time_scale} and logit_std={self.logit_std} must be > 0")
        if not 0.0 <= self.interval_share <= 1.0:
            raise ValueError(f"interval_share={self.interval_share} is the share of samples with r != t: "
                             "set a value in [0, 1] (the paper: 0.25)")
        if not self.guidance_omega > 0:
            raise ValueError(f"guidance_omega={self.guidance_omega} must be > 0 (1: no guidance; the paper: 1 to 3)")
        if not 0.0 <= self.guidance_kappa < 1.0:
            raise ValueError(f"guidance_kappa={self.guidance_kappa} must be in [0, 1) (0: no mixing)")
        if self.weight_power < 0 or not self.weight_eps > 0:
            raise ValueError(f"weight_power={self.weight_power} must be >= 0 and weight_eps={self.weight_eps} > 0")

    @property
    def guided(self) -> bool:
        return self.guidance_omega != 1.0 or self.guidance_kappa != 0.0

    def check_label_dropout(self, class_dropout_prob: float) -> None:
        """Learned guidance needs the unconditional model: refuse it without label dropout."""
        if self.guided and not class_dropout_prob > 0:
            raise ValueError(f"learned guidance (guidance_omega={self.guidance_omega}, guidance_kappa="
                             f"{self.guidance_kappa}) needs the unconditional model: set class_dropout_prob > 0 "
                             "(the paper: 0.1), or guidance_omega: 1 and guidance_kappa: 0")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _expand(a: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return a.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


def average_velocity_target(u_fn: AverageVelocityFn, z: torch.Tensor, r: torch.Tensor, t: torch.Tensor,
                            v: torch.Tensor) -> torch.Tensor:
    """The MeanFlow target u_tgt = v - (t - r) d/dt u(z, r, t), d/dt u the JVP of ``u_fn`` with
    tangent (v, 0, 1) on (z, r, t), without gradient (the target is under stop-gradient anyway,
    and no graph of the JVP is kept). r, t: (N,) in [0, 1]."""
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        _, dudt = torch.func.jvp(u_fn, (z, r, t), (v, torch.zeros_like(r), torch.ones_like(t)))
    return (v - _expand(t - r, v) * dudt.to(v.dtype)).detach()


def adaptive_weighted_loss(u: torch.Tensor, u_tgt: torch.Tensor, power: float, eps: float) -> dict[str, torch.Tensor]:
    """Per sample: ``loss`` = sg(w) ||Delta||^2 with w = 1 / (||Delta||^2 + c)^p, ``mse`` the mean of
    Delta^2 (the flow objective's loss, comparable across objectives)."""
    dims = tuple(range(1, u.ndim))
    sq = (u - u_tgt).pow(2)
    sum_sq = sq.sum(dim=dims)
    loss = sum_sq / (sum_sq.detach() + eps).pow(power)
    return {"loss": loss, "mse": sq.mean(dim=dims)}


class MeanFlow:
    """The MeanFlow objective: (r, t) draws, label dropout, the learned-guidance velocity, the loss."""

    def __init__(self, settings: MeanFlowSettings | None = None):
        self.settings = settings or MeanFlowSettings()
        s = self.settings
        self.flow = FlowMatching(s.time_scale, s.timestep_sampling, s.logit_mean, s.logit_std)

    def sample_times(self, n: int, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
        """(r, t), each (n,), from the global torch RNG: two draws of the time distribution sorted so
        that t >= r, then r = t for a sample with probability 1 - interval_share."""
        a, b = self.flow.sample_t(n, device), self.flow.sample_t(n, device)
        t, r = torch.maximum(a, b), torch.minimum(a, b)
        keep = torch.rand(n, device=device) < self.settings.interval_share
        return torch.where(keep, r, t), t

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        return t * self.settings.time_scale

    def average_velocity_fn(self, model_fn: MeanFlowModelFn, y: torch.Tensor, channels: int) -> AverageVelocityFn:
        """u(z, r, t) with r, t in [0, 1]: the network's first ``channels`` output channels."""
        return lambda z, r, t: model_fn(z, self.model_time(r), self.model_time(t), y)[:, :channels]

    @torch.no_grad()
    def guided_velocity(self, model_fn: MeanFlowModelFn, z: torch.Tensor, t: torch.Tensor, v: torch.Tensor,
                        y: torch.Tensor, dropped: torch.Tensor, null_class: int) -> torch.Tensor:
        """v_tilde (module docstring): omega v + kappa u(z, t, t | y) + (1 - omega - kappa) u(z, t, t | null)
        where the class is kept, v where it is dropped; one batched pass (two halves with kappa)."""
        s, c = self.settings, v.shape[1]
        null = torch.full_like(y, null_class)
        if s.guidance_kappa:
            both = model_fn(torch.cat([z, z]), self.model_time(torch.cat([t, t])), self.model_time(torch.cat([t, t])),
                            torch.cat([null, y]))[:, :c].float()
            u_null, u_cond = both.chunk(2)
        else:
            u_null = model_fn(z, self.model_time(t), self.model_time(t), null)[:, :c].float()
            u_cond = torch.zeros_like(u_null)
        guided = s.guidance_omega * v + s.guidance_kappa * u_cond + (1 - s.guidance_omega - s.guidance_kappa) * u_null
        return torch.where(_expand(dropped, v).bool(), v, guided)

    def losses(self, model_fn: MeanFlowModelFn, x_start: torch.Tensor, times: tuple[torch.Tensor, torch.Tensor],
               y: torch.Tensor, null_class: int, class_dropout_prob: float, noise: torch.Tensor | None = None,
               jvp_fn: MeanFlowModelFn | None = None) -> dict[str, torch.Tensor]:
        """Per-sample ``loss`` (adaptively weighted) and ``mse`` at times (r, t).

        The objective drops labels itself (share ``class_dropout_prob``, to ``null_class``, from the
        global RNG): ``model_fn`` must not drop them again (the DiT: ``drop_labels=False``).
        ``jvp_fn``: the function the no-gradient passes (the JVP, the guidance's own predictions) run
        through (default ``model_fn``); a training job passes the module without its DDP wrapper there."""
        r, t = times
        if r.shape != t.shape or t.shape != (x_start.shape[0],):
            raise ValueError(f"times r {tuple(r.shape)} and t {tuple(t.shape)} must both have shape ({x_start.shape[0]},)")
        self.settings.check_label_dropout(class_dropout_prob)
        if noise is None:
            noise = torch.randn_like(x_start)
        x, c = x_start.float(), x_start.shape[1]
        dropped = torch.rand(y.shape[0], device=y.device) < class_dropout_prob if class_dropout_prob > 0 else torch.zeros_like(y, dtype=torch.bool)
        y_in = torch.where(dropped, torch.full_like(y, null_class), y)
        z = self.flow.interpolate(x, noise.float(), t)
        v = noise.float() - x
        no_grad_fn = jvp_fn or model_fn
        if self.settings.guided:
            v = self.guided_velocity(no_grad_fn, z, t, v, y, dropped, null_class)
        u_tgt = average_velocity_target(self.average_velocity_fn(no_grad_fn, y_in, c), z, r.float(), t.float(), v)
        u = model_fn(z, self.model_time(r), self.model_time(t), y_in)[:, :c].float()
        return adaptive_weighted_loss(u, u_tgt, self.settings.weight_power, self.settings.weight_eps)


def meanflow_times(num_steps: int) -> np.ndarray:
    """``num_steps + 1`` times from 1 down to 0, uniform: the intervals of a k-evaluation sample."""
    if num_steps < 1:
        raise ValueError(f"num_steps={num_steps} must be at least 1 (1: one-step generation)")
    return np.linspace(1.0, 0.0, num_steps + 1)


class MeanFlowSampler(Sampler):
    """k evaluations over [0, 1] split into k equal intervals: z_r = z_t - (t - r) u(z_t, r, t).
    One evaluation: x = eps - u(eps, 0, 1). Exact where u is (no discretisation error)."""

    def __init__(self, meanflow: MeanFlow, num_steps: int):
        self.times = meanflow_times(int(num_steps))
        scale = meanflow.settings.time_scale
        self.model_timesteps = (self.times[:-1] * scale).astype(np.float32)        # t of each evaluation
        self.model_start_timesteps = (self.times[1:] * scale).astype(np.float32)   # r of each evaluation

    def step(self, i: int, x: torch.Tensor, model_output: torch.Tensor, generator: Generators) -> torch.Tensor:
        u = model_output[:, : x.shape[1]].float()
        return x - float(self.times[i] - self.times[i + 1]) * u


__all__ = ["MeanFlow", "MeanFlowSampler", "MeanFlowSettings", "adaptive_weighted_loss", "average_velocity_target",
           "meanflow_times"]

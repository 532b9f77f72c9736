"""The flow objective: the linear interpolant between data and noise with velocity prediction
(rectified flow; SiT, Ma et al. 2024; SD3, Esser et al. 2024), and its ODE samplers.

Symbols: t in [0, 1] with t = 1 pure noise, x_t = (1 - t) x_0 + t eps, and the network predicts the
velocity v = dx_t/dt = eps - x_0. The network's timestep input is ``t * time_scale`` so that the DiT's
sinusoidal timestep embedding sees the same range as under the discrete diffusion (0..999).

Sampling integrates dx/dt = v from t = 1 to t = 0 (a deterministic ODE): Euler, Heun (second
order, two evaluations per step but the last) or DPM-Solver++(2M), which applies because the
interpolant is a Gaussian path with alpha_t = 1 - t and sigma_t = t (x_0 = x_t - t v).
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from .samplers import Generators, Sampler, dpm_solver_pp_2m_update

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

TIMESTEP_SAMPLING = ("uniform", "logit-normal")


def flow_times(num_steps: int, shift: float = 1.0) -> np.ndarray:
    """``num_steps + 1`` times from 1 down to 0, uniform in t, then shifted as SD3 does:
    t' = shift t / (1 + (shift - 1) t) (shift > 1 spends more of the steps at high noise)."""
    if num_steps < 1:
        raise ValueError(f"num_steps={num_steps} must be at least 1")
    if not shift > 0:
        raise ValueError(f"shift={shift} must be > 0")
    t = np.linspace(1.0, 0.0, num_steps + 1)
    return shift * t / (1.0 + (shift - 1.0) * t)


class FlowMatching:
    """The flow objective: interpolation, timestep draws, the training loss and sampler parts."""

    def __init__(self, time_scale: float = 1000.0, timestep_sampling: str = "logit-normal",
                 logit_mean: float = 0.0, logit_std: float = 1.0):
        if timestep_sampling not in TIMESTEP_SAMPLING:
            raise ValueError(f"timestep_sampling={timestep_sampling!r}; choose one of {TIMESTEP_SAMPLING}")
        if not time_scale > 0 or not logit_std > 0:
            raise ValueError(f"time_scale={time_scale} and logit_std={logit_std} must be > 0")
        self.time_scale = float(time_scale)
        self.timestep_sampling = timestep_sampling
        self.logit_mean, self.logit_std = float(logit_mean), float(logit_std)

    def sample_t(self, n: int, device: torch.device | str) -> torch.Tensor:
        """Training times in (0, 1) from the global torch RNG: uniform, or logit-normal
        (sigmoid of N(logit_mean, logit_std^2): more weight on the middle of the path)."""
        if self.timestep_sampling == "uniform":
            return torch.rand(n, device=device)
        return torch.sigmoid(self.logit_mean + self.logit_std * torch.randn(n, device=device))

    @staticmethod
    def interpolate(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = t.reshape(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
        return (1 - t) * x0 + t * noise

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        return t * self.time_scale

    def losses(self, model_fn: ModelFn, x_start: torch.Tensor, t: torch.Tensor,
               noise: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Per-sample velocity MSE at times t: ``loss`` (= ``mse``)."""
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.interpolate(x_start, noise, t)
        out = model_fn(x_t, self.model_time(t))
        v = out[:, : x_start.shape[1]].float()
        mse = ((noise - x_start) - v).pow(2).mean(dim=tuple(range(1, x_start.ndim)))
        return {"loss": mse, "mse": mse}


class _FlowSampler(Sampler):
    """Evaluations at times ``self.t_eval`` (network input ``t * time_scale``, float)."""

    def __init__(self, flow: FlowMatching, t_eval: np.ndarray):
        self.flow = flow
        self.t_eval = np.asarray(t_eval, dtype=np.float64)
        self.model_timesteps = (self.t_eval * flow.time_scale).astype(np.float32)

    @staticmethod
    def _velocity(x: torch.Tensor, model_output: torch.Tensor) -> torch.Tensor:
        return model_output[:, : x.shape[1]].float()


class FlowEulerSampler(_FlowSampler):
    """Euler on dx/dt = v: ``num_steps`` evaluations, x <- x + (t_next - t) v; the last step lands
    on t = 0 (there it is the model's x_0 prediction x - t v)."""

    def __init__(self, flow: FlowMatching, num_steps: int, shift: float = 1.0):
        self.times = flow_times(num_steps, shift)
        super().__init__(flow, self.times[:-1])

    def step(self, i: int, x: torch.Tensor, model_output: torch.Tensor, generator: Generators) -> torch.Tensor:
        return x + float(self.times[i + 1] - self.times[i]) * self._velocity(x, model_output)


class FlowHeunSampler(_FlowSampler):
    """Heun (explicit trapezoid) on dx/dt = v: each of ``num_steps`` steps evaluates at t and at
    the Euler guess at t_next and averages the two velocities; the step to t = 0 is Euler (as in
    EDM), so 2 num_steps - 1 evaluations."""

    def __init__(self, flow: FlowMatching, num_steps: int, shift: float = 1.0):
        self.times = flow_times(num_steps, shift)
        evals, self._plan = [], []   # (step k, stage): stage 0 predicts, 1 corrects
        for k in range(num_steps):
            evals.append(self.times[k])
            self._plan.append((k, 0))
            if k < num_steps - 1:
                evals.append(self.times[k + 1])
                self._plan.append((k, 1))
        super().__init__(flow, np.array(evals))
        self.reset()

    def reset(self) -> None:
        self._x: torch.Tensor | None = None
        self._v: torch.Tensor | None = None

    def step(self, i: int, x: torch.Tensor, model_output: torch.Tensor, generator: Generators) -> torch.Tensor:
        k, stage = self._plan[i]
        v = self._velocity(x, model_output)
        dt = float(self.times[k + 1] - self.times[k])
        if stage == 0:
            if k == len(self.times) - 2:   # the last step: Euler to t = 0
                return x + dt * v
            self._x, self._v = x, v
            return x + dt * v
        assert self._x is not None and self._v is not None
        x_next = self._x + dt * 0.5 * (self._v + v)
        self._x = self._v = None
        return x_next


class FlowDPMSolverPPSampler(_FlowSampler):
    """DPM-Solver++(2M) on the flow's Gaussian path (alpha_t = 1 - t, sigma_t = t): data prediction
    x_0 = x - t v, lambda_t = log((1 - t) / t). ``num_steps`` evaluations on the (shifted) uniform
    t grid; the first step (from t = 1, lambda = -inf) and the last (to t = 0) are first order, and
    the first order update from t = 1 is exactly Euler's."""

    def __init__(self, flow: FlowMatching, num_steps: int, shift: float = 1.0):
        self.times = flow_times(num_steps, shift)
        super().__init__(flow, self.times[:-1])
        with np.errstate(divide="ignore"):
            self._lambda = np.log1p(-self.times) - np.log(self.times)   # -inf at t = 1, +inf at t = 0
        self.reset()

    def reset(self) -> None:
        self._prev_x0: torch.Tensor | None = None

    def step(self, i: int, x: torch.Tensor, model_output: torch.Tensor, generator: Generators) -> torch.Tensor:
        t, t_next = float(self.times[i]), float(self.times[i + 1])
        x0 = x - t * self._velocity(x, model_output)
        if t_next == 0.0:
            return x0
        h = float(self._lambda[i + 1] - self._lambda[i])
        h_prev = float(self._lambda[i] - self._lambda[i - 1]) if i > 0 else math.inf
        prev, self._prev_x0 = self._prev_x0, x0
        # alpha_t = 1 - t, sigma_t = t; with t = 1 the first term is t_next x. From t = 1 (h_prev
        # infinite) the update is first order.
        return dpm_solver_pp_2m_update(x, x0, prev, t_next / t, 1 - t_next, h, h_prev if math.isfinite(h_prev) else None)


FLOW_SAMPLERS = {"euler": FlowEulerSampler, "heun": FlowHeunSampler, "dpm-solver++": FlowDPMSolverPPSampler}

__all__ = ["FLOW_SAMPLERS", "FlowDPMSolverPPSampler", "FlowEulerSampler", "FlowHeunSampler", "FlowMatching",
           "TIMESTEP_SAMPLING", "flow_times"]

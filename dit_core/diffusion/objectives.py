"""Training objectives as one interface, and the record that says which one a model was trained with.

- ``eps``: the DiT paper's. Discrete Gaussian diffusion (``noise_schedule``, ``diffusion_steps``),
  epsilon prediction, learned sigma with the hybrid loss, uniform timesteps. Exact to the official
  code. ``loss_weighting: min-snr`` weights the epsilon MSE by min(SNR, gamma) / SNR (Hang et al. 2023).
- ``flow``: the linear interpolant with velocity prediction (``dit_core.diffusion.flow``),
  uniform or logit-normal times, no learned variance.
- ``meanflow``: the same path, average-velocity prediction u(z_t, r, t) (``dit_core.diffusion.meanflow``):
  one- or few-step sampling, guidance learned in training (none at sampling). Its model needs the
  second time input (``DiTConfig.interval_embed``); with r = t it is a flow model, so the flow
  samplers fit it too.

The record (``settings()``) is the ``diffusion`` entry of every checkpoint and registered model;
samplers are built from it, and a sampler that does not fit the objective is refused. A record
without ``objective`` (written before it existed) is ``eps``.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch

from ..settings import SettingError
from .flow import FLOW_SAMPLERS, TIMESTEP_SAMPLING, FlowMatching
from .meanflow import MeanFlow, MeanFlowModelFn, MeanFlowSampler, MeanFlowSettings
from .losses import training_losses
from .samplers import SAMPLERS, Sampler, make_sampler
from .schedule import create_diffusion, gather

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

OBJECTIVES = ("eps", "flow", "meanflow")
MEANFLOW_SAMPLER = "meanflow"
# the samplers of each objective, the first the reference (exact / ancestral) one
SAMPLERS_BY_OBJECTIVE: dict[str, tuple[str, ...]] = {
    "eps": SAMPLERS,
    "flow": tuple(FLOW_SAMPLERS),
    "meanflow": (MEANFLOW_SAMPLER, *FLOW_SAMPLERS),   # u(z, t, t) = v: the flow ODE solvers apply with r = t
}
ALL_SAMPLERS = tuple(dict.fromkeys(s for names in SAMPLERS_BY_OBJECTIVE.values() for s in names))
LOSS_WEIGHTINGS = ("none", "min-snr")


def objective_name(settings: Mapping[str, Any] | None) -> str:
    name = str((settings or {}).get("objective", "eps"))
    if name not in OBJECTIVES:
        raise ValueError(f"objective {name!r} is unknown; choose one of {OBJECTIVES}")
    return name


def check_sampler(settings: Mapping[str, Any] | None, sampler: str) -> None:
    """Refuse a sampler the model's objective has no use for, naming the ones it has."""
    name = objective_name(settings)
    fits = SAMPLERS_BY_OBJECTIVE[name]
    if sampler not in ALL_SAMPLERS:
        problem = f"is unknown; choose one of {ALL_SAMPLERS}"
        raise SettingError("sampler", sampler, problem, f"sampler {sampler!r} {problem}")
    if sampler not in fits:
        problem = f"does not fit this model: it was trained with objective {name!r}, whose samplers are {fits}"
        raise SettingError("sampler", sampler, problem + "; choose one of them",
                           f"sampler {sampler!r} {problem}; set sample.sampler to one of them")


def guidance_learned(settings: Mapping[str, Any] | None) -> bool:
    """Whether the model's guidance was learned in training (MeanFlow's, guidance_omega), so that
    it takes no classifier-free guidance at sampling."""
    return objective_name(settings) == "meanflow"


def sampling_guidance(settings: Mapping[str, Any] | None, guidance_scale: float) -> tuple[float, str | None]:
    """The classifier-free guidance scale a model samples with for ``guidance_scale`` asked, and why
    it is another (None: it is the one asked): a model whose guidance was learned samples with 1."""
    if not guidance_learned(settings) or float(guidance_scale) == 1.0:
        return float(guidance_scale), None
    omega = (settings or {}).get("guidance_omega", MeanFlowSettings.guidance_omega)
    return 1.0, (f"guidance_scale={guidance_scale} is ignored: this model was trained with objective 'meanflow', "
                 f"whose guidance is learned in training (train.meanflow.guidance_omega={omega}), and it samples without "
                 "classifier-free guidance. Set guidance_scale to 1 (sample.guidance_scale: 1, --guidance-scale 1) to "
                 "silence this; for stronger guidance train with a larger train.meanflow.guidance_omega")


class EpsObjective:
    """The paper's objective (see the module docstring)."""

    name = "eps"

    def __init__(self, noise_schedule: str = "linear", diffusion_steps: int = 1000, learn_sigma: bool = True,
                 loss_weighting: str = "none", min_snr_gamma: float = 5.0):
        if loss_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"loss_weighting={loss_weighting!r}; choose one of {LOSS_WEIGHTINGS}")
        if not min_snr_gamma > 0:
            raise ValueError(f"min_snr_gamma={min_snr_gamma} must be > 0")
        self.diffusion = create_diffusion(None, noise_schedule=noise_schedule, learn_sigma=learn_sigma,
                                          diffusion_steps=diffusion_steps)
        self.noise_schedule, self.diffusion_steps, self.learn_sigma = noise_schedule, int(diffusion_steps), bool(learn_sigma)
        self.loss_weighting, self.min_snr_gamma = loss_weighting, float(min_snr_gamma)
        abar = self.diffusion.alphas_cumprod
        self._snr_weight = (abar / (1 - abar)).clip(max=self.min_snr_gamma) / (abar / (1 - abar))

    def sample_t(self, n: int, device: torch.device | str) -> torch.Tensor:
        return torch.randint(0, self.diffusion.num_timesteps, (n,), device=device)

    def losses(self, model_fn: ModelFn, x_start: torch.Tensor, t: torch.Tensor) -> dict[str, torch.Tensor]:
        terms = training_losses(self.diffusion, model_fn, x_start, t)
        if self.loss_weighting == "min-snr":
            w = gather(self._snr_weight, t, 1).reshape(-1)
            terms["loss"] = terms["loss"] - terms["mse"] + w * terms["mse"]
        return terms

    def sampler(self, name: str, num_steps: int, eta: float = 0.0) -> Sampler:
        check_sampler(self.settings(), name)
        return make_sampler(name, self.diffusion, num_steps, eta=eta)

    def settings(self) -> dict[str, Any]:
        out: dict[str, Any] = {"objective": "eps", "noise_schedule": self.noise_schedule,
                               "diffusion_steps": self.diffusion_steps, "learn_sigma": self.learn_sigma}
        if self.loss_weighting != "none":
            out |= {"loss_weighting": self.loss_weighting, "min_snr_gamma": self.min_snr_gamma}
        return out


class FlowObjective:
    """The linear-interpolant velocity objective (see the module docstring)."""

    name = "flow"

    def __init__(self, diffusion_steps: int = 1000, timestep_sampling: str = "logit-normal",
                 logit_mean: float = 0.0, logit_std: float = 1.0, sample_shift: float = 1.0):
        self.flow = FlowMatching(float(diffusion_steps), timestep_sampling, logit_mean, logit_std)
        self.diffusion_steps = int(diffusion_steps)
        if not sample_shift > 0:
            raise ValueError(f"sample_shift={sample_shift} must be > 0")
        self.sample_shift = float(sample_shift)

    def sample_t(self, n: int, device: torch.device | str) -> torch.Tensor:
        return self.flow.sample_t(n, device)

    def losses(self, model_fn: ModelFn, x_start: torch.Tensor, t: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.flow.losses(model_fn, x_start, t)

    def sampler(self, name: str, num_steps: int, eta: float = 0.0) -> Sampler:
        check_sampler(self.settings(), name)
        return FLOW_SAMPLERS[name](self.flow, int(num_steps), shift=self.sample_shift)

    def settings(self) -> dict[str, Any]:
        f = self.flow
        return {"objective": "flow", "diffusion_steps": self.diffusion_steps, "learn_sigma": False,
                "timestep_sampling": f.timestep_sampling, "logit_mean": f.logit_mean, "logit_std": f.logit_std,
                "sample_shift": self.sample_shift}


class MeanFlowObjective:
    """The average-velocity objective (see the module docstring and ``dit_core.diffusion.meanflow``)."""

    name = "meanflow"

    def __init__(self, settings: MeanFlowSettings | None = None, sample_shift: float = 1.0):
        self.meanflow = MeanFlow(settings)
        if not sample_shift > 0:
            raise ValueError(f"sample_shift={sample_shift} must be > 0")
        self.sample_shift = float(sample_shift)   # the flow samplers' only

    def sample_t(self, n: int, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
        """(r, t): the interval of each sample, t >= r (``MeanFlow.sample_times``)."""
        return self.meanflow.sample_times(n, device)

    def losses(self, model_fn: MeanFlowModelFn, x_start: torch.Tensor, times: tuple[torch.Tensor, torch.Tensor],
               y: torch.Tensor, null_class: int, class_dropout_prob: float, noise: torch.Tensor | None = None,
               jvp_fn: MeanFlowModelFn | None = None) -> dict[str, torch.Tensor]:
        return self.meanflow.losses(model_fn, x_start, times, y, null_class, class_dropout_prob, noise, jvp_fn)

    def sampler(self, name: str, num_steps: int, eta: float = 0.0) -> Sampler:
        check_sampler(self.settings(), name)
        if name == MEANFLOW_SAMPLER:
            return MeanFlowSampler(self.meanflow, int(num_steps))
        return FLOW_SAMPLERS[name](self.meanflow.flow, int(num_steps), shift=self.sample_shift)

    def settings(self) -> dict[str, Any]:
        s = self.meanflow.settings
        scale = int(s.time_scale) if float(s.time_scale).is_integer() else s.time_scale   # 0.5 stays 0.5
        out = {"objective": "meanflow", "diffusion_steps": scale, "learn_sigma": False, **s.to_dict(),
               "sample_shift": self.sample_shift}
        del out["time_scale"]   # recorded as diffusion_steps, as the flow objective records it
        return out


Objective = EpsObjective | FlowObjective | MeanFlowObjective


def make_objective(settings: Mapping[str, Any] | None = None, learn_sigma: bool | None = None) -> Objective:
    """The objective a ``diffusion`` record describes (its missing keys: the paper's defaults).
    ``learn_sigma``: the model's own, where the record predates that key."""
    s = dict(settings or {})
    name = objective_name(s)
    sampling = str(s.get("timestep_sampling", "uniform" if name == "eps" else "logit-normal"))
    if name == "eps" and sampling != "uniform":
        raise ValueError(f"timestep_sampling={sampling!r} is for objective 'flow'; objective 'eps' (the paper's) draws "
                         "its timesteps uniformly: set timestep_sampling: uniform, or objective: flow")
    if name == "flow" and s.get("loss_weighting", "none") != "none":
        raise ValueError(f"loss_weighting={s['loss_weighting']!r} is for objective 'eps'; set loss_weighting: none with objective 'flow'")
    if name == "meanflow":
        if s.get("learn_sigma") or learn_sigma:
            raise ValueError("objective 'meanflow' predicts an average velocity and learns no variance; set learn_sigma: false")
        if s.get("loss_weighting", "none") != "none":
            raise ValueError(f"loss_weighting={s['loss_weighting']!r} is for objective 'eps'; objective 'meanflow' "
                             "weights its loss adaptively (weight_power, weight_eps): set loss_weighting: none")
        defaults = MeanFlowSettings()
        fields = {k: type(getattr(defaults, k))(s[k]) for k in defaults.to_dict() if k in s and k != "time_scale"}
        settings_ = MeanFlowSettings(time_scale=float(s.get("diffusion_steps", defaults.time_scale)), **fields)
        return MeanFlowObjective(settings_, float(s.get("sample_shift", 1.0)))
    if name == "flow":
        if s.get("learn_sigma") or learn_sigma:
            raise ValueError("objective 'flow' predicts a velocity and learns no variance; set learn_sigma: false")
        return FlowObjective(int(s.get("diffusion_steps", 1000)), sampling,
                             float(s.get("logit_mean", 0.0)), float(s.get("logit_std", 1.0)), float(s.get("sample_shift", 1.0)))
    return EpsObjective(str(s.get("noise_schedule", "linear")), int(s.get("diffusion_steps", 1000)),
                        bool(learn_sigma if learn_sigma is not None else s.get("learn_sigma", True)),
                        str(s.get("loss_weighting", "none")), float(s.get("min_snr_gamma", 5.0)))


__all__ = ["ALL_SAMPLERS", "LOSS_WEIGHTINGS", "MEANFLOW_SAMPLER", "OBJECTIVES", "SAMPLERS_BY_OBJECTIVE",
           "TIMESTEP_SAMPLING", "EpsObjective", "FlowObjective", "MeanFlowObjective", "Objective", "check_sampler",
           "guidance_learned", "make_objective", "objective_name", "sampling_guidance"]

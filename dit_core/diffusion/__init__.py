"""Gaussian diffusion split by concept: the schedule, the training loss, the samplers."""

from .flow import FLOW_SAMPLERS, FlowDPMSolverPPSampler, FlowEulerSampler, FlowHeunSampler, FlowMatching, flow_times
from .losses import training_losses, vb_terms_bpd
from .samplers import (
    SAMPLERS,
    DDIMSampler,
    DDPMSampler,
    DPMSolverPPSampler,
    Sampler,
    ModelFn,
    make_sampler,
    randn,
    sample_loop,
)
from .objectives import (
    ALL_SAMPLERS,
    OBJECTIVES,
    SAMPLERS_BY_OBJECTIVE,
    EpsObjective,
    FlowObjective,
    Objective,
    check_sampler,
    make_objective,
    objective_name,
)
from .schedule import GaussianDiffusion, create_diffusion, make_betas, respace, space_timesteps

__all__ = [
    "ALL_SAMPLERS",
    "FLOW_SAMPLERS",
    "OBJECTIVES",
    "SAMPLERS_BY_OBJECTIVE",
    "EpsObjective",
    "FlowDPMSolverPPSampler",
    "FlowEulerSampler",
    "FlowHeunSampler",
    "FlowMatching",
    "FlowObjective",
    "Objective",
    "check_sampler",
    "flow_times",
    "make_objective",
    "objective_name",
    "SAMPLERS",
    "DDIMSampler",
    "DDPMSampler",
    "DPMSolverPPSampler",
    "GaussianDiffusion",
    "Sampler",
    "create_diffusion",
    "make_betas",
    "ModelFn",
    "make_sampler",
    "randn",
    "respace",
    "sample_loop",
    "space_timesteps",
    "training_losses",
    "vb_terms_bpd",
]

"""Gaussian diffusion split by concept: the schedule, the training loss, the samplers."""

from .losses import training_losses, vb_terms_bpd
from .samplers import (
    SAMPLERS,
    DDIMSampler,
    DDPMSampler,
    DPMSolverPPSampler,
    Sampler,
    make_model_fn,
    make_sampler,
    randn,
    sample_loop,
)
from .schedule import GaussianDiffusion, create_diffusion, make_betas, respace, space_timesteps

__all__ = [
    "SAMPLERS",
    "DDIMSampler",
    "DDPMSampler",
    "DPMSolverPPSampler",
    "GaussianDiffusion",
    "Sampler",
    "create_diffusion",
    "make_betas",
    "make_model_fn",
    "make_sampler",
    "randn",
    "respace",
    "sample_loop",
    "space_timesteps",
    "training_losses",
    "vb_terms_bpd",
]

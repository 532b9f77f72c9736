"""The image-generation pipeline: a DiT, a sampler and an autoencoder -> images (as diffusers'
``DiTPipeline``), in plain PyTorch. It is the only generator: the bulk job's actors
(``ray_jobs.sample``), the MLflow pyfunc model and ``dit generate`` all call ``ImagePipeline``, so
that one (label, seed, settings) gives one image wherever it is asked for.

Beside it, what every caller shares: the sampling settings (checked once, when they are made), the
classifier-free guidance binding of a DiT to a sampler's model function (guidance belongs to the
pipeline, as in diffusers; ``dit_core.diffusion`` knows no model), the per-image seeds and class
labels of a run, and the autoencoder that fits a model.

Seeds: image i's noise comes only from ``torch.Generator().manual_seed(seed_i)``, its own seed
(the bulk job's ``seed`` column: ``image_seed(run seed, i)``).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping, Sequence, TypeVar

import numpy as np
import torch

from dit_core.autoencoders import Autoencoder, load_autoencoder
from dit_core.contract import AUTOENCODER_RECORD_FILE
from dit_core.data import to_uint8
from dit_core.diffusion import (ALL_SAMPLERS, MEANFLOW_SAMPLER, ModelFn, Sampler, check_sampler, make_objective, objective_name,
                                randn, sample_loop, sampling_guidance)
from dit_core.models import BlockCache, DiT, DiTConfig
from dit_core.settings import SettingError

MAX_SEED = 2**63 - 1   # torch.Generator.manual_seed takes a 64-bit int; ours are non-negative
CLASS_LABEL_MODES = ("all", "uniform")


@dataclass(frozen=True)
class SamplingSettings:
    """How to sample, checked when made. These defaults are the ``sample`` settings' (the bulk job's
    ``SampleConfig`` extends this class; params.yaml repeats them). A registered model records them
    (its ``sampling``)."""

    sampler: str = "dpm-solver++"      # eps models: ddpm | ddim | dpm-solver++; flow models: euler | heun | dpm-solver++;
                                       # meanflow models: meanflow (1..k steps) and the flow ones
    num_steps: int = 20
    guidance_scale: float = 2.0        # 1: no guidance; ignored for meanflow models (guidance learned in training)
    eta: float = 0.0                   # ddim only
    guided_channels: int | None = None  # None: all latent channels; 3: the official variant
    cache_interval: int = 1            # >1: the blocks run on one step in this many

    def __post_init__(self) -> None:
        checks = (
            ("sampler", self.sampler in ALL_SAMPLERS, f"is unknown; choose one of {ALL_SAMPLERS}"),
            ("num_steps", int(self.num_steps) >= 1, "must be at least 1"),
            ("guidance_scale", float(self.guidance_scale) >= 0, "must be >= 0 (1 = no guidance)"),
            ("eta", float(self.eta) >= 0, "must be >= 0 (0: deterministic DDIM)"),
            ("guided_channels", self.guided_channels is None or int(self.guided_channels) >= 1,
             "must be at least 1, or None for all latent channels"),
            ("cache_interval", int(self.cache_interval) >= 1, "must be at least 1 (1 = no caching)"),
        )
        for key, ok, problem in checks:
            if not ok:
                value = getattr(self, key)
                raise SettingError(key, value, problem, f"sampler {value!r} {problem}" if key == "sampler" else f"{key}={value} {problem}")


def check_sampling(objective: Any, settings: SamplingSettings) -> None:
    """Refuse settings that a model of ``objective`` (``make_objective`` of its diffusion record)
    cannot sample with, a sampler of another objective: a SettingError naming the setting (a
    guidance scale a MeanFlow model takes none of is ignored with a warning: ``fit_sampling``)."""
    check_sampler(objective.settings(), settings.sampler)


def check_seed(seed: Any) -> int:
    """A per-image seed as an int, or a SettingError: an integer in [0, MAX_SEED]."""
    whole = isinstance(seed, (int, np.integer)) or (isinstance(seed, (float, np.floating)) and float(seed).is_integer())
    if isinstance(seed, (bool, np.bool_)) or not whole or not 0 <= int(seed) <= MAX_SEED:
        raise SettingError("seed", seed, "is not a seed: give an integer in [0, 2**63 - 1]")
    return int(seed)


# The sampling defaults a model of these objectives records (where they differ from SamplingSettings'):
# a meanflow model samples in one evaluation with the guidance it learned
OBJECTIVE_SAMPLING: dict[str, dict[str, Any]] = {"meanflow": {"sampler": MEANFLOW_SAMPLER, "num_steps": 1, "guidance_scale": 1.0}}

S = TypeVar("S", bound=SamplingSettings)


def objective_sampling(diffusion: Mapping[str, Any] | None) -> dict[str, Any]:
    """The sampling settings a model with this ``diffusion`` record takes by default, beyond SamplingSettings'."""
    return dict(OBJECTIVE_SAMPLING.get(objective_name(diffusion), {}))


def fit_sampling(diffusion: Mapping[str, Any] | None, settings: S) -> S:
    """``settings`` as a model with this ``diffusion`` record samples them: a sampler its objective
    has no use for is refused; a guidance scale it takes none of (its guidance was learned in
    training: meanflow) is ignored, with a warning that names the setting and what to do."""
    check_sampler(diffusion, settings.sampler)
    scale, why = sampling_guidance(diffusion, settings.guidance_scale)
    if why is None:
        return settings
    warnings.warn(why, stacklevel=2)
    return replace(settings, guidance_scale=scale)


def make_model_fn(
    model: DiT,
    class_labels: torch.Tensor,
    guidance_scale: float = 1.0,
    guided_channels: int | None = None,
    cache_interval: int = 1,
) -> ModelFn:
    """Bind labels (and classifier-free guidance, batched in one pass) to a DiT: the sampler's
    (x_t, t[, r]) -> output (r: the interval starts of an average-velocity sampler, MeanFlow's).
    ``cache_interval`` > 1 runs the transformer blocks on one step in that many and reuses their
    residual in between (``BlockCache``); build one function per trajectory. The values are
    ``SamplingSettings``'s, checked there."""
    cache = BlockCache(cache_interval) if int(cache_interval) != 1 else None
    if guidance_scale == 1.0:
        def plain(x: torch.Tensor, t: torch.Tensor, r: torch.Tensor | None = None) -> torch.Tensor:
            extra = {"r": r} if r is not None else {}   # models without a second time input keep their signature
            return model(x, t, class_labels, cache, **extra) if cache is not None else model(x, t, class_labels, **extra)
        return plain

    def guided(x: torch.Tensor, t: torch.Tensor, r: torch.Tensor | None = None) -> torch.Tensor:
        if r is not None:   # u-space guidance is not the average of the guided velocity (fit_sampling drops it)
            raise ValueError(f"guidance_scale={guidance_scale} with an average-velocity sampler: pass 1")
        return model.forward_with_cfg(x, t, class_labels, guidance_scale, guided_channels, cache)
    return guided


# ---------------------------------------------------------------------------------------------
# A run's rows: per-image seeds and class labels
# ---------------------------------------------------------------------------------------------

def image_seed(seed: int, index: int) -> int:
    """A 63-bit seed for image ``index`` of a run with ``seed``; independent across indices."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0] >> 1)


def class_labels_for(class_labels: Sequence[int] | str, num_images: int, num_classes: int, seed: int = 0) -> np.ndarray:
    """The class label of each of ``num_images`` images: ``"all"`` cycles through the classes,
    ``"uniform"`` draws them (seeded by ``seed``), a list is cycled through."""
    if class_labels == "all":
        return np.arange(num_images) % num_classes
    if class_labels == "uniform":
        return np.random.default_rng(seed).integers(0, num_classes, num_images)
    if isinstance(class_labels, str):
        raise ValueError(f"class_labels={class_labels!r}; use 'all', 'uniform' or a list of class ids")
    labels = np.asarray(list(class_labels), dtype=np.int64)
    if labels.size == 0:
        raise ValueError("class_labels is an empty list; give labels, 'all' or 'uniform'")
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if bad.size:
        raise ValueError(f"class labels {sorted(set(bad.tolist()))} are out of range: the model has {num_classes} classes (0..{num_classes - 1})")
    return labels[np.arange(num_images) % labels.size]


# ---------------------------------------------------------------------------------------------
# The autoencoder that fits a model
# ---------------------------------------------------------------------------------------------

def load_fitting_autoencoder(folder: str | os.PathLike, model_config: DiTConfig, scale_factor: float | None = None,
                             name: str | None = None) -> tuple[Autoencoder, float]:
    """The autoencoder in the local ``folder`` (or a hub id in the local cache) and the latent scale
    factor (``scale_factor``, else the autoencoder's own), refused when it does not fit the model:
    other latent channels, or (one trained here, for one image size) another image size. Errors
    name the autoencoder as ``name`` (default: the folder)."""
    name = str(folder) if name is None else name
    ae = load_autoencoder(folder)
    ours = Path(folder, AUTOENCODER_RECORD_FILE).is_file()   # trained here, for one image size
    scale = scale_factor or getattr(ae, "scale_factor", None)
    if not scale:
        raise ValueError(f"no latent scale factor for autoencoder {name!r}; pass --scale-factor")
    latent_channels = getattr(ae, "latent_channels", model_config.in_channels)
    if latent_channels != model_config.in_channels:
        raise ValueError(
            f"the model takes {model_config.in_channels}-channel latents but autoencoder {name!r} makes {latent_channels}; "
            "use the autoencoder the model was trained with"
        )
    size, trained_for = model_config.input_size, ae.record.image_size
    if ours and trained_for and trained_for != size * ae.downsample:
        raise ValueError(
            f"the model makes {size}x{size} latents, which autoencoder {name!r} (downsample "
            f"{ae.downsample}) decodes to {size * ae.downsample}px images, but it was trained on "
            f"{trained_for}px images; use the autoencoder the model was trained with"
        )
    return ae, float(scale)


# ---------------------------------------------------------------------------------------------
# The pipeline
# ---------------------------------------------------------------------------------------------

class ImagePipeline:
    """A DiT, its autoencoder and latent scale, loaded once: (class labels, per-image seeds,
    settings) in, uint8 NHWC images out. ``diffusion``: the training's ``noise_schedule`` and
    ``diffusion_steps`` (defaults: linear, 1000)."""

    def __init__(self, model: DiT, autoencoder: Any, scale_factor: float, diffusion: Mapping[str, Any] | None = None,
                 device: torch.device | str | None = None, bf16: bool = True):
        self.device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = model.eval().to(self.device)
        self.autoencoder = autoencoder.to(self.device)
        self.scale_factor = float(scale_factor)
        self.bf16 = bf16
        self.objective = make_objective(diffusion, learn_sigma=self.model.config.learn_sigma)
        self._samplers: dict[tuple[str, int, float], Sampler] = {}

    @property
    def num_classes(self) -> int:
        return self.model.config.num_classes

    def sampler(self, settings: SamplingSettings) -> Sampler:
        key = (settings.sampler, int(settings.num_steps), float(settings.eta))
        if key not in self._samplers:  # samplers reset per trajectory: one per setting is enough
            self._samplers[key] = self.objective.sampler(settings.sampler, int(settings.num_steps), eta=float(settings.eta))
        return self._samplers[key]

    def check_labels(self, labels: Sequence[int]) -> None:
        bad = sorted({int(c) for c in labels if not 0 <= int(c) < self.num_classes})
        if bad:
            raise ValueError(f"class labels {bad} are out of range: the model has {self.num_classes} classes (0..{self.num_classes - 1})")

    def generate(self, labels: Sequence[int], seeds: Sequence[int], settings: SamplingSettings, batch_size: int = 250) -> np.ndarray:
        """uint8 (N, H, W, 3) images, image i from ``labels[i]`` and the noise of ``seeds[i]`` alone,
        drawn ``batch_size`` at a time, with ``settings`` as the model takes them (``fit_sampling``)."""
        settings = fit_sampling(self.objective.settings(), settings)
        labels, seeds = [int(c) for c in labels], [check_seed(s) for s in seeds]
        if len(labels) != len(seeds):
            raise ValueError(f"{len(labels)} labels for {len(seeds)} seeds; give one seed per image")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size={batch_size} must be at least 1")
        self.check_labels(labels)
        mc, sampler = self.model.config, self.sampler(settings)
        out = []
        for start in range(0, len(labels), batch_size):
            y = torch.as_tensor(labels[start:start + batch_size], dtype=torch.long, device=self.device)
            gens = [torch.Generator().manual_seed(s) for s in seeds[start:start + batch_size]]
            noise = randn((len(gens), mc.in_channels, mc.input_size, mc.input_size), gens, self.device)
            fn = make_model_fn(self.model, y, float(settings.guidance_scale), settings.guided_channels, int(settings.cache_interval))
            autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda" and self.bf16)
            with torch.no_grad(), autocast:
                latents = sample_loop(sampler, fn, noise, gens)
                images = self.autoencoder.decode(latents / self.scale_factor)
            out.append(to_uint8(images))
        if not out:
            side = mc.input_size * getattr(self.autoencoder, "downsample", 1)
            return np.zeros((0, side, side, 3), np.uint8)
        return np.concatenate(out)


__all__ = ["CLASS_LABEL_MODES", "MAX_SEED", "OBJECTIVE_SAMPLING", "ImagePipeline", "SamplingSettings", "check_sampling", "check_seed",
           "class_labels_for", "fit_sampling", "image_seed", "load_fitting_autoencoder", "make_model_fn", "objective_sampling"]

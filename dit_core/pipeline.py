"""The image-generation pipeline: a DiT, a sampler and an autoencoder -> images (as diffusers'
``DiTPipeline``), in plain PyTorch. The MLflow pyfunc model and ``dit generate`` use it; it computes
what the bulk sampler's ``ImageSampler`` computes, so that one (label, seed, settings) gives one image.

Seeds: image i's noise comes only from ``torch.Generator().manual_seed(seed_i)``, its own seed
(the bulk sampler's ``seed`` column; ``image_seed(run seed, i)`` there).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from dit_core.data import to_uint8
from dit_core.diffusion import ALL_SAMPLERS, Sampler, check_guidance, make_model_fn, make_objective, randn, sample_loop
from dit_core.models import DiT

MAX_SEED = 2**63 - 1   # torch.Generator.manual_seed takes a 64-bit int; ours are non-negative


@dataclass(frozen=True)
class SamplingSettings:
    """How to sample. These defaults are the ``sample`` settings' (``ray_jobs.sample.SampleConfig``,
    params.yaml); a test keeps them equal. A registered model records them (its ``sampling``)."""

    sampler: str = "dpm-solver++"      # eps models: ddpm | ddim | dpm-solver++; flow models: euler | heun | dpm-solver++;
                                       # meanflow models: meanflow (1..k steps) and the flow ones, guidance_scale 1
    num_steps: int = 20
    guidance_scale: float = 2.0        # 1: no guidance
    eta: float = 0.0                   # ddim only
    guided_channels: int | None = None  # None: all latent channels; 3: the official variant
    cache_interval: int = 1            # >1: the blocks run on one step in this many

    def check(self) -> None:
        if self.sampler not in ALL_SAMPLERS:
            raise ValueError(f"sampler {self.sampler!r} is unknown; choose one of {ALL_SAMPLERS}")
        if int(self.num_steps) < 1:
            raise ValueError(f"num_steps={self.num_steps} must be at least 1")
        if not float(self.guidance_scale) >= 0:
            raise ValueError(f"guidance_scale={self.guidance_scale} must be >= 0 (1 = no guidance)")
        if int(self.cache_interval) < 1:
            raise ValueError(f"cache_interval={self.cache_interval} must be at least 1 (1 = no caching)")


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
        """uint8 (N, H, W, 3) images, image i from ``labels[i]`` and the noise of ``seeds[i]`` alone."""
        settings.check()
        check_guidance(self.objective.settings(), settings.guidance_scale)
        labels, seeds = [int(c) for c in labels], [int(s) for s in seeds]
        if len(labels) != len(seeds):
            raise ValueError(f"{len(labels)} labels for {len(seeds)} seeds; give one seed per image")
        self.check_labels(labels)
        bad = [s for s in seeds if not 0 <= s <= MAX_SEED]
        if bad:
            raise ValueError(f"seeds {bad[:5]} are out of range: a seed is an integer in [0, 2**63 - 1]")
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


__all__ = ["MAX_SEED", "ImagePipeline", "SamplingSettings"]

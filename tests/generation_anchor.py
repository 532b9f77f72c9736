"""The generation regression anchor: a tiny seeded DiT and a tiny autoencoder, sampled in a fixed
set of cases (eps and flow objectives, several samplers, guidance 1 and 2, the official 3-channel
guidance, block caching). ``python -m tests.generation_anchor`` prints the sha256 of each case's
uint8 images; tests/test_generation_anchor.py holds the digests the code gave before the generators
were merged into one (this script at commit 6307833 printed them for both of the old generators),
and checks that today's pipeline gives the same bytes.

Run on one CPU thread: a matmul split over threads may add in another order.
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable

import numpy as np
import torch

from dit_core.autoencoders import Autoencoder, AutoencoderRecord, SmallAutoencoderConfig, build_small_autoencoder
from dit_core.models import DiT, DiTConfig

IMAGE_SIZE = 8
NUM_CLASSES = 3
SCALE = 0.7
LABELS = [0, 1, 2, 1, 0]
RUN_SEED = 7                 # the images' seeds: image_seed(RUN_SEED, i), as the bulk job's rows
BATCH_SIZE = 3               # two batches: 3 + 2
EPS = {"objective": "eps", "noise_schedule": "linear", "diffusion_steps": 1000, "learn_sigma": True}
FLOW = {"objective": "flow", "diffusion_steps": 1000, "learn_sigma": False}

# name -> (diffusion record, sampling settings)
CASES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "eps-ddpm-g1": (EPS, {"sampler": "ddpm", "num_steps": 6, "guidance_scale": 1.0}),
    "eps-ddim-g2": (EPS, {"sampler": "ddim", "num_steps": 6, "guidance_scale": 2.0}),
    "eps-ddim-eta-g2": (EPS, {"sampler": "ddim", "num_steps": 6, "guidance_scale": 2.0, "eta": 0.5}),
    "eps-dpm-g1": (EPS, {"sampler": "dpm-solver++", "num_steps": 6, "guidance_scale": 1.0}),
    "eps-dpm-g2": (EPS, {"sampler": "dpm-solver++", "num_steps": 6, "guidance_scale": 2.0}),
    "eps-dpm-g2-official": (EPS, {"sampler": "dpm-solver++", "num_steps": 6, "guidance_scale": 2.0, "guided_channels": 3}),
    "eps-dpm-g2-cache2": (EPS, {"sampler": "dpm-solver++", "num_steps": 6, "guidance_scale": 2.0, "cache_interval": 2}),
    "flow-euler-g1": (FLOW, {"sampler": "euler", "num_steps": 5, "guidance_scale": 1.0}),
    "flow-heun-g2": (FLOW, {"sampler": "heun", "num_steps": 5, "guidance_scale": 2.0}),
    "flow-dpm-g1": (FLOW, {"sampler": "dpm-solver++", "num_steps": 5, "guidance_scale": 1.0}),
    "flow-dpm-g2": (FLOW, {"sampler": "dpm-solver++", "num_steps": 5, "guidance_scale": 2.0}),
}


def tiny_dit(learn_sigma: bool) -> DiT:
    """A DiT with random (not adaLN-Zero) weights, so that its images depend on everything."""
    config = DiTConfig(input_size=IMAGE_SIZE // 2, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2,
                       num_classes=NUM_CLASSES, learn_sigma=learn_sigma)
    torch.manual_seed(0)
    model = DiT(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model.eval()


def tiny_autoencoder() -> Autoencoder:
    cfg = SmallAutoencoderConfig(latent_channels=4, block_channels=(8, 16), layers_per_block=1, norm_num_groups=8)  # the groups the builder chose before norm_num_groups was a setting
    torch.manual_seed(0)
    return Autoencoder(build_small_autoencoder(cfg, IMAGE_SIZE), AutoencoderRecord("tiny", SCALE, 4, cfg.downsample, IMAGE_SIZE))


def digest(images: np.ndarray) -> str:
    assert images.dtype == np.uint8 and images.shape == (len(LABELS), IMAGE_SIZE, IMAGE_SIZE, 3), images.shape
    return hashlib.sha256(np.ascontiguousarray(images).tobytes()).hexdigest()


Generate = Callable[[DiT, Autoencoder, dict[str, Any], dict[str, Any]], np.ndarray]


def digests(generate: Generate) -> dict[str, str]:
    """Each case's digest, with ``generate(model, autoencoder, diffusion, sampling)`` -> uint8 images."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ae = tiny_autoencoder()
        models = {True: tiny_dit(True), False: tiny_dit(False)}
        return {name: digest(generate(models[diffusion["learn_sigma"]], ae, diffusion, sampling))
                for name, (diffusion, sampling) in CASES.items()}
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    import json

    from tests.test_generation_anchor import pipeline_images

    print(json.dumps(digests(pipeline_images), indent=2))

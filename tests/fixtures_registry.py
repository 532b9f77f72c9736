"""A registered tiny model on a real MLflow SQLite registry, as the training job leaves it: version 1
of ``dit-digits`` (10 classes, a small autoencoder bundled), alias ``champion``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from dit_core.autoencoders import Autoencoder, AutoencoderRecord, SmallAutoencoderConfig, build_small_autoencoder, save_autoencoder
from dit_core.models import DiT, DiTConfig

NAME = "dit-digits"                   # the README's name: its examples run as written
IMAGE_SIZE = 8
TINY10 = DiTConfig(input_size=IMAGE_SIZE // 2, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=10)
CLASS_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
SAMPLING = {"sampler": "ddim", "num_steps": 4, "guidance_scale": 2.0}   # few steps: quick tests


def random_dit(config: DiTConfig, seed: int = 0) -> DiT:
    """A DiT with random (not adaLN-Zero) weights, so that its images depend on everything."""
    torch.manual_seed(seed)
    model = DiT(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model.eval()


def save_tiny_autoencoder(folder: Path) -> None:
    """A small autoencoder of IMAGE_SIZE images into 4-channel latents of half the size (scale 0.7)."""
    cfg = SmallAutoencoderConfig(latent_channels=4, block_channels=(8, 16), layers_per_block=1, norm_num_groups=8)
    torch.manual_seed(0)
    ae = Autoencoder(build_small_autoencoder(cfg, IMAGE_SIZE), AutoencoderRecord("tiny", 0.7, 4, cfg.downsample, IMAGE_SIZE))
    save_autoencoder(ae, folder)


def register_tiny_model(root: Path) -> dict[str, Any]:
    """Register version 1 of ``NAME`` in the MLflow registry of ``MLFLOW_TRACKING_URI`` (set by the caller)."""
    from mlflow import MlflowClient

    from ray_jobs import tracking

    save_tiny_autoencoder(root / "autoencoder")
    model = random_dit(TINY10)
    tracking.configure_tracking()
    MlflowClient().create_experiment("registry-test", artifact_location=(root / "artifacts").as_uri())  # not ./mlruns
    run_id = tracking.start_run("registry-test", "tiny")
    info = {"model_config": TINY10.to_dict(), "diffusion": {"noise_schedule": "linear", "diffusion_steps": 1000},
            "latents": {"autoencoder_path": str(root / "autoencoder"), "scale_factor": 0.7, "class_names": CLASS_NAMES,
                        "num_classes": 10},
            "sampling": SAMPLING}
    version = tracking.log_model(run_id, model, NAME, model_info=info, tags={"preset": "custom"}, step=3)
    tracking.finish_run(run_id)
    MlflowClient().set_registered_model_alias(NAME, "champion", version)
    return {"version": version, "run_id": run_id, "model": model, "autoencoder": str(root / "autoencoder"),
            "tracking_uri": os.environ["MLFLOW_TRACKING_URI"], "root": root}

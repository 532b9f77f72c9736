"""train_autoencoder stage: the autoencoder folder that ``encode`` uses (docs/CONTRACTS.md).

- ``train_autoencoder.pretrained: null`` (default): train a small diffusers ``AutoencoderKL`` on the
  prepared training split; its scale factor is 1/std of its posterior means on that split.
- ``pretrained: <folder or HF id>``: import a pretrained ``AutoencoderKL`` (e.g.
  ``stabilityai/sd-vae-ft-ema`` from the local Hugging Face cache, offline) with its own scale factor,
  so the exact weights used are tracked by DVC like any other output.

    python -m pipelines.train_autoencoder --prepared data/prepared --out models/autoencoder \
        --metrics metrics/autoencoder.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from dit_core.autoencoders import (
    Autoencoder,
    SmallAutoencoderConfig,
    TrainConfig,
    data_scale_factor,
    load_autoencoder,
    reconstruction_quality,
    save_autoencoder,
    train_small_autoencoder,
)
from dit_core import settings
from dit_core.contract import AUTOENCODER_RECORD_FILE, COUNT_KEY, IMAGE_SIZE_KEY, SPLITS_KEY
from pipelines.common import StageIO, load_images, read_manifest, run_stage, stage_arguments
from ray_jobs import storage

SMALL_ID = "small-kl-f{downsample}c{channels}"  # the trained autoencoder's id, e.g. small-kl-f2c4
# Inputs whose bright (or dark) pixels have a mean saturation below this are about grey (JPEG noise
# on grey line art is ~0.01): a ratio of two such small figures says nothing, so it never warns.
GREY_SATURATION = 0.03


@dataclass(frozen=True)
class AutoencoderSettings:
    """The ``train_autoencoder`` settings (params.yaml repeats these defaults for DVC)."""

    pretrained: str | None = None        # None: train the small one; else a diffusers AutoencoderKL folder or HF id (local cache)
    scale_factor: float | str = "auto"   # auto: pretrained's own / 1/std of the trained one's latents; data: 1/std; or a number
    latent_channels: int = 4
    block_channels: list[int] = field(default_factory=lambda: [16, 32])  # downsample factor 2 ** (levels - 1)
    layers_per_block: int = 1
    norm_num_groups: int = 1             # GroupNorm groups; as many as channels is per-channel instance norm, which drops each image's colour
    steps: int = 800
    batch_size: int = 32
    lr: float = 0.001
    kl_weight: float = 1e-6
    deterministic: bool = False          # true: decode the posterior mean in training, latents with std 0 (false: a sample, the SD VAE's way)
    seed: int = 0
    max_images: int = 20000              # training subset (seeded) on large data sets
    eval_batch_size: int = 256
    eval_max_images: int = 2000          # val subset for the reconstruction metric
    warn_saturation_ratio: float = 0.8   # warn when val reconstructions keep less of the inputs' saturation (bright or dark pixels)

    def __post_init__(self) -> None:
        if not 0 <= self.warn_saturation_ratio <= 1:
            raise ValueError(
                f"train_autoencoder.warn_saturation_ratio={self.warn_saturation_ratio} is not a share: use a number "
                f"in [0, 1] (0 never warns; 0.8 warns when reconstructions keep under 80% of the inputs' saturation)"
            )


def resolve_scale(ae: Autoencoder, setting: str | float, images: torch.Tensor | None, batch_size: int) -> float:
    """``auto``: the record's own (pretrained config / trained 1/std); ``data``: 1/std on ``images``;
    a number: that number."""
    if setting == "auto":
        return ae.scale_factor
    if setting == "data":
        if images is None:
            raise ValueError("scale_factor=data needs the training images")
        return data_scale_factor(ae, images, batch_size)
    try:
        return float(setting)
    except (TypeError, ValueError):
        raise ValueError(f"train_autoencoder.scale_factor={setting!r}: use auto, data or a number") from None


def build_autoencoder(prepared: str, params: dict[str, Any], log: Callable[[str], None] = print) -> tuple[Autoencoder, dict[str, Any]]:
    """The pure core of the stage: train or import, then measure on (a subset of) the val split."""
    params = asdict(settings.build(AutoencoderSettings, params, "train_autoencoder"))
    manifest = read_manifest(prepared)
    image_size = int(manifest[IMAGE_SIZE_KEY])
    seed, eval_batch, eval_images = int(params["seed"]), int(params["eval_batch_size"]), int(params["eval_max_images"])
    train_images: torch.Tensor | None = None
    if params["pretrained"]:
        ae = load_autoencoder(params["pretrained"])
        ae.latent_shape(image_size)  # fails early, naming both, if image_size does not fit
        metrics: dict[str, Any] = {"pretrained": str(params["pretrained"])}
    else:
        model = SmallAutoencoderConfig(
            latent_channels=int(params["latent_channels"]),
            block_channels=tuple(int(c) for c in params["block_channels"]),
            layers_per_block=int(params["layers_per_block"]),
            norm_num_groups=int(params["norm_num_groups"]),
        )
        train = TrainConfig(
            steps=int(params["steps"]), batch_size=int(params["batch_size"]), lr=float(params["lr"]),
            kl_weight=float(params["kl_weight"]), seed=seed, deterministic=bool(params["deterministic"]),
        )
        every = max(1, train.steps // 10)

        def progress(step: int, loss: float) -> None:
            if step % every == 0 or step == train.steps - 1:
                log(f"train_autoencoder: step {step}/{train.steps} loss {loss:.5f}")

        ae_id = SMALL_ID.format(downsample=model.downsample, channels=model.latent_channels)
        train_images = load_images(prepared, manifest, "train", int(params["max_images"]), seed)
        ae, metrics = train_small_autoencoder(train_images, model, train, ae_id, log=progress)
    if params["scale_factor"] == "data" and train_images is None:
        train_images = load_images(prepared, manifest, "train", int(params["max_images"]), seed)
    ae.record.scale_factor = resolve_scale(ae, params["scale_factor"], train_images, eval_batch)
    ae.record.image_size = image_size
    if manifest[SPLITS_KEY]["val"][COUNT_KEY]:
        val = load_images(prepared, manifest, "val", eval_images, seed)
        quality = reconstruction_quality(ae, val, eval_batch)
        metrics["val_reconstruction_mse"] = quality.pop("mse")
        quality["colour_ratio"] = {k: v if math.isfinite(v) else None for k, v in quality["colour_ratio"].items()}
        metrics.update(quality)
        for line in colour_warnings(quality, float(params["warn_saturation_ratio"])):
            log(line)
    metrics.update(scale_factor=ae.scale_factor, latent_shape=list(ae.latent_shape(image_size)), id=ae.id)
    return ae, metrics


def colour_warnings(quality: dict[str, Any], threshold: float) -> list[str]:
    """A line per saturation figure (bright, dark pixels) whose reconstruction keeps less than
    ``threshold`` of the inputs'; none where the inputs are about grey there (the ratio means nothing)."""
    lines = []
    for figure in ("saturation_bright", "saturation_dark"):
        want, ratio = quality["colour_input"][figure], quality["colour_ratio"][figure]
        if want >= GREY_SATURATION and ratio is not None and ratio < threshold:
            lines.append(
                f"train_autoencoder: WARNING the autoencoder loses colour: val reconstructions' {figure} is "
                f"{quality['colour_reconstruction'][figure]:.3f} against the inputs' {want:.3f} (ratio {ratio:.2f} < "
                f"warn_saturation_ratio {threshold}); the DiT's samples cannot be more colourful than this. Train it "
                f"longer (train_autoencoder.steps), keep norm_num_groups small (1; as many groups as channels drops "
                f"each image's colour), or use a pretrained autoencoder (train_autoencoder.pretrained)"
            )
    return lines


def write_version(ae: Autoencoder, staging: str) -> None:
    """Save into the version folder ``staging`` (local or s3://), the record last."""
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp, "autoencoder")
        save_autoencoder(ae, local)
        record = (local / AUTOENCODER_RECORD_FILE).read_bytes()
        (local / AUTOENCODER_RECORD_FILE).unlink()
        storage.upload_folder(local, staging)
        storage.write_bytes(storage.join(staging, AUTOENCODER_RECORD_FILE), record)


def main(argv: list[str] | None = None) -> int:
    flags = {"--prepared": "prepared data folder or s3:// URI", "--out": "autoencoder folder or s3:// URI",
             "--metrics": "JSON metrics file (local)"}
    _, a, params = stage_arguments(argv, __doc__, flags, AutoencoderSettings, "train_autoencoder", "steps=200",
                                  optional=("--metrics",), build=True)   # typed and sound before any work

    def core(job: argparse.Namespace) -> None:
        with storage.publishing(job.out, AUTOENCODER_RECORD_FILE) as staging:  # before training: a killed run leaves only this
            ae, metrics = build_autoencoder(job.prepared, params)
            write_version(ae, staging)
        if job.metrics:
            storage.write_bytes(job.metrics, (json.dumps(metrics, indent=2, sort_keys=True) + "\n").encode())
        print(f"train_autoencoder: {ae.id} scale_factor {ae.scale_factor:.5f} -> {job.out}; {metrics}")

    run_stage("train_autoencoder", a, StageIO(inputs=("prepared",), outputs=("out",), reports=("metrics",),
                                              settings_paths=lambda _: {"train_autoencoder.pretrained": params.get("pretrained")}), core)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Autoencoders that map images to DiT's latent space.

Two kinds, one interface (``Autoencoder``):
- a pretrained diffusers ``AutoencoderKL`` (e.g. stabilityai/sd-vae-ft-ema) from a local folder or
  the local Hugging Face cache; nothing is ever downloaded;
- a small ``AutoencoderKL`` trained here on the prepared data (the offline default).

The latent scale factor belongs to the autoencoder's record (``autoencoder.json``, see
docs/CONTRACTS.md): the pretrained one's own config value (0.18215 for the SD VAE) or 1/std of
the trained encoder's posterior means on the training images, so that scaled latents have unit
variance as the diffusion prior assumes.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable

import torch

from .contract import AUTOENCODER_RECORD_FILE
from .data import to_uint8
from .image_stats import ColourStats, colour_ratios



@dataclass
class AutoencoderRecord:
    """What a latent consumer must know about the autoencoder (``autoencoder.json``)."""

    id: str
    scale_factor: float
    latent_channels: int
    downsample: int
    image_size: int | None = None
    # a plain autoencoder (trained on its posterior means): its code is the mean, its std is 0.
    # False: a KL autoencoder whose latents are drawn from N(mean, std) (the SD VAE; old folders)
    deterministic: bool = False

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "AutoencoderRecord":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass(frozen=True)
class SmallAutoencoderConfig:
    """The small KL autoencoder trained on the prepared data; values come from params.yaml."""

    latent_channels: int
    block_channels: tuple[int, ...]  # one encoder level per entry; downsample = 2 ** (len - 1)
    layers_per_block: int
    # GroupNorm groups in every block. As many groups as channels is per-channel instance norm: it
    # removes each image's per-channel mean, i.e. its global colour (docs/data.md: colour)
    norm_num_groups: int

    def __post_init__(self) -> None:
        bad = [c for c in self.block_channels if self.norm_num_groups < 1 or c % self.norm_num_groups]
        if bad:
            raise ValueError(
                f"train_autoencoder.norm_num_groups={self.norm_num_groups} does not divide block_channels "
                f"{list(self.block_channels)} (GroupNorm splits each level's channels into equal groups); "
                f"use a positive divisor of every entry, e.g. 1"
            )

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.block_channels) - 1)


@dataclass(frozen=True)
class TrainConfig:
    steps: int
    batch_size: int
    lr: float
    kl_weight: float  # small: we want a near-deterministic code, the KL only keeps it bounded
    seed: int
    # decode the posterior mean in training (a plain autoencoder, as DC-AE) rather than a sample of
    # it (the SD VAE's way: the decoder learns to read codes near the mean, which the DiT draws)
    deterministic: bool = False


class Autoencoder:
    """A diffusers AutoencoderKL with its record. ``encode`` gives the posterior (mean, std) of
    *unscaled* latents; ``decode`` takes unscaled latents and returns images in [-1, 1]."""

    def __init__(self, vae: torch.nn.Module, record: AutoencoderRecord):
        self.vae = vae.eval()
        self.record = record

    @property
    def scale_factor(self) -> float:
        return self.record.scale_factor

    @property
    def latent_channels(self) -> int:
        return self.record.latent_channels

    @property
    def downsample(self) -> int:
        return self.record.downsample

    @property
    def id(self) -> str:
        return self.record.id

    def to(self, device: torch.device | str) -> "Autoencoder":
        self.vae.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def latent_shape(self, image_size: int) -> tuple[int, int, int]:
        if image_size % self.downsample:
            raise ValueError(
                f"image_size={image_size} is not a multiple of autoencoder {self.id!r}'s downsample factor "
                f"{self.downsample}; choose an image_size divisible by it"
            )
        side = image_size // self.downsample
        return (self.latent_channels, side, side)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images (N, 3, H, W) in [-1, 1] -> posterior mean, std (N, C, H/f, W/f), float32."""
        dist = self.vae.encode(images.to(self.device, self.dtype)).latent_dist
        if self.record.deterministic:
            return dist.mean.float(), torch.zeros_like(dist.mean, dtype=torch.float32)
        return dist.mean.float(), dist.std.float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Unscaled latents (N, C, h, w) -> images (N, 3, H, W) in [-1, 1], float32."""
        return self.vae.decode(latents.to(self.device, self.dtype)).sample.float().clamp(-1, 1)


def build_small_autoencoder(config: SmallAutoencoderConfig, image_size: int) -> torch.nn.Module:
    """A small diffusers AutoencoderKL: the SD architecture at toy width."""
    from diffusers import AutoencoderKL

    levels = len(config.block_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(config.block_channels),
        layers_per_block=config.layers_per_block,
        latent_channels=config.latent_channels,
        norm_num_groups=config.norm_num_groups,
        sample_size=image_size,
    )


def _downsample(vae: torch.nn.Module) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def save_autoencoder(ae: Autoencoder, path: str | os.PathLike) -> None:
    """Write the ``save_pretrained`` files and the record to a temporary folder, then rename it, so
    an interrupted save never leaves a folder that looks complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        ae.vae.save_pretrained(tmp)
        (tmp / AUTOENCODER_RECORD_FILE).write_text(json.dumps(asdict(ae.record), indent=2) + "\n")
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _published_folder(folder: Path) -> Path:
    """The version folder a published output's record names (``ray_jobs.storage.begin_output``'s
    layout), else ``folder`` itself (a plain diffusers folder, or one written before versions)."""
    record_path = folder / AUTOENCODER_RECORD_FILE
    if record_path.is_file():
        version = json.loads(record_path.read_text()).get("version")
        if version:
            return folder / version
    return folder


def load_autoencoder(path_or_id: str | os.PathLike, scale_factor: float | None = None) -> Autoencoder:
    """Load from a local diffusers folder or, for a hub id like ``stabilityai/sd-vae-ft-ema``,
    from the local Hugging Face cache only (never downloads). ``scale_factor`` overrides the record."""
    from diffusers import AutoencoderKL

    ref = str(path_or_id)
    local = _published_folder(Path(ref).expanduser())
    try:
        if local.is_dir():
            vae = AutoencoderKL.from_pretrained(local)
        else:
            vae = AutoencoderKL.from_pretrained(ref, local_files_only=True)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(
            f"autoencoder {ref!r} not found: there is no folder {str(local.absolute())!r} holding a diffusers "
            f"AutoencoderKL (config.json and weights; for models/autoencoder run the train_autoencoder stage), and no "
            f"Hugging Face model {ref!r} in the local Hugging Face cache (fetch it once on a machine with internet, "
            f"e.g. `hf download {ref}`, and copy ~/.cache/huggingface here). Nothing is downloaded at run time. "
            f"({type(e).__name__}: {e})"
        ) from e
    record_path = local / AUTOENCODER_RECORD_FILE
    if record_path.is_file():
        record = AutoencoderRecord.from_dict(json.loads(record_path.read_text()))
    else:
        # A pretrained autoencoder: its own config holds the scale (0.18215 for the SD VAE).
        record = AutoencoderRecord(
            id=ref,
            scale_factor=float(getattr(vae.config, "scaling_factor", 1.0)),
            latent_channels=int(vae.config.latent_channels),
            downsample=_downsample(vae),
            image_size=getattr(vae.config, "sample_size", None),
        )
    if scale_factor is not None:
        record.scale_factor = float(scale_factor)
    return Autoencoder(vae, record)


def kl_loss(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, e^logvar) || N(0, I)) per sample, summed over latent dimensions."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).flatten(1).sum(1)


@torch.no_grad()
def posterior_means(ae: Autoencoder, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([ae.encode(images[i:i + batch_size])[0] for i in range(0, len(images), batch_size)])


def data_scale_factor(ae: Autoencoder, images: torch.Tensor, batch_size: int) -> float:
    """1/std of the posterior means over all latent elements: scaled latents get unit variance."""
    return 1.0 / float(posterior_means(ae, images, batch_size).std())


@torch.no_grad()
def reconstruction_quality(ae: Autoencoder, images: torch.Tensor, batch_size: int) -> dict[str, Any]:
    """One pass over ``images`` (N, 3, H, W) in [-1, 1], decoding the posterior means: the mean squared
    error, and the colour statistics (``image_stats``) of the inputs, of the reconstructions, and
    the reconstructions' saturation figures as shares of the inputs' (1.0: as colourful)."""
    total = 0.0
    want, got = ColourStats(), ColourStats()
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size].to(ae.device)
        y = ae.decode(ae.encode(x)[0])
        total += float((y - x).pow(2).sum())
        want, got = want.merge(ColourStats.of(to_uint8(x))), got.merge(ColourStats.of(to_uint8(y)))
    colour_input, colour_reconstruction = want.means(), got.means()
    return {
        "mse": total / images.numel(),
        "colour_input": colour_input,
        "colour_reconstruction": colour_reconstruction,
        "colour_ratio": colour_ratios(colour_reconstruction, colour_input),
    }


def reconstruction_mse(ae: Autoencoder, images: torch.Tensor, batch_size: int) -> float:
    """Mean squared error (images in [-1, 1]) of decoding the posterior means."""
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            x = images[i:i + batch_size]
            total += float((ae.decode(ae.encode(x)[0]) - x.to(ae.device)).pow(2).sum())
    return total / images.numel()


def train_small_autoencoder(
    images: torch.Tensor,
    model: SmallAutoencoderConfig,
    train: TrainConfig,
    ae_id: str,
    log: Callable[[int, float], None] | None = None,
) -> tuple[Autoencoder, dict[str, float]]:
    """Train a small KL autoencoder on images (N, 3, H, W) in [-1, 1].

    Loss: pixel MSE of the decoded posterior mean (``deterministic``; else a posterior sample) +
    ``kl_weight`` * KL (the SD recipe without its perceptual and GAN terms, which matter little at
    this scale). The record's scale factor is 1/std of the posterior means on ``images``.
    """
    torch.manual_seed(train.seed)
    g = torch.Generator().manual_seed(train.seed)
    vae = build_small_autoencoder(model, int(images.shape[-1]))
    opt = torch.optim.Adam(vae.parameters(), lr=train.lr)
    vae.train()
    start = time.time()
    loss_value = float("nan")
    for step in range(train.steps):
        x = images[torch.randint(0, images.shape[0], (train.batch_size,), generator=g)]
        dist = vae.encode(x).latent_dist
        z = dist.mean if train.deterministic else dist.mean + dist.std * torch.randn(dist.mean.shape, generator=g)
        loss = (vae.decode(z).sample - x).pow(2).mean() + train.kl_weight * kl_loss(dist.mean, dist.logvar).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_value = float(loss.detach())
        if log is not None:
            log(step, loss_value)
    vae.eval()
    record = AutoencoderRecord(
        id=ae_id, scale_factor=1.0, latent_channels=model.latent_channels, downsample=model.downsample,
        image_size=int(images.shape[-1]), deterministic=train.deterministic,
    )
    ae = Autoencoder(vae, record)
    eval_batch = train.batch_size * 4
    record.scale_factor = data_scale_factor(ae, images, eval_batch)
    metrics = {
        "final_loss": loss_value,
        "train_reconstruction_mse": reconstruction_mse(ae, images, eval_batch),
        "scale_factor": record.scale_factor,
        "train_seconds": time.time() - start,
    }
    return ae, metrics

"""A small CNN classifier of the prepared images: its penultimate layer is the feature network of the
offline FID (when the Inception weights are not at hand, or the images are too small for them), and
its predictions score whether a generated image shows the class it was conditioned on."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .contract import CLASSIFIER_CONFIG_FILE, CLASSIFIER_WEIGHTS_FILE


ARCHITECTURES = ("pyramid", "two-stage")


@dataclass(frozen=True)
class ClassifierConfig:
    num_classes: int
    image_size: int
    in_channels: int = 3
    width: int = 32                 # channels of the first conv block (doubled in each next, up to 4x)
    feature_dim: int = 64           # the penultimate layer: FID features
    # pyramid: conv blocks down to 4x4 (one more per doubling of image_size), global average pool;
    # two-stage: two blocks and a 2x2 pool, the layout of classifiers saved before the record held it
    # (it overfits small colour sets: val accuracy 0.66 against the pyramid's 1.0, BENCHMARKS.md)
    architecture: str = "pyramid"

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"classifier architecture {self.architecture!r}: use one of {ARCHITECTURES} "
                             "(train_classifier.architecture)")


@dataclass(frozen=True)
class ClassifierTrainConfig:
    steps: int = 600
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 1e-4
    max_shift: int = 1              # random translation (pixels) as augmentation
    seed: int = 0


PYRAMID_FLOOR = 4                   # the pyramid stops downsampling at this size
SPATIAL_SIDE = 8                    # sFID map of the classifier: the last block output at least this big
SPATIAL_CHANNELS = 7                # its first channels, as ADM takes 7 of Inception's map


def _block(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU(),
            nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU()]


class Classifier(nn.Module):
    def __init__(self, config: ClassifierConfig):
        super().__init__()
        self.config = config
        w = config.width
        if config.architecture == "two-stage":
            layers = _block(config.in_channels, w) + [nn.MaxPool2d(2)] + _block(w, 2 * w) + [nn.AdaptiveAvgPool2d(2)]
            flat = 8 * w
        else:
            layers, channels, size = _block(config.in_channels, w), w, config.image_size
            while size > PYRAMID_FLOOR:
                wider = min(2 * channels, 4 * w)
                layers += [nn.MaxPool2d(2)] + _block(channels, wider)
                channels, size = wider, size // 2
            layers.append(nn.AdaptiveAvgPool2d(1))
            flat = channels
        self.body = nn.Sequential(*layers, nn.Flatten(), nn.Linear(flat, config.feature_dim), nn.SiLU())
        self.head = nn.Linear(config.feature_dim, config.num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) in [-1, 1] -> (N, feature_dim) penultimate activations."""
        if x.shape[-1] != self.config.image_size or x.shape[-2] != self.config.image_size:
            raise ValueError(
                f"images are {tuple(x.shape[-2:])}; the classifier was trained on "
                f"{self.config.image_size}x{self.config.image_size} (retrain it for this image size)"
            )
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def outputs(self, x: torch.Tensor, spatial_channels: int = SPATIAL_CHANNELS) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(N, C, H, W) in [-1, 1] -> features (N, feature_dim), logits (N, num_classes) and the sFID
        map: the last conv block's output at least SPATIAL_SIDE on a side (average-pooled down to
        SPATIAL_SIDE when larger), its first ``spatial_channels`` channels flattened, like ADM's
        first 7 channels of a 17x17 Inception map: (N, spatial_channels * SPATIAL_SIDE**2) at most."""
        self.features(x[:0])                                   # the image-size check, before any work
        layers = list(self.body)
        spatial = None
        for i, layer in enumerate(layers):
            x = layer(x)
            ends_block = i + 1 < len(layers) and isinstance(layers[i + 1], (nn.MaxPool2d, nn.AdaptiveAvgPool2d))
            if ends_block and (spatial is None or min(x.shape[-2:]) >= SPATIAL_SIDE):
                spatial = x
        if min(spatial.shape[-2:]) > SPATIAL_SIDE:
            spatial = F.adaptive_avg_pool2d(spatial, SPATIAL_SIDE)
        return x, self.head(x), spatial[:, :spatial_channels].flatten(1)


def _shift(x: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    if max_shift <= 0:
        return x
    dx, dy = (int(v) for v in torch.randint(-max_shift, max_shift + 1, (2,), generator=gen))
    return torch.roll(F.pad(x, [max_shift] * 4, value=-1.0), shifts=(dy, dx), dims=(2, 3))[..., max_shift:-max_shift, max_shift:-max_shift]


@torch.no_grad()
def accuracy(model: Classifier, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 512) -> float:
    model.eval()
    correct = 0
    for s in range(0, len(images), batch_size):
        correct += int((model(images[s:s + batch_size]).argmax(1) == labels[s:s + batch_size]).sum())
    return correct / max(len(images), 1)


def train_classifier(
    images: torch.Tensor,
    labels: torch.Tensor,
    model_config: ClassifierConfig,
    train_config: ClassifierTrainConfig,
) -> Classifier:
    """Train on (N, 3, H, W) images in [-1, 1] with integer labels; deterministic for a seed."""
    if len(images) != len(labels) or len(images) == 0:
        raise ValueError(f"{len(images)} images and {len(labels)} labels: need the same, non-zero number")
    bad = labels[(labels < 0) | (labels >= model_config.num_classes)]
    if bad.numel():
        raise ValueError(f"labels {sorted(set(bad.tolist()))} out of range for {model_config.num_classes} classes")
    torch.manual_seed(train_config.seed)
    gen = torch.Generator().manual_seed(train_config.seed)
    model = Classifier(model_config)
    opt = torch.optim.AdamW(model.parameters(), lr=train_config.lr, weight_decay=train_config.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=train_config.lr, total_steps=train_config.steps)
    model.train()
    for _ in range(train_config.steps):
        idx = torch.randint(0, len(images), (min(train_config.batch_size, len(images)),), generator=gen)
        x = _shift(images[idx], train_config.max_shift, gen)
        loss = F.cross_entropy(model(x), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


def save_classifier(model: Classifier, path: str | os.PathLike, extra: dict[str, Any] | None = None) -> None:
    """``path/classifier.pt`` (state dict) and ``path/classifier.json`` (config and ``extra``)."""
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), root / CLASSIFIER_WEIGHTS_FILE)
    (root / CLASSIFIER_CONFIG_FILE).write_text(json.dumps({"config": asdict(model.config), **(extra or {})}, indent=2, sort_keys=True) + "\n")


def load_classifier(path: str | os.PathLike) -> tuple[Classifier, dict[str, Any]]:
    root = Path(path)
    if not (root / CLASSIFIER_WEIGHTS_FILE).is_file() or not (root / CLASSIFIER_CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{root} holds no classifier ({CLASSIFIER_WEIGHTS_FILE} + {CLASSIFIER_CONFIG_FILE}); run the train_classifier stage")
    record = json.loads((root / CLASSIFIER_CONFIG_FILE).read_text())
    model = Classifier(ClassifierConfig(**{"architecture": "two-stage", **record["config"]}))  # older records: two-stage
    model.load_state_dict(torch.load(root / CLASSIFIER_WEIGHTS_FILE, map_location="cpu", weights_only=True), strict=True)
    return model.eval(), record


def predict(model: Classifier, images: torch.Tensor, batch_size: int = 512) -> np.ndarray:
    with torch.no_grad():
        return np.concatenate([model(images[s:s + batch_size]).argmax(1).numpy() for s in range(0, len(images), batch_size)])

"""train_classifier stage: a small CNN on the prepared training split, for the offline FID features
and the class accuracy of generated images (``evaluate``).

    python -m pipelines.train_classifier --prepared data/prepared --out models/classifier \
        --metrics metrics/classifier.json
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from dit_core import settings
from dit_core.classifier import ClassifierConfig, ClassifierTrainConfig, accuracy, save_classifier, train_classifier
from dit_core.contract import (CLASSIFIER_CONFIG_FILE, CLASSIFIER_WEIGHTS_FILE, COUNT_KEY, FINGERPRINT_KEY, IMAGE_COLUMN,
                               IMAGE_SIZE_KEY, LABEL_COLUMN, NUM_CLASSES_KEY, SPLITS_KEY)
from dit_core.data import pngs_to_batch
from pipelines.common import StageIO, read_manifest, read_split, run_stage, stage_arguments
from ray_jobs import storage


@dataclass(frozen=True)
class ClassifierSettings:
    """The ``train_classifier`` settings (params.yaml repeats these defaults for DVC)."""

    width: int = 32
    feature_dim: int = 64                # penultimate layer = FID features
    architecture: str = "pyramid"        # pyramid | two-stage (dit_core/classifier.py)
    steps: int = 600
    batch_size: int = 128
    lr: float = 0.002
    weight_decay: float = 1e-4
    max_shift: int = 1                   # random translation, pixels
    seed: int = 0


def load_labelled(prepared: str, manifest: dict[str, Any], split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 3, H, W) images in [-1, 1] and their int64 labels."""
    table = read_split(prepared, manifest, split, [IMAGE_COLUMN, LABEL_COLUMN])
    labels = table.column(LABEL_COLUMN).to_numpy().astype("int64")
    return pngs_to_batch(table.column(IMAGE_COLUMN).to_pylist()), torch.from_numpy(labels)


def build_classifier(prepared: str, params: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """The stage's core: train on the train split, measure on the val split."""
    params = asdict(settings.build(ClassifierSettings, params, "train_classifier"))
    manifest = read_manifest(prepared)
    if not manifest[SPLITS_KEY]["val"][COUNT_KEY]:
        raise ValueError(f"{prepared} has no val split: the classifier's accuracy needs one; set prepare.val_fraction > 0")
    config = ClassifierConfig(num_classes=int(manifest[NUM_CLASSES_KEY]), image_size=int(manifest[IMAGE_SIZE_KEY]),
                              width=int(params["width"]), feature_dim=int(params["feature_dim"]),
                              architecture=str(params["architecture"]))   # refused here, before the data is read
    x_train, y_train = load_labelled(prepared, manifest, "train")
    x_val, y_val = load_labelled(prepared, manifest, "val")
    train = ClassifierTrainConfig(steps=int(params["steps"]), batch_size=int(params["batch_size"]), lr=float(params["lr"]),
                                  weight_decay=float(params["weight_decay"]), max_shift=int(params["max_shift"]),
                                  seed=int(params["seed"]))
    model = train_classifier(x_train, y_train, config, train)
    metrics = {
        "train_accuracy": accuracy(model, x_train, y_train),
        "val_accuracy": accuracy(model, x_val, y_val),
        "num_train": len(y_train),
        "num_val": len(y_val),
        "input_fingerprint": manifest[FINGERPRINT_KEY],
    }
    return model, metrics


def publish(model: Any, metrics: dict[str, Any], out: str) -> None:
    """Publish the classifier folder ``out`` (local or s3://) atomically: a new version folder, the
    record last, then the top-level record that names it."""
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp, "classifier")
        save_classifier(model, local, extra={"metrics": metrics})
        with storage.publishing(out, CLASSIFIER_CONFIG_FILE) as staging:
            for name in (CLASSIFIER_WEIGHTS_FILE, CLASSIFIER_CONFIG_FILE):  # the record last
                storage.write_bytes(storage.join(staging, name), (local / name).read_bytes())


def main(argv: list[str] | None = None) -> int:
    flags = {"--prepared": "prepared data folder or s3:// URI", "--out": "classifier folder or s3:// URI",
             "--metrics": "JSON metrics file (local)"}
    _, a, params = stage_arguments(argv, __doc__, flags, ClassifierSettings, "train_classifier", "epochs=5",
                                  optional=("--metrics",), build=True)   # typed and sound before any work

    def core(job: argparse.Namespace) -> None:
        model, metrics = build_classifier(job.prepared, params)
        publish(model, metrics, job.out)
        if job.metrics:
            storage.write_json(job.metrics, metrics)
        print(f"train_classifier: val accuracy {metrics['val_accuracy']:.4f} (train {metrics['train_accuracy']:.4f}) -> {job.out}")

    run_stage("train_classifier", a, StageIO(inputs=("prepared",), outputs=("out",), reports=("metrics",)), core)
    return 0


if __name__ == "__main__":
    sys.exit(main())

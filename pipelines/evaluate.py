"""evaluate stage: FID of the samples against the reference, the share of samples the classifier
assigns to their conditioning class, and (optionally) the FID of an untrained model's samples as
the number to beat; logged to the MLflow run of the model version scored, whose alias moves when
it beats the current holder.

    python -m pipelines.evaluate --samples samples --prepared data/prepared \
        --classifier models/classifier --metrics metrics/eval.json
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from dit_core import settings
from dit_core.classifier import Classifier, load_classifier, predict
from dit_core.data import pngs_to_uint8
from dit_core.metrics import FeatureStats, InceptionFeatures, batched_features, feature_stats, fid_from_stats, load_reference_npz, uint8_to_float
from pipelines.common import StageIO, load_params, read_manifest, read_split, run_stage
from ray_jobs import storage, tracking
from ray_jobs.sample import CONFIG_FILE, GRID_FILE, SUMMARY_FILE, ImageSampler, SampleConfig, class_labels_for, image_seed, load_autoencoder_for, read_images
from ray_jobs.model_source import load_bundle

FEATURES = ("classifier", "inception")


@dataclass(frozen=True)
class EvaluateSettings:
    """The ``evaluate`` settings (params.yaml repeats these defaults for DVC)."""

    features: str = "classifier"         # classifier (offline default) | inception (pytorch-fid weights in the torch hub cache)
    reference: str = "val"               # val: the prepared val split | an ADM reference .npz (local or s3://)
    baseline: bool = True                # also score an untrained model's samples: the FID to beat
    baseline_images: int = 500
    register: bool = True                # log to the scored version's MLflow run, tag it, move the alias
    alias: str = "champion"


def local_folder(uri: str, tmp: str) -> str:
    return storage.download_folder(uri, Path(tmp, "dl")) if storage.is_s3(uri) else uri


def feature_network(name: str, classifier: Classifier) -> Callable[[torch.Tensor], torch.Tensor]:
    if name == "classifier":
        return classifier.features
    if name == "inception":
        return InceptionFeatures()
    raise ValueError(f"evaluate.features={name!r}; choose one of {FEATURES}")


def reference_stats(reference: str, prepared: str, net: Callable[[torch.Tensor], torch.Tensor]) -> tuple[FeatureStats, str]:
    """``val``: the prepared validation split; else an ADM-style reference ``.npz`` (local or s3://)."""
    if reference == "val":
        manifest = read_manifest(prepared)
        images = pngs_to_uint8(read_split(prepared, manifest, "val", ["image"]).column("image").to_pylist())
        return feature_stats(batched_features(net, images)), f"{prepared}:val"
    if not storage.exists(reference):
        raise FileNotFoundError(f"evaluate.reference={reference!r} does not exist; use 'val' or an ADM reference .npz")
    return load_reference_npz(storage.read_bytes(reference), lambda a: batched_features(net, a)), reference


def untrained_samples(samples: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` images of an untrained (freshly initialised) model of the sampled architecture, with
    the same sampler, autoencoder and per-image seeds: the baseline FID to beat."""
    cfg = SampleConfig(**storage.read_json(storage.join(samples, CONFIG_FILE)) | {"output": samples})
    bundle = load_bundle(cfg.model)
    from dit_core.models import DiT

    torch.manual_seed(cfg.seed)
    model = DiT(bundle.config)
    autoencoder, scale = load_autoencoder_for(cfg, bundle)
    cfg.num_images = n
    labels = class_labels_for(cfg, bundle.config.num_classes)
    seeds = np.array([image_seed(cfg.seed, i) for i in range(n)], dtype=np.uint64)
    return ImageSampler(bundle, autoencoder, scale, cfg, model=model).generate(labels, seeds), labels


def evaluate(samples: str, prepared: str, classifier_dir: str, params: dict[str, Any]) -> dict[str, Any]:
    """The stage's core: the metrics of eval.json."""
    with tempfile.TemporaryDirectory() as tmp:
        classifier, record = load_classifier(local_folder(classifier_dir, tmp))
    sample_cfg = storage.read_json(storage.join(samples, CONFIG_FILE))
    images, labels = read_images(samples)
    net = feature_network(params["features"], classifier)
    ref, ref_name = reference_stats(str(params["reference"]), prepared, net)
    fid = fid_from_stats(feature_stats(batched_features(net, images)), ref)
    predicted = predict(classifier, uint8_to_float(images))
    metrics: dict[str, Any] = {
        "fid": fid,
        "class_accuracy": float((predicted == labels).mean()),
        "num_samples": int(len(images)),
        "feature_network": params["features"],
        "reference": ref_name,
        "reference_count": int(ref.count),
        "classifier_val_accuracy": (record.get("metrics") or {}).get("val_accuracy"),
        "sampler": sample_cfg["sampler"],
        "num_steps": sample_cfg["num_steps"],
        "eta": sample_cfg["eta"],
        "guidance_scale": sample_cfg["guidance_scale"],
        "guided_channels": sample_cfg["guided_channels"],
        "cache_interval": sample_cfg.get("cache_interval", 1),
        "seed": sample_cfg["seed"],
        "model": sample_cfg["model"],
    }
    metrics.update(sampled_model(samples))
    if params.get("baseline"):
        base, _ = untrained_samples(samples, int(params["baseline_images"]))
        metrics["fid_untrained"] = fid_from_stats(feature_stats(batched_features(net, base)), ref)
        metrics["fid_ratio_to_untrained"] = fid / metrics["fid_untrained"]
    return metrics


def sampled_model(samples: str) -> dict[str, str]:
    """The exact version the sample job resolved (an alias resolved once, when sampling) and the
    sha256 of its weights, from the samples' summary.json."""
    uri = storage.join(samples, SUMMARY_FILE)
    summary = storage.read_json(uri) if storage.exists(uri) else {}
    return {k: summary[k] for k in ("model_version", "weights_sha256") if summary.get(k)}


def plot_point(metrics: dict[str, Any]) -> dict[str, Any]:
    """One row of the FID-per-sampler-and-guidance plot: across experiments (`dvc exp run -S
    sample.guidance_scale=...`, then `dvc plots diff`) the rows of each revision make the curve."""
    return {"sampler": f"{metrics['sampler']}-{metrics['num_steps']}", "guidance_scale": metrics["guidance_scale"],
            "fid": metrics["fid"], "class_accuracy": metrics["class_accuracy"]}


def register(samples: str, metrics: dict[str, Any], alias: str) -> dict[str, Any]:
    """Log the evaluation to the scored version's training run, tag the version, move the alias."""
    # the version that was sampled (resolved once, by the sample job), never the alias as it is now
    uri = str(metrics.get("model_version") or metrics["model"])
    bundle = load_bundle(uri) if uri.startswith("models:/") else None
    if bundle is None or not bundle.registered_model:
        return {"registered": False, "reason": f"{uri} is not a registered model version"}
    if metrics.get("weights_sha256") and bundle.weights_digest() != metrics["weights_sha256"]:
        raise ValueError(f"{uri} holds other weights than the ones sampled into {samples} (sha256 "
                         f"{bundle.weights_digest()[:12]} vs {metrics['weights_sha256'][:12]}); re-run the sample stage")
    settings = {k: metrics[k] for k in ("sampler", "num_steps", "eta", "guidance_scale", "guided_channels", "cache_interval", "seed",
                                        "feature_network", "reference", "num_samples") if k in metrics}
    scores = {k: metrics[k] for k in ("fid", "class_accuracy", "fid_untrained") if metrics.get(k) is not None}
    with tempfile.TemporaryDirectory() as tmp:
        grid = Path(tmp, GRID_FILE)
        grid_uri = storage.join(samples, GRID_FILE)
        artifacts = {}
        if storage.exists(grid_uri):
            grid.write_bytes(storage.read_bytes(grid_uri))
            artifacts["grid"] = str(grid)
        tracking.log_evaluation(bundle.mlflow_run_id, scores, settings, artifacts)
    tracking.tag_version(bundle.registered_model, bundle.version, {
        tracking.FID_TAG: f"{metrics['fid']:.6g}", tracking.FID_FEATURES_TAG: metrics["feature_network"],
        "class_accuracy": f"{metrics['class_accuracy']:.4f}", "eval.sampler": f"{metrics['sampler']}-{metrics['num_steps']}"})
    outcome = tracking.promote_if_better(bundle.registered_model, bundle.version, metrics["fid"], metrics["feature_network"], alias)
    return {"registered": True, "registered_model": bundle.registered_model, "version": bundle.version,
            "mlflow_run_id": bundle.mlflow_run_id, **outcome}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", required=True, help="the sample stage's output (folder or s3://)")
    p.add_argument("--prepared", required=True, help="prepared data (its val split is the default reference)")
    p.add_argument("--classifier", required=True, help="the train_classifier stage's output")
    p.add_argument("--metrics", required=True, help="eval.json (local)")
    p.add_argument("--plots", default=None, help="this evaluation as a plot point (FID per sampler and guidance, `dvc plots diff`)")
    p.add_argument("--params", default="params.yaml")
    a = p.parse_args(argv)
    params = asdict(settings.build(EvaluateSettings, load_params("evaluate", a.params), "evaluate"))
    if params["features"] not in FEATURES:
        raise SystemExit(f"evaluate.features={params['features']!r}; choose one of {FEATURES}")

    def core(job: argparse.Namespace) -> None:
        metrics = evaluate(job.samples, job.prepared, job.classifier, params)
        if params["register"]:
            tracking.configure_tracking()
            metrics["mlflow"] = register(job.samples, metrics, params["alias"])
        storage.write_json(job.metrics, metrics)
        if job.plots:
            storage.write_json(job.plots, [plot_point(metrics)])
        extra = f", untrained {metrics['fid_untrained']:.3f}" if "fid_untrained" in metrics else ""
        print(f"evaluate: FID {metrics['fid']:.3f}{extra} ({metrics['feature_network']} features, {metrics['num_samples']} samples), "
              f"class accuracy {metrics['class_accuracy']:.3f}")

    reference = params["reference"] if params["reference"] != "val" else None
    io = StageIO(inputs=("samples", "prepared", "classifier"), reports=("metrics", "plots"), tracking=tracking.tracking_uri,
                 settings_paths=lambda _: {"evaluate.reference": reference})
    run_stage("evaluate", a, io, core)
    return 0


if __name__ == "__main__":
    sys.exit(main())

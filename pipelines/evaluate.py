"""evaluate stage: FID of the samples against the reference, the share of samples the classifier
assigns to their conditioning class, and the FID of the untrained model's samples the sample job
made beside them (``sample.baseline_images``) as the number to beat; logged to the MLflow run of the model version scored, whose alias moves when
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
from typing import Any

import numpy as np

from dit_core import settings
from dit_core.classifier import CONFIG_FILE as CLASSIFIER_RECORD, load_classifier
from dit_core.metrics import FeatureStats, fid_from_stats
from pipelines.common import PARAMS_FILE, StageIO, read_manifest, run_stage
from ray_jobs import runtime, storage, tracking
from ray_jobs.features import NETWORKS as FEATURES, feature_pass, npz_items, parquet_items
from ray_jobs.model_source import load_bundle, state_digest
from ray_jobs.sample import CONFIG_FILE, GRID_FILE, SUMMARY_FILE, baseline_output


@dataclass(frozen=True)
class EvaluateSettings:
    """The ``evaluate`` settings (params.yaml repeats these defaults for DVC). The untrained baseline
    is sampled by the sample job (``sample.baseline_images``)."""

    features: str = "classifier"         # classifier (offline default) | inception (pytorch-fid weights in the torch hub cache)
    reference: str = "val"               # val: the prepared val split | an ADM reference .npz (local or s3://)
    register: bool = True                # log to the scored version's MLflow run, tag it, move the alias
    alias: str = "champion"
    num_actors: int | None = None        # feature actors: default one per GPU, else one per CPU
    actor_num_cpus: float | None = None  # CPU actors: CPUs each; default the CPUs split evenly, less a quarter core


def shard_uris(folder: str) -> list[str]:
    return storage.list_files(storage.join(folder, "parquet"), suffix=".parquet")


def reference_source(reference: str, prepared: str) -> tuple[FeatureStats | None, list[dict[str, Any]], str, str]:
    """The reference as statistics already computed (an ADM ``.npz`` with ``mu``/``sigma``) or as
    work items for the feature pass (``val``: the prepared validation split; an ``.npz`` of
    ``arr_0`` images), its name for eval.json, and what identifies it for comparing FIDs (the val
    split: its data's fingerprint, so that new data under the same path is another reference)."""
    if reference == "val":
        manifest = read_manifest(prepared)
        shards, folder = manifest["splits"]["val"]["shards"], storage.version_folder(prepared, manifest)
        if not shards:
            raise ValueError(f"split 'val' of {prepared} is empty; lower prepare.val_fraction or set evaluate.reference to an ADM .npz")
        items = parquet_items("reference", [storage.join(folder, s) for s in shards])
        return None, items, f"{prepared}:val", f"val@{manifest['fingerprint'][:16]}"
    if not storage.exists(reference):
        raise FileNotFoundError(f"evaluate.reference={reference!r} does not exist; use 'val' or an ADM reference .npz")
    fs, path = storage.resolve(reference)
    with fs.open_input_file(path) as f, np.load(f) as z:   # members are read only when asked for
        if "mu" in z and "sigma" in z:
            return FeatureStats(mu=z["mu"], sigma=z["sigma"], count=int(z["count"]) if "count" in z else 0), [], reference, reference
        if "arr_0" not in z:
            raise ValueError(f"evaluate.reference={reference!r} holds {sorted(z.files)}; expected mu and sigma, or arr_0 images")
    return None, npz_items("reference", reference), reference, reference


def evaluate(samples: str, prepared: str, classifier_dir: str, params: dict[str, Any]) -> dict[str, Any]:
    """The stage's core: the metrics of eval.json. The features of the samples, of the untrained
    baseline the sample job made and of the reference come from one Ray Data actor pool; this
    process holds only their statistics."""
    with storage.local_copy(classifier_dir, CLASSIFIER_RECORD) as folder:   # the published version
        classifier, record = load_classifier(folder)
    sample_cfg = storage.read_json(storage.join(samples, CONFIG_FILE))
    num_images, num_baseline = int(sample_cfg["num_images"]), int(sample_cfg.get("baseline_images") or 0)
    items = parquet_items("samples", shard_uris(samples))
    if not items:
        raise FileNotFoundError(f"no parquet sample shards under {samples}/parquet; sample with formats including parquet or npz")
    if num_baseline:
        items += parquet_items("baseline", shard_uris(baseline_output(samples)))
    ref_stats, ref_items, ref_name, ref_id = reference_source(str(params["reference"]), prepared)
    runtime.init_ray()
    read_by_actors = {"evaluate --samples": samples}
    if ref_items:
        read_by_actors["evaluate --prepared" if params["reference"] == "val" else "evaluate.reference"] = ref_items[0]["uri"]
    runtime.require_shared(read_by_actors, runtime.cluster_hosts(), "the Ray cluster")
    found = feature_pass(items + ref_items, params["features"], classifier,
                         num_actors=params.get("num_actors"), actor_num_cpus=params.get("actor_num_cpus"))
    for name, expected in (("samples", num_images), ("baseline", num_baseline)):
        got = found[name].moments.count if name in found else 0
        if got != expected:
            raise RuntimeError(f"{samples} holds {got} of the {expected} {name} images it was sampled with: shards are missing "
                               "(written to another host's disk?); re-run the sample job (it generates only the missing shards)")
    ref = ref_stats or found["reference"].moments.stats()
    fid = fid_from_stats(found["samples"].moments.stats(), ref)
    metrics: dict[str, Any] = {
        "fid": fid,
        "class_accuracy": found["samples"].accuracy,
        "num_samples": num_images,
        "feature_network": params["features"],
        # what FIDs must share to be compared (the registry's champion): the network's weights, the reference data
        "feature_network_id": (f"classifier@{state_digest(classifier.state_dict())[:16]}" if params["features"] == "classifier"
                               else params["features"]),
        "reference": ref_name,
        "reference_id": ref_id,
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
    if num_baseline:
        metrics["fid_untrained"] = fid_from_stats(found["baseline"].moments.stats(), ref)
        metrics["fid_ratio_to_untrained"] = fid / metrics["fid_untrained"]
        metrics["baseline_images"] = num_baseline
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
    features, reference = metrics.get("feature_network_id", metrics["feature_network"]), metrics.get("reference_id")
    basis = {tracking.FID_FEATURES_TAG: features, **({tracking.FID_REFERENCE_TAG: reference} if reference else {})}
    tracking.tag_version(bundle.registered_model, bundle.version, {
        tracking.FID_TAG: f"{metrics['fid']:.6g}", **basis,
        "class_accuracy": f"{metrics['class_accuracy']:.4f}", "eval.sampler": f"{metrics['sampler']}-{metrics['num_steps']}"})
    outcome = tracking.promote_if_better(bundle.registered_model, bundle.version, metrics["fid"], features, alias, reference)
    return {"registered": True, "registered_model": bundle.registered_model, "version": bundle.version,
            "mlflow_run_id": bundle.mlflow_run_id, **outcome}


def main(argv: list[str] | None = None) -> int:
    p = settings.command_parser(__doc__)
    p.add_argument("--samples", required=True, help="the sample stage's output (folder or s3://)")
    p.add_argument("--prepared", required=True, help="prepared data (its val split is the default reference)")
    p.add_argument("--classifier", required=True, help="the train_classifier stage's output")
    p.add_argument("--metrics", required=True, help="eval.json (local)")
    p.add_argument("--plots", default=None, help="this evaluation as a plot point (FID per sampler and guidance, `dvc plots diff`)")
    settings.add_settings_arguments(p, EvaluateSettings, "evaluate", PARAMS_FILE, example="register=false")
    a = p.parse_args(argv)
    params = asdict(settings.build(EvaluateSettings, settings.read_settings(a, EvaluateSettings, "evaluate"), "evaluate"))
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

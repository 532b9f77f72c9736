"""evaluate stage: the field's table (FID, sFID, Inception Score, precision and recall) of the
samples against the reference, the share of samples the classifier assigns to their conditioning
class, a label-free distance that sees colour, background, layout and diversity (``fd_label_free``,
with the autoencoder's reconstructions of the reference as its floor), colour statistics, and the
same for the untrained model's samples the sample job made beside them (``sample.baseline_images``)
as the number to beat; logged to the MLflow run of the model version scored, whose alias moves
when it beats the current holder on FID without losing on the label-free distance.

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
from dit_core.autoencoders import Autoencoder, load_autoencoder
from dit_core.classifier import load_classifier
from dit_core.contract import (AUTOENCODER_PATH_KEY, AUTOENCODER_RECORD_FILE, CLASSIFIER_CONFIG_FILE, MODEL_VERSION_KEY,
                               SAMPLE_BASELINE_DIR, SAMPLE_CONFIG_FILE, SAMPLE_GRID_FILE, SAMPLE_PARQUET_DIR, SAMPLE_SUMMARY_FILE,
                               SHARDS_KEY, SPLITS_KEY, WEIGHTS_SHA256_KEY)
from dit_core.image_stats import HISTOGRAM_LEVELS, PIXEL_POOL, colour_ratios
from dit_core.metrics import FID_INCEPTION_DIMS, PR_MAX_IMAGES, PR_NEIGHBOURS, FeatureStats, fid_from_stats, precision_recall
from pipelines.common import StageIO, read_manifest, run_stage, stage_arguments
from ray_jobs import runtime, storage, tracking
from ray_jobs.features import (
    NETWORKS as FEATURES,
    PassSettings,
    SetFeatures,
    feature_pass,
    npz_items,
    parquet_items,
    reconstruction_items,
)
from ray_jobs.model_source import load_bundle, state_digest


@dataclass(frozen=True)
class EvaluateSettings:
    """The ``evaluate`` settings (params.yaml repeats these defaults for DVC). The untrained baseline
    is sampled by the sample job (``sample.baseline_images``)."""

    features: str = "classifier"         # classifier (offline default) | inception (pytorch-fid's FID Inception)
    inception_weights: str | None = None  # features: inception: pt_inception-2015-12-05-6726825d.pth, a local path or
                                         # s3:// (copied once to the actor's torch hub cache); null: $TORCH_HOME/hub/checkpoints
    reference: str = "val"               # val: the prepared val split | an ADM reference .npz (local or s3://)
    pr_max_images: int = PR_MAX_IMAGES   # precision/recall: a seeded subsample of at most this many per set (ADM: 10,000)
    pr_seed: int = 0                     # which subsample
    pixel_pool: int = PIXEL_POOL         # fd_label_free: images average-pooled to this many cells a side ...
    histogram_levels: int = HISTOGRAM_LEVELS  # ... beside joint colour histograms with this many levels a channel
    floor: bool = True                   # also score the autoencoder's reconstructions of the reference (the floor)
    autoencoder: str | None = None       # the floor's autoencoder; null: the one the sampled model was trained with
    register: bool = True                # log to the scored version's MLflow run, tag it, move the alias
    alias: str = "champion"
    num_actors: int | None = None        # feature actors: default one per GPU, else one per CPU
    actor_num_cpus: float | None = None  # CPU actors: CPUs each; default the CPUs split evenly, less a quarter core


def shard_uris(folder: str) -> list[str]:
    return storage.list_files(storage.join(folder, SAMPLE_PARQUET_DIR), suffix=".parquet")


@dataclass(frozen=True)
class Reference:
    """The reference: images for the feature pass (``items``, may be empty) and/or statistics given
    ready (an ADM ``.npz``'s Inception ``mu``/``sigma`` and ``mu_s``/``sigma_s``), its name for
    eval.json and what identifies it for comparing scores."""

    items: list[dict[str, Any]]
    name: str
    id: str
    stats: FeatureStats | None = None
    spatial_stats: FeatureStats | None = None


def reference_source(reference: str, prepared: str, feature_dim: int) -> Reference:
    """``val``: the prepared validation split (identified by its data's fingerprint, so that new data
    under the same path is another reference); else an ADM reference ``.npz``. Its ``mu``/``sigma``
    (and ``mu_s``/``sigma_s``) are used as they are when they are statistics of features of
    ``feature_dim`` values (an ADM batch's are the FID Inception's 2048); its ``arr_0`` images, when
    present, are the reference of everything else (and of everything, when the statistics are of
    another network's features)."""
    if reference == "val":
        manifest = read_manifest(prepared)
        shards, folder = manifest[SPLITS_KEY]["val"][SHARDS_KEY], storage.version_folder(prepared, manifest)
        if not shards:
            raise ValueError(f"split 'val' of {prepared} is empty; lower prepare.val_fraction or set evaluate.reference to an ADM .npz")
        items = parquet_items("reference", [storage.join(folder, s) for s in shards])
        return Reference(items, f"{prepared}:val", f"val@{manifest['fingerprint'][:16]}")
    if not storage.exists(reference):
        raise FileNotFoundError(f"evaluate.reference={reference!r} does not exist; use 'val' or an ADM reference .npz")
    fs, path = storage.resolve(reference)
    stats = spatial = None
    with fs.open_input_file(path) as f, np.load(f) as z:   # members are read only when asked for
        has_images = "arr_0" in z
        if "mu" in z and "sigma" in z and z["mu"].shape == (feature_dim,):
            count = int(z["count"]) if "count" in z else 0
            stats = FeatureStats(mu=z["mu"], sigma=z["sigma"], count=count)
            if "mu_s" in z and "sigma_s" in z:
                spatial = FeatureStats(mu=z["mu_s"], sigma=z["sigma_s"], count=count)
        elif not has_images:
            hint = (f"its mu has {z['mu'].shape[0]} values but the feature network gives {feature_dim} (an ADM batch's "
                    "statistics are the FID Inception's 2048: set evaluate.features: inception), or give a .npz with arr_0 images"
                    if "mu" in z else "expected mu and sigma, or arr_0 images")
            raise ValueError(f"evaluate.reference={reference!r} holds {sorted(z.files)}; {hint}")
    return Reference(npz_items("reference", reference) if has_images else [], reference, reference, stats, spatial)


def label_free_measure(params: dict[str, Any]) -> str:
    """What ``fd_label_free`` was measured with: equal strings, comparable distances."""
    return f"pixels{params['pixel_pool']}x{params['pixel_pool']}+hist{params['histogram_levels']}"


def floor_autoencoder(samples: str, sample_cfg: dict[str, Any], override: str | None) -> tuple[Autoencoder, str]:
    """The autoencoder the sampled model decodes with: ``evaluate.autoencoder``, else the sample
    job's ``autoencoder`` setting, else the one the model records (its bundle's latent record)."""
    path = override or sample_cfg.get("autoencoder")
    if not path:
        model = sampled_model(samples).get(MODEL_VERSION_KEY) or sample_cfg["model"]
        path = load_bundle(str(model)).latents.get(AUTOENCODER_PATH_KEY)
        if not path:
            raise ValueError(f"the sampled model {model!r} does not record its autoencoder (an official checkpoint?), so the "
                             "floor (its reconstructions of the reference) cannot be computed; set evaluate.autoencoder to "
                             "the one it was trained with, or evaluate.floor: false")
    with storage.local_copy(path, AUTOENCODER_RECORD_FILE) as local:
        return load_autoencoder(local), str(path)


def finite(ratios: dict[str, float]) -> dict[str, float | None]:
    """Ratios for eval.json: null where the reference has none of a colour figure (a grey data set)
    and the samples have some (JSON has no infinity)."""
    return {k: v if np.isfinite(v) else None for k, v in ratios.items()}


def fd(a: SetFeatures, b: SetFeatures | None, which: str) -> float | None:
    """The Frechet distance between two sets' moments ``which`` (None without the reference's images)."""
    return None if b is None else fid_from_stats(getattr(a, which).stats(), getattr(b, which).stats())


def evaluate(samples: str, prepared: str, classifier_dir: str, params: dict[str, Any]) -> dict[str, Any]:
    """The stage's core: the metrics of eval.json. Every set (samples, the untrained baseline, the
    reference and the autoencoder's reconstructions of it) goes through one Ray Data actor pool;
    this process holds only their summaries and each set's capped subsample of features."""
    params = {**asdict(EvaluateSettings()), **params}                       # a caller's partial settings: the defaults
    with storage.local_copy(classifier_dir, CLASSIFIER_CONFIG_FILE) as folder:   # the published version
        classifier, record = load_classifier(folder)
    sample_cfg = storage.read_json(storage.join(samples, SAMPLE_CONFIG_FILE))
    num_images, num_baseline = int(sample_cfg["num_images"]), int(sample_cfg.get("baseline_images") or 0)
    items = parquet_items("samples", shard_uris(samples))
    if not items:
        raise FileNotFoundError(f"no parquet sample shards under {samples}/parquet; sample with formats including parquet or npz")
    if num_baseline:
        items += parquet_items("baseline", shard_uris(storage.join(samples, SAMPLE_BASELINE_DIR)))
    ref = reference_source(str(params["reference"]), prepared,
                           FID_INCEPTION_DIMS if params["features"] == "inception" else classifier.config.feature_dim)
    autoencoder = autoencoder_path = None
    if params["floor"] and ref.items:
        autoencoder, autoencoder_path = floor_autoencoder(samples, sample_cfg, params.get("autoencoder"))
        items += reconstruction_items("floor", ref.items)
    runtime.init_ray()
    read_by_actors = {"evaluate --samples": samples}
    if ref.items:
        read_by_actors["evaluate --prepared" if params["reference"] == "val" else "evaluate.reference"] = ref.items[0]["uri"]
    if params.get("inception_weights"):
        read_by_actors["evaluate.inception_weights"] = params["inception_weights"]
    runtime.require_shared(read_by_actors, runtime.cluster_hosts(), "the Ray cluster")
    found = feature_pass(items + ref.items, classifier, pass_settings(params), autoencoder,
                         num_actors=params.get("num_actors"), actor_num_cpus=params.get("actor_num_cpus"))
    for name, expected in (("samples", num_images), ("baseline", num_baseline)):
        got = found[name].moments.count if name in found else 0
        if got != expected:
            raise RuntimeError(f"{samples} holds {got} of the {expected} {name} images it was sampled with: shards are missing "
                               "(written to another host's disk?); re-run the sample job (it generates only the missing shards)")
    s, r, floor = found["samples"], found.get("reference"), found.get("floor")
    ref_stats = ref.stats or r.moments.stats()
    ref_spatial = ref.spatial_stats or (r.spatial.stats() if r is not None else None)
    fid = fid_from_stats(s.moments.stats(), ref_stats)
    unavailable = unavailable_figures(ref.name, r is not None, ref_spatial is not None, bool(params["floor"]))
    precision = recall = None
    if r is not None:
        precision, recall = precision_recall(r.sample.features, s.sample.features, PR_NEIGHBOURS)
    fd_label_free = fd(s, r, "pixels")
    metrics: dict[str, Any] = {
        "fid": fid,
        "sfid": fid_from_stats(s.spatial.stats(), ref_spatial) if ref_spatial is not None else None,
        "inception_score": s.scores.inception_score(),
        "inception_score_reference": r.scores.inception_score() if r is not None else None,
        "precision": precision,
        "recall": recall,
        "pr_images": len(s.sample.features),
        "pr_reference_images": len(r.sample.features) if r is not None else 0,
        "class_accuracy": s.accuracy,
        "fd_label_free": fd_label_free,
        "fd_label_free_measure": label_free_measure(params),
        "colour_samples": s.colour.means(),
        "colour_reference": r.colour.means() if r is not None else None,
        "colour_ratio": finite(colour_ratios(s.colour.means(), r.colour.means())) if r is not None else None,
        "num_samples": num_images,
        "feature_network": params["features"],
        # what FIDs must share to be compared (the registry's champion): the network's weights, the reference data
        "feature_network_id": (f"classifier@{state_digest(classifier.state_dict())[:16]}" if params["features"] == "classifier"
                               else params["features"]),
        "reference": ref.name,
        "reference_id": ref.id,
        "reference_count": int(ref_stats.count),
        "classifier_val_accuracy": (record.get("metrics") or {}).get("val_accuracy"),
        **sampling_record(sample_cfg),
    }
    if floor is not None:
        metrics.update(floor_figures(floor, r, fd_label_free), floor_autoencoder=autoencoder_path)
    metrics.update(sampled_model(samples))
    if num_baseline:
        b = found["baseline"]
        metrics["fid_untrained"] = fid_from_stats(b.moments.stats(), ref_stats)
        metrics.update(fid_ratio_to_untrained=fid / metrics["fid_untrained"], fd_label_free_untrained=fd(b, r, "pixels"),
                       baseline_images=num_baseline)
    if unavailable:
        metrics["not_available"] = unavailable
    return metrics


def pass_settings(params: dict[str, Any]) -> PassSettings:
    """What the feature pass computes, from the ``evaluate`` settings."""
    return PassSettings(network=params["features"], inception_weights=params.get("inception_weights"),
                        pr_max_images=int(params["pr_max_images"]), seed=int(params["pr_seed"]),
                        pixel_pool=int(params["pixel_pool"]), histogram_levels=int(params["histogram_levels"]))


def unavailable_figures(reference: str, has_images: bool, has_spatial: bool, floor: bool) -> dict[str, str]:
    """Why each figure eval.json leaves null is null (its ``not_available``)."""
    unavailable: dict[str, str] = {}
    if not has_images:
        why = f"the reference {reference} holds statistics only (mu, sigma), no arr_0 images"
        unavailable.update({k: why for k in ("precision", "recall", "fd_label_free", "colour_reference", "floor")})
    if not has_spatial:
        unavailable["sfid"] = f"the reference {reference} holds neither mu_s/sigma_s nor arr_0 images"
    if has_images and not floor:
        unavailable["floor"] = "evaluate.floor is false"
    return unavailable


def floor_figures(floor: Any, reference: Any, fd_label_free: float | None) -> dict[str, Any]:
    """The autoencoder's reconstructions of the reference against it: the floor the DiT cannot beat."""
    floor_fd = fd(floor, reference, "pixels")
    return {"fd_label_free_floor": floor_fd,
            "fd_label_free_ratio_to_floor": fd_label_free / floor_fd if floor_fd and fd_label_free is not None else None,
            "fid_floor": fd(floor, reference, "moments"), "colour_floor": floor.colour.means()}


def sampling_record(sample_cfg: dict[str, Any]) -> dict[str, Any]:
    """The sampling settings the samples were made with, as eval.json and the registry record them."""
    keys = ("sampler", "num_steps", "eta", "guidance_scale", "guided_channels", "seed", "model")
    return {**{k: sample_cfg[k] for k in keys}, "cache_interval": sample_cfg.get("cache_interval", 1)}


def sampled_model(samples: str) -> dict[str, str]:
    """The exact version the sample job resolved (an alias resolved once, when sampling) and the
    sha256 of its weights, from the samples' summary.json."""
    uri = storage.join(samples, SAMPLE_SUMMARY_FILE)
    summary = storage.read_json(uri) if storage.exists(uri) else {}
    return {k: summary[k] for k in (MODEL_VERSION_KEY, WEIGHTS_SHA256_KEY) if summary.get(k)}


def plot_point(metrics: dict[str, Any]) -> dict[str, Any]:
    """One row of the FID-per-sampler-and-guidance plot: across experiments (`dvc exp run -S
    sample.guidance_scale=...`, then `dvc plots diff`) the rows of each revision make the curve."""
    return {"sampler": f"{metrics['sampler']}-{metrics['num_steps']}", "guidance_scale": metrics["guidance_scale"],
            "fid": metrics["fid"], "class_accuracy": metrics["class_accuracy"]}


def register(samples: str, metrics: dict[str, Any], alias: str) -> dict[str, Any]:
    """Log the evaluation to the scored version's training run, tag the version, move the alias."""
    # the version that was sampled (resolved once, by the sample job), never the alias as it is now
    uri = str(metrics.get(MODEL_VERSION_KEY) or metrics["model"])
    elsewhere = tracking.version_not_here(uri) if uri.startswith("models:/") else None
    if elsewhere:
        print(f"evaluate: not registered: {elsewhere}", file=sys.stderr)
        return {"registered": False, "reason": elsewhere}
    bundle = load_bundle(uri) if uri.startswith("models:/") else None
    if bundle is None or not bundle.registered_model:
        return {"registered": False, "reason": f"{uri} is not a registered model version"}
    if metrics.get(WEIGHTS_SHA256_KEY) and bundle.weights_digest() != metrics[WEIGHTS_SHA256_KEY]:
        raise ValueError(f"{uri} holds other weights than the ones sampled into {samples} (sha256 "
                         f"{bundle.weights_digest()[:12]} vs {metrics['weights_sha256'][:12]}); re-run the sample stage")
    settings = {k: metrics[k] for k in ("sampler", "num_steps", "eta", "guidance_scale", "guided_channels", "cache_interval", "seed",
                                        "feature_network", "reference", "num_samples") if k in metrics}
    scores = {k: metrics[k] for k in ("fid", "sfid", "inception_score", "precision", "recall", "class_accuracy", "fid_untrained",
                                      "fd_label_free", "fd_label_free_floor", "fd_label_free_untrained")
              if metrics.get(k) is not None}
    with tempfile.TemporaryDirectory() as tmp:
        grid = Path(tmp, SAMPLE_GRID_FILE)
        grid_uri = storage.join(samples, SAMPLE_GRID_FILE)
        artifacts = {}
        if storage.exists(grid_uri):
            grid.write_bytes(storage.read_bytes(grid_uri))
            artifacts["grid"] = str(grid)
        tracking.log_evaluation(bundle.mlflow_run_id, scores, settings, artifacts)
    features, reference = metrics.get("feature_network_id", metrics["feature_network"]), metrics.get("reference_id")
    basis = {tracking.FID_FEATURES_TAG: features, **({tracking.FID_REFERENCE_TAG: reference} if reference else {})}
    label_free, label_free_basis = metrics.get("fd_label_free"), None
    if label_free is not None:   # measured the same way: the same pixel features against the same reference
        label_free_basis = f"{metrics['fd_label_free_measure']}@{reference}"
        basis |= {tracking.FD_LABEL_FREE_TAG: f"{label_free:.6g}", tracking.FD_LABEL_FREE_BASIS_TAG: label_free_basis}
    tracking.tag_version(bundle.registered_model, bundle.version, {
        tracking.FID_TAG: f"{metrics['fid']:.6g}", **basis,
        "class_accuracy": f"{metrics['class_accuracy']:.4f}", "eval.sampler": f"{metrics['sampler']}-{metrics['num_steps']}"})
    outcome = tracking.promote_if_better(bundle.registered_model, bundle.version, metrics["fid"], features, alias, reference,
                                         label_free=label_free, label_free_basis=label_free_basis)
    return {"registered": True, "registered_model": bundle.registered_model, "version": bundle.version,
            "mlflow_run_id": bundle.mlflow_run_id, **outcome}


def check_settings(params: dict[str, Any]) -> None:
    """Refuse settings that cannot work, before any Ray or feature work, naming the setting."""
    if params["features"] not in FEATURES:
        raise SystemExit(f"evaluate.features={params['features']!r}; choose one of {FEATURES}")
    if params["pr_max_images"] < PR_NEIGHBOURS + 1:
        raise SystemExit(f"evaluate.pr_max_images={params['pr_max_images']}: precision and recall (k={PR_NEIGHBOURS}) need "
                         f"at least {PR_NEIGHBOURS + 1} images a set; 10000 is ADM's protocol")
    if params["pixel_pool"] < 1 or params["histogram_levels"] < 1:
        raise SystemExit(f"evaluate.pixel_pool={params['pixel_pool']} and evaluate.histogram_levels={params['histogram_levels']} "
                         "must be at least 1 (defaults 8 and 4)")
    if params["inception_weights"] and params["features"] != "inception":
        raise SystemExit(f"evaluate.inception_weights is set but evaluate.features={params['features']!r}; "
                         "set evaluate.features: inception to use them")


def main(argv: list[str] | None = None) -> int:
    flags = {"--samples": "the sample stage's output (folder or s3://)",
             "--prepared": "prepared data (its val split is the default reference)",
             "--classifier": "the train_classifier stage's output",
             "--metrics": "eval.json (local)",
             "--plots": "this evaluation as a plot point (FID per sampler and guidance, `dvc plots diff`)"}
    p, a, given = stage_arguments(argv, __doc__, flags, EvaluateSettings, "evaluate", "register=false", optional=("--plots",))
    with p.refusing(a):
        params = asdict(settings.build(EvaluateSettings, given, "evaluate"))
        check_settings(params)

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
        if metrics.get("fd_label_free") is not None:
            floor = f", floor {metrics['fd_label_free_floor']:.3f}" if metrics.get("fd_label_free_floor") is not None else ""
            print(f"evaluate: label-free distance {metrics['fd_label_free']:.3f}{floor} ({metrics['fd_label_free_measure']})")

    reference = params["reference"] if params["reference"] != "val" else None
    io = StageIO(inputs=("samples", "prepared", "classifier"), reports=("metrics", "plots"), tracking=tracking.tracking_uri,
                 settings_paths=lambda _: {"evaluate.reference": reference, "evaluate.inception_weights": params["inception_weights"],
                                           "evaluate.autoencoder": params["autoencoder"]})
    run_stage("evaluate", a, io, core)
    return 0


if __name__ == "__main__":
    sys.exit(main())

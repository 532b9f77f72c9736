"""Bulk sampling on Ray Data: ``python -m ray_jobs.sample --model models:/dit-digits@champion ...``
(or the same behind ``ray job submit``).

Every image i has a row (index, class label, seed) and its noise comes only from its own seed, so
the images do not depend on the number of actors or the batch size. Images are grouped into
shards of ``images_per_shard`` consecutive indices; an actor pool (each actor loads the DiT and the
autoencoder once) generates a shard, writes it under a temporary name and renames it. Running the
job again generates only the shards that are missing, so a killed job resumes where it stopped.

The same pool samples the untrained baseline (``baseline_images`` of a freshly initialised model of
the same architecture, same sampler, labels and seeds) into ``baseline/``: the evaluate stage's FID
to beat. The driver's finishing steps (``samples.npz``, ``grid.png``) read one shard at a time.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import sys
import tarfile
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Sequence

import numpy as np
import torch

from dit_core import settings
from dit_core.contract import (IMAGE_COLUMN, INDEX_COLUMN, LABEL_COLUMN, MODEL_VERSION_KEY, SAMPLES_NPZ_FILE, SAMPLE_BASELINE_DIR,
                               SAMPLE_CONFIG_FILE, SAMPLE_GRID_FILE, SAMPLE_PARQUET_DIR, SAMPLE_PNG_DIR, SAMPLE_SUMMARY_FILE,
                               SEED_COLUMN, WEIGHTS_SHA256_KEY)
from dit_core.data import image_grid, png_bytes, pngs_to_uint8
from dit_core.diffusion import make_objective
from dit_core.metrics import AdmNpzWriter
from dit_core.pipeline import CLASS_LABEL_MODES, ImagePipeline, SamplingSettings, class_labels_for, fit_sampling, image_seed

from . import runtime, storage
from .model_source import ModelBundle, load_autoencoder_for, load_bundle
from .runtime import init_ray, use_assigned_cpus

FORMATS = ("png", "parquet", "npz")
GRID_MAX_CLASSES = 16            # grid.png has at most this many rows (classes) ...
GRID_MAX_PER_CLASS = 32          # ... of at most this many images: its size does not grow with the run


@dataclass(frozen=True, kw_only=True)
class SampleConfig(SamplingSettings):
    """The ``sample`` settings: the pipeline's ``SamplingSettings`` (sampler, num_steps,
    guidance_scale, eta, guided_channels, cache_interval) and the bulk job's own, checked when made.
    These defaults are the project's (params.yaml repeats them for DVC)."""

    model: str                               # models:/name/3, models:/name@alias, runs:/..., checkpoint or .pt
    output: str                              # folder or s3:// prefix
    num_images: int = 1000
    class_labels: list[int] | str = "all"    # "all" (cycle through classes), "uniform" (random), or a list
    seed: int = 0
    batch_size: int = 250
    images_per_shard: int = 250
    formats: list[str] = field(default_factory=lambda: ["parquet", "npz"])  # png (tar shards) | parquet | npz (ADM)
    grid_per_class: int = 8                  # grid.png: a row of this many samples per class (0: none)
    grid_classes: list[int] | None = None    # grid.png's rows: these classes; None: up to 16 evenly spaced
    baseline_images: int = 500               # also this many from an untrained model (same sampler, labels,
                                             # seeds) into baseline/: evaluate's FID to beat; 0: none
    autoencoder: str | None = None           # default: the one the model was trained with
    scale_factor: float | None = None        # default: the model's latent record, else the autoencoder's
    expect_preset: str | None = None
    num_actors: int | None = None            # default: one per GPU, else one per CPU
    actor_num_cpus: float | None = None      # CPU actors: CPUs each (= PyTorch threads, rounded); default:
                                             # the CPUs split evenly, a quarter core each left to Ray Data
    use_gpu: bool | None = None              # default: when the cluster has GPUs
    bf16: bool = True                        # autocast on GPU

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("num_images", "batch_size", "images_per_shard"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1")
        if self.actor_num_cpus is not None and self.actor_num_cpus <= 0:
            raise ValueError(f"actor_num_cpus={self.actor_num_cpus} must be > 0 (a fraction is fine), or None for the default")
        if isinstance(self.class_labels, str) and self.class_labels not in CLASS_LABEL_MODES:
            raise ValueError(f"class_labels={self.class_labels!r}; use 'all', 'uniform' or a list of class ids")
        unknown = set(self.formats) - set(FORMATS)
        if unknown or not self.formats:
            raise ValueError(f"formats {sorted(unknown) or self.formats} not understood; choose from {FORMATS}")
        if self.baseline_images < 0:
            raise ValueError(f"baseline_images={self.baseline_images} must be >= 0 (0: no untrained baseline)")
        if not 0 <= self.grid_per_class <= GRID_MAX_PER_CLASS:
            raise ValueError(f"grid_per_class={self.grid_per_class} must be within 0..{GRID_MAX_PER_CLASS} (0: no grid.png)")
        if self.grid_classes is not None and not 1 <= len(self.grid_classes) <= GRID_MAX_CLASSES:
            raise ValueError(f"grid_classes has {len(self.grid_classes)} classes; give 1 to {GRID_MAX_CLASSES}, or null for evenly spaced ones")

    def labels(self, num_classes: int, baseline: bool = False) -> np.ndarray:
        """The class label of every image (``baseline``: of the untrained baseline's)."""
        return class_labels_for(self.class_labels, self.baseline_images if baseline else self.num_images, num_classes, self.seed)

    def identity(self) -> dict[str, Any]:
        """The settings that decide the images (a resumed run must share them)."""
        keep = ("model", "num_images", "class_labels", "sampler", "num_steps", "eta", "guidance_scale",
                "guided_channels", "cache_interval", "seed", "images_per_shard", "autoencoder", "scale_factor",
                "baseline_images")
        return {k: v for k, v in asdict(self).items() if k in keep}


# ---------------------------------------------------------------------------------------------
# Rows: (index, class label, seed), a pure function of the config (dit_core.pipeline's
# ``image_seed`` and ``class_labels_for``)
# ---------------------------------------------------------------------------------------------

def shard_name(shard: int) -> str:
    return f"shard-{shard:06d}"


def baseline_output(output: str) -> str:
    return storage.join(output, SAMPLE_BASELINE_DIR)


def shard_files(output: str, shard: int, formats: Sequence[str]) -> dict[str, str]:
    files = {}
    if "png" in formats:
        files["png"] = storage.join(output, SAMPLE_PNG_DIR, shard_name(shard) + ".tar")
    if "parquet" in formats or "npz" in formats:  # the npz batch is assembled from parquet shards
        files["parquet"] = storage.join(output, SAMPLE_PARQUET_DIR, shard_name(shard) + ".parquet")
    return files


# ---------------------------------------------------------------------------------------------
# The actor: wraps the image pipeline (the model and autoencoder loaded once), writes whole shards
# ---------------------------------------------------------------------------------------------

def untrained_model(bundle: ModelBundle, seed: int) -> torch.nn.Module:
    """A freshly initialised model of the bundle's architecture (seeded: the same on every actor)."""
    from dit_core.models import DiT

    torch.manual_seed(seed)
    return DiT(bundle.config)


SAMPLES, BASELINE = 0, 1   # the ``kind`` of a row: the model's samples, or the untrained baseline's


class ShardGenerator:
    """Ray Data callable class: one call = one shard's rows -> the shard written, a summary row back."""

    def __init__(self, bundle: Any, cfg: dict[str, Any]):
        import ray

        if isinstance(bundle, ray.ObjectRef):
            bundle = ray.get(bundle)
        self.bundle = bundle
        self.cfg = SampleConfig(**cfg)
        use_assigned_cpus()
        self.device = torch.device("cuda" if torch.cuda.is_available() and self.cfg.use_gpu is not False else "cpu")
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.pipelines: dict[int, ImagePipeline] = {}

    def pipeline(self, kind: int) -> ImagePipeline:
        """The trained model's pipeline, or (BASELINE) the untrained model's, built on this actor
        when it first needs it."""
        if kind not in self.pipelines:
            b = self.bundle
            model = b["model"].build_model() if kind == SAMPLES else untrained_model(b["model"], self.cfg.seed)
            self.pipelines[kind] = ImagePipeline(model, b["autoencoder"], b["scale_factor"], b["model"].diffusion,
                                                 device=self.device, bf16=self.cfg.bf16)
        return self.pipelines[kind]

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A batch holds whole shards (one block per shard, never split): generate and write each."""
        out: dict[str, list] = {"kind": [], "shard": [], "images": [], "seconds": []}
        for kind, shard in sorted(set(zip(rows["kind"].tolist(), rows["shard"].tolist()))):
            mine = (rows["shard"] == shard) & (rows["kind"] == kind)
            total = self.cfg.num_images if kind == SAMPLES else self.cfg.baseline_images
            expected = min(self.cfg.images_per_shard, total - shard * self.cfg.images_per_shard)
            if int(mine.sum()) != expected:
                raise RuntimeError(f"shard {shard} arrived with {int(mine.sum())} of its {expected} rows; it is not written")
            t0 = time.perf_counter()
            self.write_shard(kind, shard, rows[INDEX_COLUMN][mine], rows[LABEL_COLUMN][mine], rows[SEED_COLUMN][mine])
            out["kind"].append(kind)
            out["shard"].append(shard)
            out["images"].append(expected)
            out["seconds"].append(time.perf_counter() - t0)
        return {k: np.array(v) for k, v in out.items()}

    def write_shard(self, kind: int, shard: int, index: np.ndarray, labels: np.ndarray, seeds: np.ndarray) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        order = np.argsort(index)
        index, labels, seeds = index[order], labels[order], seeds[order]
        images = self.pipeline(kind).generate(labels, seeds, self.cfg, self.cfg.batch_size)
        if kind == SAMPLES:
            files = shard_files(self.cfg.output, shard, self.cfg.formats)
        else:
            files = shard_files(baseline_output(self.cfg.output), shard, ["parquet"])
        pngs = [png_bytes(im) for im in images]
        if "parquet" in files:
            table = pa.table({
                INDEX_COLUMN: pa.array(index, pa.int64()),
                LABEL_COLUMN: pa.array(labels, pa.int32()),
                SEED_COLUMN: pa.array(seeds.astype(np.uint64), pa.uint64()),
                IMAGE_COLUMN: pa.array(pngs, pa.binary()),
            })
            buf = pa.BufferOutputStream()
            pq.write_table(table, buf)
            storage.write_bytes(files["parquet"], buf.getvalue().to_pybytes())
        if "png" in files:
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w") as tar:
                for i, lab, data in zip(index, labels, pngs):
                    for name, payload in ((f"{int(i):08d}.png", data), (f"{int(i):08d}.cls", str(int(lab)).encode())):
                        info = tarfile.TarInfo(name)
                        info.size = len(payload)
                        tar.addfile(info, io.BytesIO(payload))
            storage.write_bytes(files["png"], buf.getvalue())


# ---------------------------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------------------------

def _check_resume(cfg: SampleConfig) -> None:
    path = storage.join(cfg.output, SAMPLE_CONFIG_FILE)
    if storage.exists(path):
        previous = storage.read_json(path)
        if previous != json.loads(json.dumps(cfg.identity())):
            diff = {k: (previous.get(k), v) for k, v in cfg.identity().items() if previous.get(k) != v}
            raise ValueError(
                f"{cfg.output} holds samples made with other settings {diff} (old, new); "
                "choose another output or delete it"
            )
    else:
        storage.write_json(path, cfg.identity())


def missing_shards(cfg: SampleConfig, baseline: bool = False) -> list[int]:
    """Shards not yet written: of the samples, or (``baseline``) of the untrained baseline."""
    output, total, formats = ((baseline_output(cfg.output), cfg.baseline_images, ["parquet"]) if baseline
                              else (cfg.output, cfg.num_images, cfg.formats))
    present = set(storage.list_files(output))
    return [s for s in range(math.ceil(total / cfg.images_per_shard))
            if not all(f in present for f in shard_files(output, s, formats).values())]


def read_shard(output: str, shard: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One parquet shard: (indices, labels, uint8 NHWC images), ordered by index."""
    import pyarrow.parquet as pq

    t = pq.read_table(io.BytesIO(storage.read_bytes(shard_files(output, shard, ["parquet"])["parquet"])))
    index = np.asarray(t.column(INDEX_COLUMN).to_pylist(), dtype=np.int64)
    order = np.argsort(index)
    labels = np.asarray(t.column(LABEL_COLUMN).to_pylist(), dtype=np.int64)
    return index[order], labels[order], pngs_to_uint8(t.column(IMAGE_COLUMN).to_pylist())[order]


def read_images(output: str, num_images: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """All generated images (uint8 NHWC) and labels, ordered by index, from the parquet shards.
    Every image in memory at once: for tests and small runs; the job and evaluate read shard by shard."""
    import pyarrow.parquet as pq

    images, labels, indices = [], [], []
    for f in storage.list_files(storage.join(output, SAMPLE_PARQUET_DIR), suffix=".parquet"):
        t = pq.read_table(io.BytesIO(storage.read_bytes(f)))
        indices += t.column(INDEX_COLUMN).to_pylist()
        labels += t.column(LABEL_COLUMN).to_pylist()
        images.append(pngs_to_uint8(t.column(IMAGE_COLUMN).to_pylist()))
    if not images:
        raise FileNotFoundError(f"no parquet sample shards under {output}/parquet; sample with formats including parquet or npz")
    if num_images and len(indices) < num_images:
        raise RuntimeError(f"{output} holds {len(indices)} of the {num_images} sampled images: shards are missing "
                           "(written to another host's disk?); re-run the sample job (it generates only the missing shards)")
    order = np.argsort(indices)
    arr, lab = np.concatenate(images)[order], np.asarray(labels, dtype=np.int64)[order]
    return (arr[:num_images], lab[:num_images]) if num_images else (arr, lab)


def grid_rows(cfg: SampleConfig, labels: np.ndarray) -> np.ndarray:
    """The classes grid.png shows: ``grid_classes``, else up to GRID_MAX_CLASSES of the sampled
    classes, evenly spaced."""
    present = np.unique(labels)
    if cfg.grid_classes is None:
        return present[np.unique(np.linspace(0, len(present) - 1, min(len(present), GRID_MAX_CLASSES)).round().astype(int))]
    absent = sorted(set(cfg.grid_classes) - set(present.tolist()))
    if absent:
        raise ValueError(f"grid_classes {absent} are not among the sampled classes; choose from the class_labels sampled")
    return np.asarray(cfg.grid_classes, dtype=np.int64)


class GridBuilder:
    """grid.png filled as shards stream by: one row per class, up to ``per_class`` images each, a
    1-pixel gap (``dit_core.data.image_grid``). Its size is fixed by the classes and ``per_class``,
    never by the run."""

    def __init__(self, classes: np.ndarray, per_class: int):
        self.classes, self.per_class = [int(c) for c in classes], per_class
        self.filled = {c: 0 for c in self.classes}
        self.cells: np.ndarray | None = None   # (classes, per_class, H, W, C); white where not yet filled

    @property
    def full(self) -> bool:
        return all(n >= self.per_class for n in self.filled.values())

    def add(self, images: np.ndarray, labels: np.ndarray) -> None:
        if self.cells is None:
            self.cells = np.full((len(self.classes), self.per_class, *images.shape[1:]), 255, np.uint8)
        for image, label in zip(images, labels.tolist()):
            col = self.filled.get(label, self.per_class)
            if col < self.per_class:
                self.cells[self.classes.index(label), col] = image
                self.filled[label] = col + 1

    def png(self, scale: int = 4) -> bytes:
        return png_bytes(image_grid(self.cells, scale))


def finish(cfg: SampleConfig, labels: np.ndarray) -> list[str]:
    """The driver's finishing steps, one shard in memory at a time: ``samples.npz`` (the ADM suite's
    layout, its ``arr_0`` streamed into the zip) and ``grid.png``. Returns the files written."""
    want_npz = "npz" in cfg.formats
    builder = GridBuilder(grid_rows(cfg, labels), cfg.grid_per_class) if cfg.grid_per_class else None
    written = []
    with contextlib.ExitStack() as stack:
        writer = None
        for shard in range(math.ceil(cfg.num_images / cfg.images_per_shard)):
            if not want_npz and (builder is None or builder.full):
                break
            try:
                index, labs, images = read_shard(cfg.output, shard)
            except FileNotFoundError as e:
                raise RuntimeError(f"{cfg.output} lacks shard {shard} ({e}): written to another host's disk? "
                                   "Re-run the sample job (it generates only the missing shards)") from e
            expected = np.arange(shard * cfg.images_per_shard, min((shard + 1) * cfg.images_per_shard, cfg.num_images))
            if not np.array_equal(index, expected):
                raise RuntimeError(f"shard {shard} of {cfg.output} holds indices {index[:3].tolist()}... not "
                                   f"{expected[0]}..{expected[-1]}; delete it and re-run the sample job")
            if want_npz:
                if writer is None:
                    npz = storage.join(cfg.output, SAMPLES_NPZ_FILE)
                    writer = AdmNpzWriter(stack.enter_context(storage.open_output(npz)), cfg.num_images, images.shape[1:])
                    written.append(npz)
                writer.write(images, labs)
            if builder is not None:
                builder.add(images, labs)
        if writer is not None:
            writer.close()
    if builder is not None and builder.cells is not None:
        written.append(storage.join(cfg.output, SAMPLE_GRID_FILE))
        storage.write_bytes(written[-1], builder.png())
    return written


def shard_block(cfg: SampleConfig, kind: int, shard: int, labels: np.ndarray, total: int) -> Any:
    """The rows of one shard (index, label, seed, kind, shard) as one Arrow block."""
    import pyarrow as pa

    idx = np.arange(shard * cfg.images_per_shard, min((shard + 1) * cfg.images_per_shard, total))
    return pa.table({
        INDEX_COLUMN: pa.array(idx, pa.int64()),
        LABEL_COLUMN: pa.array(labels[idx], pa.int64()),
        SEED_COLUMN: pa.array([image_seed(cfg.seed, int(i)) for i in idx], pa.uint64()),
        "kind": pa.array(np.full(len(idx), kind), pa.int64()),
        "shard": pa.array(np.full(len(idx), shard), pa.int64()),
    })


def run(cfg: SampleConfig, progress: bool = True) -> dict[str, Any]:
    """Generate every missing shard of ``cfg.output`` (and of its baseline); return the closing summary."""
    import ray

    cfg = replace(cfg, output=storage.absolute(cfg.output))  # actors run in their own folders
    storage.check_writable(cfg.output)
    bundle = load_bundle(cfg.model, cfg.expect_preset)
    mc = bundle.config
    # before any work: an eps sampler on a flow model is refused; a meanflow model's guidance_scale is
    # set to 1 (warned once, here): the samples' record and the actors see what is sampled
    cfg = fit_sampling(bundle.diffusion, cfg)
    labels = cfg.labels(mc.num_classes)
    base_labels = cfg.labels(mc.num_classes, baseline=True)
    if cfg.grid_per_class:
        grid_rows(cfg, labels)   # chosen grid classes checked before any sampling
    autoencoder, scale = load_autoencoder_for(bundle, cfg.autoencoder, cfg.scale_factor)
    _check_resume(cfg)

    storage.remove_temporaries(cfg.output)  # a killed run's half-written shards
    todo = [(SAMPLES, s) for s in missing_shards(cfg)] + [(BASELINE, s) for s in missing_shards(cfg, baseline=True)]
    t0 = time.perf_counter()
    generated = {SAMPLES: 0, BASELINE: 0}
    if todo:
        init_ray()
        runtime.require_shared({"sample output": cfg.output}, runtime.cluster_hosts(), "the Ray cluster")
        runtime.require_persistent({"sample output": cfg.output})
        # The rows (index, label, seed), one block per shard: an actor gets whole shards, and no
        # shuffle is needed (a groupby's reduce tasks would wait for CPUs the actors hold).
        blocks = [shard_block(cfg, kind, shard, labels, cfg.num_images) if kind == SAMPLES
                  else shard_block(cfg, kind, shard, base_labels, cfg.baseline_images) for kind, shard in todo]
        bundle_ref = ray.put({"model": bundle, "autoencoder": autoencoder, "scale_factor": scale})
        out = runtime.map_with_actor_pool(
            ray.data.from_arrow(blocks), ShardGenerator, (bundle_ref, asdict(cfg)), work=len(todo),
            batch_size=None,             # whole blocks: a shard is never split across batches
            num_actors=cfg.num_actors, actor_num_cpus=cfg.actor_num_cpus, use_gpu=cfg.use_gpu, progress=progress,
            init_deaths=runtime.ACTOR_INIT_DEATHS,
        ).take_all()
        for r in out:
            generated[int(r["kind"])] += int(r["images"])
    if "npz" in cfg.formats or cfg.grid_per_class:
        finish(cfg, labels)
    seconds = time.perf_counter() - t0
    summary = {
        "images": cfg.num_images,
        "generated_now": generated[SAMPLES],
        "shards_generated_now": sum(kind == SAMPLES for kind, _ in todo),
        "baseline_images": cfg.baseline_images,     # an untrained model's, in baseline/ (evaluate's FID to beat)
        "baseline_generated_now": generated[BASELINE],
        "seconds": round(seconds, 3),
        "images_per_second": round(sum(generated.values()) / seconds, 3) if todo else 0.0,
        "model": bundle.source,
        "registered_model": bundle.registered_model,
        "version": bundle.version,
        MODEL_VERSION_KEY: bundle.pinned_uri,      # what was sampled: evaluate credits this, not the alias
        WEIGHTS_SHA256_KEY: bundle.weights_digest(),
        "mlflow_run_id": bundle.mlflow_run_id,
        "sampler": cfg.sampler,
        "num_steps": cfg.num_steps,
        "network_evaluations_per_image": make_objective(bundle.diffusion, learn_sigma=mc.learn_sigma).sampler(cfg.sampler, cfg.num_steps).num_evaluations
        * (2 if cfg.guidance_scale != 1.0 else 1),
        "guidance_scale": cfg.guidance_scale,
    }
    storage.write_json(storage.join(cfg.output, SAMPLE_SUMMARY_FILE), summary)
    return summary


def parse_args(argv: Sequence[str] | None = None) -> SampleConfig:
    """Flags from SampleConfig's fields (``--num-images 64 --sampler ddim --class-labels 3,7``), their
    defaults the dataclass's (= params.yaml's ``sample`` section); ``--params`` and ``--set`` as every
    job has them. Precedence: the params file, then ``--set``, then the field flags."""
    p = settings.command_parser(__doc__)
    p.add_argument("--model", required=True, help="models:/name/version, models:/name@alias, runs:/id/model, a checkpoint dir/.pt (local or s3://)")
    p.add_argument("--out", dest="out", default=None, help="output folder or s3:// prefix (required)")
    # the flag's name before every command took --out; kept for one release, hidden from --help
    p.add_argument("--output", dest="deprecated_output", default=None, help=argparse.SUPPRESS)
    settings.add_settings_arguments(p, SampleConfig, "sample", None, skip=("model", "output"), example="num_images=64 sampler=ddim")
    settings.add_arguments(p, SampleConfig, skip=("model", "output"))
    a = p.parse_args(argv)
    if a.deprecated_output is not None:
        print("ray_jobs.sample: --output is deprecated and goes in the next release; use --out", file=sys.stderr)
    out = a.out if a.out is not None else a.deprecated_output
    if out is None:
        p.error("the following arguments are required: --out")
    with p.refusing(a):
        given = {**settings.read_settings(a, SampleConfig, "sample"), **settings.from_args(a, SampleConfig)}
        return settings.build(SampleConfig, {**given, "model": a.model, "output": out}, "sample")


def main(argv: Sequence[str] | None = None) -> None:
    cfg = parse_args(argv)
    summary = run(cfg)
    print(
        f"sampled {summary['images']} images ({summary['generated_now']} now) in {summary['seconds']:.1f}s: "
        f"{summary['images_per_second']:.2f} images/s -> {cfg.output}"
    )
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    # The imported module's main, so that Ray ships ShardGenerator by reference (ray_jobs.sample on
    # the workers' path, e.g. a `ray job submit --working-dir .`) rather than this script by value.
    from ray_jobs.sample import main as _main

    _main()

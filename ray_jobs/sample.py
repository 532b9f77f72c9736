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
import os
import sys
import tarfile
import time
import uuid
from dataclasses import asdict, dataclass, field, replace
from typing import IO, Any, Iterator, Sequence

import numpy as np
import torch

from dit_core import settings
from dit_core.autoencoders import RECORD as AUTOENCODER_RECORD, load_autoencoder
from dit_core.data import png_bytes, pngs_to_uint8, to_uint8
from dit_core.diffusion import ALL_SAMPLERS, check_sampler, make_model_fn, make_objective, randn, sample_loop
from dit_core.metrics import AdmNpzWriter

from . import runtime, storage
from .model_source import ModelBundle, load_bundle
from .runtime import init_ray, use_assigned_cpus

FORMATS = ("png", "parquet", "npz")
CONFIG_FILE = "sample_config.json"
SUMMARY_FILE = "summary.json"
NPZ_FILE = "samples.npz"
GRID_FILE = "grid.png"
BASELINE_DIR = "baseline"        # the untrained model's samples, the same shard layout (parquet only)
GRID_MAX_CLASSES = 16            # grid.png has at most this many rows (classes) ...
GRID_MAX_PER_CLASS = 32          # ... of at most this many images: its size does not grow with the run


@dataclass
class SampleConfig:
    """The ``sample`` settings. These defaults are the project's (params.yaml repeats them for DVC)."""

    model: str                               # models:/name/3, models:/name@alias, runs:/..., checkpoint or .pt
    output: str                              # folder or s3:// prefix
    num_images: int = 1000
    class_labels: list[int] | str = "all"    # "all" (cycle through classes), "uniform" (random), or a list
    sampler: str = "dpm-solver++"            # eps models: ddpm | ddim | dpm-solver++; flow: euler | heun | dpm-solver++
    num_steps: int = 20
    eta: float = 0.0                         # ddim only
    guidance_scale: float = 2.0              # 1: no guidance
    guided_channels: int | None = None       # None: all latent channels; 3: the official variant
    cache_interval: int = 1                  # >1: run the blocks on one step in this many (BlockCache)
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

    def identity(self) -> dict[str, Any]:
        """The settings that decide the images (a resumed run must share them)."""
        keep = ("model", "num_images", "class_labels", "sampler", "num_steps", "eta", "guidance_scale",
                "guided_channels", "cache_interval", "seed", "images_per_shard", "autoencoder", "scale_factor",
                "baseline_images")
        return {k: v for k, v in asdict(self).items() if k in keep}


# ---------------------------------------------------------------------------------------------
# Rows: (index, class label, seed), a pure function of the config
# ---------------------------------------------------------------------------------------------

def image_seed(seed: int, index: int) -> int:
    """A 63-bit seed for image ``index`` of a run with ``seed``; independent across indices."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0] >> 1)


def class_labels_for(cfg: SampleConfig, num_classes: int) -> np.ndarray:
    n = cfg.num_images
    if cfg.class_labels == "all":
        return np.arange(n) % num_classes
    if cfg.class_labels == "uniform":
        return np.random.default_rng(cfg.seed).integers(0, num_classes, n)
    labels = np.asarray(list(cfg.class_labels), dtype=np.int64)
    if labels.size == 0:
        raise ValueError("class_labels is an empty list; give labels, 'all' or 'uniform'")
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if bad.size:
        raise ValueError(f"class labels {sorted(set(bad.tolist()))} are out of range: the model has {num_classes} classes (0..{num_classes - 1})")
    return labels[np.arange(n) % labels.size]


def shard_name(shard: int) -> str:
    return f"shard-{shard:06d}"


def baseline_output(output: str) -> str:
    return storage.join(output, BASELINE_DIR)


def shard_files(output: str, shard: int, formats: Sequence[str]) -> dict[str, str]:
    files = {}
    if "png" in formats:
        files["png"] = storage.join(output, "png", shard_name(shard) + ".tar")
    if "parquet" in formats or "npz" in formats:  # the npz batch is assembled from parquet shards
        files["parquet"] = storage.join(output, "parquet", shard_name(shard) + ".parquet")
    return files


# ---------------------------------------------------------------------------------------------
# The actor: loads the model and autoencoder once, generates and writes whole shards
# ---------------------------------------------------------------------------------------------

class ImageSampler:
    """The model, the autoencoder and the sampler settings, loaded once: labels and per-image seeds
    in, uint8 images out. Plain PyTorch (the Ray actor below wraps it)."""

    def __init__(self, bundle: ModelBundle, autoencoder: Any, scale_factor: float, cfg: SampleConfig,
                 model: torch.nn.Module | None = None):
        self.cfg = cfg
        use_cuda = torch.cuda.is_available() and cfg.use_gpu is not False
        self.device = torch.device("cuda" if use_cuda else "cpu")
        if use_cuda:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.model = (model if model is not None else bundle.build_model()).eval().to(self.device)
        self.autoencoder = autoencoder.to(self.device)
        self.scale_factor = float(scale_factor)
        self.objective = make_objective(bundle.diffusion, learn_sigma=self.model.config.learn_sigma)
        self.sampler = self.objective.sampler(cfg.sampler, cfg.num_steps, eta=cfg.eta)  # reset per trajectory

    def generate(self, labels: np.ndarray, seeds: np.ndarray) -> np.ndarray:
        """uint8 NHWC images for these labels and per-image seeds."""
        cfg, mc = self.cfg, self.model.config
        out = []
        for start in range(0, len(labels), cfg.batch_size):
            lab = torch.as_tensor(labels[start:start + cfg.batch_size], dtype=torch.long, device=self.device)
            gens = [torch.Generator().manual_seed(int(s)) for s in seeds[start:start + cfg.batch_size]]
            noise = randn((len(gens), mc.in_channels, mc.input_size, mc.input_size), gens, self.device)
            fn = make_model_fn(self.model, lab, cfg.guidance_scale, cfg.guided_channels, cfg.cache_interval)
            autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda" and cfg.bf16)
            with torch.no_grad(), autocast:
                latents = sample_loop(self.sampler, fn, noise, gens)
                images = self.autoencoder.decode(latents / self.scale_factor)
            out.append(to_uint8(images))
        return np.concatenate(out)


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
        self.samplers = {SAMPLES: ImageSampler(bundle["model"], bundle["autoencoder"], bundle["scale_factor"], self.cfg)}

    def sampler(self, kind: int) -> ImageSampler:
        if kind not in self.samplers:   # the untrained model, built on this actor when it first needs it
            b = self.bundle
            model = untrained_model(b["model"], self.cfg.seed)
            self.samplers[kind] = ImageSampler(b["model"], b["autoencoder"], b["scale_factor"], self.cfg, model=model)
        return self.samplers[kind]

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
            self.write_shard(kind, shard, rows["index"][mine], rows["label"][mine], rows["seed"][mine])
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
        images = self.sampler(kind).generate(labels, seeds)
        if kind == SAMPLES:
            files = shard_files(self.cfg.output, shard, self.cfg.formats)
        else:
            files = shard_files(baseline_output(self.cfg.output), shard, ["parquet"])
        pngs = [png_bytes(im) for im in images]
        if "parquet" in files:
            table = pa.table({
                "index": pa.array(index, pa.int64()),
                "label": pa.array(labels, pa.int32()),
                "seed": pa.array(seeds.astype(np.uint64), pa.uint64()),
                "image": pa.array(pngs, pa.binary()),
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

def validate(cfg: SampleConfig) -> None:
    if cfg.sampler not in ALL_SAMPLERS:
        raise ValueError(f"sampler {cfg.sampler!r} is unknown; choose one of {ALL_SAMPLERS}")
    if cfg.guidance_scale < 0:
        raise ValueError(f"guidance_scale={cfg.guidance_scale} must be >= 0 (1 = no guidance)")
    for name in ("num_images", "num_steps", "batch_size", "images_per_shard"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name}={getattr(cfg, name)} must be at least 1")
    if int(cfg.cache_interval) < 1:
        raise ValueError(f"cache_interval={cfg.cache_interval} must be at least 1 (1 = no caching)")
    if cfg.actor_num_cpus is not None and cfg.actor_num_cpus <= 0:
        raise ValueError(f"actor_num_cpus={cfg.actor_num_cpus} must be > 0 (a fraction is fine), or None for the default")
    if isinstance(cfg.class_labels, str) and cfg.class_labels not in ("all", "uniform"):
        raise ValueError(f"class_labels={cfg.class_labels!r}; use 'all', 'uniform' or a list of class ids")
    unknown = set(cfg.formats) - set(FORMATS)
    if unknown or not cfg.formats:
        raise ValueError(f"formats {sorted(unknown) or cfg.formats} not understood; choose from {FORMATS}")
    if cfg.baseline_images < 0:
        raise ValueError(f"baseline_images={cfg.baseline_images} must be >= 0 (0: no untrained baseline)")
    if not 0 <= cfg.grid_per_class <= GRID_MAX_PER_CLASS:
        raise ValueError(f"grid_per_class={cfg.grid_per_class} must be within 0..{GRID_MAX_PER_CLASS} (0: no grid.png)")
    if cfg.grid_classes is not None and not 1 <= len(cfg.grid_classes) <= GRID_MAX_CLASSES:
        raise ValueError(f"grid_classes has {len(cfg.grid_classes)} classes; give 1 to {GRID_MAX_CLASSES}, or null for evenly spaced ones")


def load_autoencoder_for(cfg: SampleConfig, bundle: ModelBundle) -> tuple[Any, float]:
    path = cfg.autoencoder or bundle.latents.get("autoencoder_path")
    if not path:
        raise ValueError(
            f"model {cfg.model!r} does not record its autoencoder (an official checkpoint?); pass --autoencoder "
            "with a diffusers AutoencoderKL folder, e.g. a local copy of stabilityai/sd-vae-ft-ema"
        )
    with storage.local_copy(path, AUTOENCODER_RECORD) as local:
        ae = load_autoencoder(local)
        ours = os.path.isfile(os.path.join(local, AUTOENCODER_RECORD))  # trained here, for one image size
    scale = cfg.scale_factor or bundle.latents.get("scale_factor") or getattr(ae, "scale_factor", None)
    if not scale:
        raise ValueError(f"no latent scale factor for autoencoder {path!r}; pass --scale-factor")
    mc = bundle.config
    latent_channels = getattr(ae, "latent_channels", mc.in_channels)
    if latent_channels != mc.in_channels:
        raise ValueError(
            f"the model takes {mc.in_channels}-channel latents but autoencoder {path!r} makes {latent_channels}; "
            "use the autoencoder the model was trained with"
        )
    trained_for = ae.record.image_size
    if ours and trained_for and trained_for != mc.input_size * ae.downsample:
        raise ValueError(
            f"the model makes {mc.input_size}x{mc.input_size} latents, which autoencoder {path!r} (downsample "
            f"{ae.downsample}) decodes to {mc.input_size * ae.downsample}px images, but it was trained on "
            f"{trained_for}px images; use the autoencoder the model was trained with"
        )
    return ae, float(scale)


def _check_resume(cfg: SampleConfig) -> None:
    path = storage.join(cfg.output, CONFIG_FILE)
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


# A lost actor or node costs only the shards it was writing: Ray Data's actor pool replaces a dead
# actor (on another node when its own is gone) and retries its shards there, without bound (a bound
# is spent in seconds while a lost node is not yet declared dead: every retry fails at once). Up to
# ACTOR_INIT_DEATHS actors in a row may also die while loading the model (Ray's default: none).
ACTOR_INIT_DEATHS = 3


def actor_pool(num_actors: int | None, actor_num_cpus: float | None, use_gpu: bool | None, work: int) -> tuple[int, float, bool]:
    """(actors, CPUs each, whether each holds a GPU) for an actor pool over ``work`` blocks: by
    default one actor per GPU when the cluster has GPUs (a whole GPU each), else one per CPU, the
    cores split evenly less a quarter core each for Ray Data's own tasks (and an actor fits on one
    node: a pool that asks for whole cores on a small machine starves those tasks and hangs)."""
    import ray

    resources = ray.cluster_resources()
    gpu = use_gpu if use_gpu is not None else resources.get("GPU", 0) > 0
    actors = max(1, min(num_actors or int(resources.get("GPU", 0) if gpu else resources.get("CPU", 1)), work))
    node_cpus = max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")), default=1)
    cpus = 1.0 if gpu else max(0.25, min(float(resources.get("CPU", 1)) / actors, node_cpus) - 0.25)
    if actor_num_cpus is not None and not gpu:
        cpus = float(actor_num_cpus)
    return actors, cpus, gpu


def read_shard(output: str, shard: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One parquet shard: (indices, labels, uint8 NHWC images), ordered by index."""
    import pyarrow.parquet as pq

    t = pq.read_table(io.BytesIO(storage.read_bytes(shard_files(output, shard, ["parquet"])["parquet"])))
    index = np.asarray(t.column("index").to_pylist(), dtype=np.int64)
    order = np.argsort(index)
    return index[order], np.asarray(t.column("label").to_pylist(), dtype=np.int64)[order], pngs_to_uint8(t.column("image").to_pylist())[order]


def read_images(output: str, num_images: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """All generated images (uint8 NHWC) and labels, ordered by index, from the parquet shards.
    Every image in memory at once: for tests and small runs; the job and evaluate read shard by shard."""
    import pyarrow.parquet as pq

    images, labels, indices = [], [], []
    for f in storage.list_files(storage.join(output, "parquet"), suffix=".parquet"):
        t = pq.read_table(io.BytesIO(storage.read_bytes(f)))
        indices += t.column("index").to_pylist()
        labels += t.column("label").to_pylist()
        images.append(pngs_to_uint8(t.column("image").to_pylist()))
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
    1-pixel gap. Its size is fixed by the classes and ``per_class``, never by the run."""

    def __init__(self, classes: np.ndarray, per_class: int):
        self.classes, self.per_class = [int(c) for c in classes], per_class
        self.filled = {c: 0 for c in self.classes}
        self.canvas: np.ndarray | None = None

    @property
    def full(self) -> bool:
        return all(n >= self.per_class for n in self.filled.values())

    def add(self, images: np.ndarray, labels: np.ndarray) -> None:
        h, w, c = images.shape[1:]
        if self.canvas is None:
            self.canvas = np.full((len(self.classes) * (h + 1) + 1, self.per_class * (w + 1) + 1, c), 255, np.uint8)
        for image, label in zip(images, labels.tolist()):
            col = self.filled.get(label, self.per_class)
            if col < self.per_class:
                row = self.classes.index(label)
                self.canvas[1 + row * (h + 1):1 + row * (h + 1) + h, 1 + col * (w + 1):1 + col * (w + 1) + w] = image
                self.filled[label] = col + 1

    def png(self, scale: int = 4) -> bytes:
        from PIL import Image

        img = Image.fromarray(self.canvas)
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)  # small images, visible
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        return buf.getvalue()


@contextlib.contextmanager
def open_output(uri: str) -> Iterator[IO[bytes]]:
    """A local file to write ``uri`` into; it appears at ``uri`` (renamed, or uploaded in chunks to
    S3) only when the block ends without an error. Memory: none beyond the copy buffer."""
    import shutil
    import tempfile

    fs, path = storage.resolve(uri)
    if storage.is_s3(uri):
        tmp = os.path.join(tempfile.gettempdir(), f"{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:8]}")
    else:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"   # remove_temporaries clears it if the job is killed
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        if storage.is_s3(uri):
            with open(tmp, "rb") as src, fs.open_output_stream(path) as dst:
                shutil.copyfileobj(src, dst, 16 << 20)
        else:
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


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
                    npz = storage.join(cfg.output, NPZ_FILE)
                    writer = AdmNpzWriter(stack.enter_context(open_output(npz)), cfg.num_images, images.shape[1:])
                    written.append(npz)
                writer.write(images, labs)
            if builder is not None:
                builder.add(images, labs)
        if writer is not None:
            writer.close()
    if builder is not None and builder.canvas is not None:
        written.append(storage.join(cfg.output, GRID_FILE))
        storage.write_bytes(written[-1], builder.png())
    return written


def shard_block(cfg: SampleConfig, kind: int, shard: int, labels: np.ndarray, total: int) -> Any:
    """The rows of one shard (index, label, seed, kind, shard) as one Arrow block."""
    import pyarrow as pa

    idx = np.arange(shard * cfg.images_per_shard, min((shard + 1) * cfg.images_per_shard, total))
    return pa.table({
        "index": pa.array(idx, pa.int64()),
        "label": pa.array(labels[idx], pa.int64()),
        "seed": pa.array([image_seed(cfg.seed, int(i)) for i in idx], pa.uint64()),
        "kind": pa.array(np.full(len(idx), kind), pa.int64()),
        "shard": pa.array(np.full(len(idx), shard), pa.int64()),
    })


def run(cfg: SampleConfig, progress: bool = True) -> dict[str, Any]:
    """Generate every missing shard of ``cfg.output`` (and of its baseline); return the closing summary."""
    import ray

    validate(cfg)
    cfg = replace(cfg, output=storage.absolute(cfg.output))  # actors run in their own folders
    storage.check_writable(cfg.output)
    bundle = load_bundle(cfg.model, cfg.expect_preset)
    mc = bundle.config
    check_sampler(bundle.diffusion, cfg.sampler)   # before any work: an eps sampler on a flow model is refused
    labels = class_labels_for(cfg, mc.num_classes)
    base_labels = class_labels_for(replace(cfg, num_images=cfg.baseline_images), mc.num_classes) if cfg.baseline_images else labels[:0]
    if cfg.grid_per_class:
        grid_rows(cfg, labels)   # chosen grid classes checked before any sampling
    autoencoder, scale = load_autoencoder_for(cfg, bundle)
    _check_resume(cfg)

    storage.remove_temporaries(cfg.output)  # a killed run's half-written shards
    todo = [(SAMPLES, s) for s in missing_shards(cfg)] + [(BASELINE, s) for s in missing_shards(cfg, baseline=True)]
    t0 = time.perf_counter()
    generated = {SAMPLES: 0, BASELINE: 0}
    if todo:
        init_ray()
        runtime.require_shared({"sample output": cfg.output}, runtime.cluster_hosts(), "the Ray cluster")
        runtime.require_persistent({"sample output": cfg.output})
        actors, cpus, use_gpu = actor_pool(cfg.num_actors, cfg.actor_num_cpus, cfg.use_gpu, len(todo))
        # The rows (index, label, seed), one block per shard: an actor gets whole shards, and no
        # shuffle is needed (a groupby's reduce tasks would wait for CPUs the actors hold).
        blocks = [shard_block(cfg, kind, shard, labels, cfg.num_images) if kind == SAMPLES
                  else shard_block(cfg, kind, shard, base_labels, cfg.baseline_images) for kind, shard in todo]
        bundle_ref = ray.put({"model": bundle, "autoencoder": autoencoder, "scale_factor": scale})
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = progress
        context.max_consecutive_actor_init_deaths = ACTOR_INIT_DEATHS
        out = ray.data.from_arrow(blocks).map_batches(
            ShardGenerator,
            batch_size=None,             # whole blocks: a shard is never split across batches
            fn_constructor_args=(bundle_ref, asdict(cfg)),
            batch_format="numpy",
            concurrency=actors,
            num_gpus=1 if use_gpu else 0,
            num_cpus=cpus,
            runtime_env={"env_vars": storage.aws_env()},
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
        "model_version": bundle.pinned_uri,        # what was sampled: evaluate credits this, not the alias
        "weights_sha256": bundle.weights_digest(),
        "mlflow_run_id": bundle.mlflow_run_id,
        "sampler": cfg.sampler,
        "num_steps": cfg.num_steps,
        "network_evaluations_per_image": make_objective(bundle.diffusion, learn_sigma=mc.learn_sigma).sampler(cfg.sampler, cfg.num_steps).num_evaluations
        * (2 if cfg.guidance_scale != 1.0 else 1),
        "guidance_scale": cfg.guidance_scale,
    }
    storage.write_json(storage.join(cfg.output, SUMMARY_FILE), summary)
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
    try:
        given = {**settings.read_settings(a, SampleConfig, "sample"), **settings.from_args(a, SampleConfig)}
        cfg = settings.build(SampleConfig, {**given, "model": a.model, "output": out}, "sample")
        validate(cfg)
    except (TypeError, ValueError) as e:
        p.error(str(e))
    return cfg


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

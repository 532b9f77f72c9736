"""Ray Data job: prepared image shards -> autoencoder latents (docs/CONTRACTS.md, ``data/latents/``).

Reads the prepared parquet shards, encodes them in ``map_batches`` with an actor pool whose actors
hold the autoencoder (one GPU per actor where the cluster has GPUs, a fraction of a CPU otherwise),
stores the unscaled posterior (mean, std) of each image (and, with ``flip_views``, of its horizontal
flip: only training with ``random_flip`` reads it) with its label, writes parquet latent shards and
then ``stats.json``, which names the views it holds. Published atomically
(``storage.begin_output``): a fresh version folder under the output, then the top-level
``stats.json`` naming it, so a failed or killed run leaves the previous latents as they were.

    python -m ray_jobs.encode --prepared data/prepared --autoencoder models/autoencoder --out data/latents
    ray job submit --working-dir . -- python -m ray_jobs.encode --prepared s3://b/prepared ...

``RAY_ADDRESS`` set: runs on that cluster; unset: starts a local Ray runtime.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import zlib
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from dit_core import settings
from dit_core.autoencoders import Autoencoder, load_autoencoder
from dit_core.contract import (AUTOENCODER_PATH_KEY, AUTOENCODER_RECORD_FILE, CLASS_NAMES_KEY, COUNTS_KEY, COUNT_KEY, DATASET_KEY,
                               FINGERPRINT_KEY, IMAGE_COLUMN, IMAGE_SIZE_KEY, KEY_COLUMN, LABEL_COLUMN, LATENT_SHAPE_KEY,
                               LATENT_STATS_FILE, LATENT_VIEWS, MANIFEST_FILE, NUM_CLASSES_KEY, SCALE_FACTOR_KEY, SHARDS_KEY,
                               SPLITS_KEY, VIEWS_KEY)
from dit_core.data import pngs_to_batch

from . import runtime, storage
from .runtime import init_ray, use_assigned_cpus

SPLITS = ("train", "val")
MODES = ("posterior", "sample")


@dataclass(frozen=True)
class EncodeConfig:
    """The ``encode`` settings (params.yaml repeats these defaults for DVC)."""

    prepared: str
    autoencoder: str  # folder (local or s3://) or a Hugging Face id in the local cache
    output: str
    batch_size: int = 256
    mode: str = "posterior"  # posterior: mean and std; sample: one seeded sample per view in `mean`, std 0
    seed: int = 0
    num_actors: int | None = None  # None: one per GPU, else cpu_actors
    cpu_actors: int = 2
    actor_num_cpus: float = 0.5  # a fraction, so the actor pool never starves Ray Data's read tasks
    flip_views: bool = False  # also store each image's horizontal flip (train.random_flip needs it): twice the work
    rows_per_group: int = 256  # parquet row group size: the unit a training worker reads (its memory is a few groups)

    @property
    def views(self) -> tuple[str, ...]:
        """The stored views, in LATENT_VIEWS order (stats.json ``views``)."""
        return ("image", "flip") if self.flip_views else ("image",)

    @property
    def columns(self) -> tuple[str, ...]:
        """The latent columns of the stored views."""
        return latent_columns(self.views)

    def validate(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"encode.mode={self.mode!r} is not one of {MODES}")
        for key in ("batch_size", "cpu_actors", "rows_per_group"):
            if getattr(self, key) < 1:
                raise ValueError(f"encode.{key}={getattr(self, key)} must be a positive integer")


def latent_columns(views: Sequence[str]) -> tuple[str, ...]:
    return tuple(c for v in views for c in LATENT_VIEWS[v])


# --------------------------------------------------------------------------------------------
# The actor: loads the autoencoder once, encodes batches
# --------------------------------------------------------------------------------------------

class EncodeBatch:
    """Callable class for ``map_batches``: the autoencoder arrives once per actor (an object ref
    resolved by Ray), moves to this actor's GPU if it has one, and encodes every batch it gets."""

    def __init__(self, autoencoder: Any, mode: str, seed: int, views: Sequence[str] = ("image",)):
        import ray

        if isinstance(autoencoder, ray.ObjectRef):  # constructor kwargs are passed as given, not resolved
            autoencoder = ray.get(autoencoder)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        use_assigned_cpus()
        self.ae = autoencoder.to(self.device)
        self.mode, self.seed = mode, seed
        unknown = set(views) - set(LATENT_VIEWS)
        if unknown or "image" not in views:
            raise ValueError(f"views={list(views)}: must hold 'image' and only views of {list(LATENT_VIEWS)}")
        self.views = tuple(v for v in LATENT_VIEWS if v in views)

    def _views(self, x: torch.Tensor, keys: list[str]) -> list[np.ndarray]:
        out = []
        for view in self.views:
            flip = view == "flip"
            mean, std = self.ae.encode(x.flip(-1) if flip else x)
            if self.mode == "sample":
                # One sample per (image, view), seeded by its key: the same on every run and actor.
                noise = torch.stack([
                    torch.randn(mean.shape[1:], generator=torch.Generator().manual_seed(
                        self.seed * 2 + int(flip) + 2 * zlib.crc32(k.encode())))
                    for k in keys
                ]).to(mean.device)
                mean, std = mean + std * noise, torch.zeros_like(std)
            out += [mean.flatten(1).cpu().numpy(), std.flatten(1).cpu().numpy()]
        return out

    def __call__(self, batch: pa.Table) -> pa.Table:
        """Rows of prepared shards (with their file ``path``) -> latent rows with their ``split``."""
        keys = batch.column(KEY_COLUMN).to_pylist()
        x = pngs_to_batch(batch.column(IMAGE_COLUMN).to_pylist())
        arrays = self._views(x, keys)
        columns = {name: _list_array(a) for name, a in zip(latent_columns(self.views), arrays, strict=True)}
        columns[LABEL_COLUMN] = batch.column(LABEL_COLUMN).cast(pa.int32())
        columns[KEY_COLUMN] = batch.column(KEY_COLUMN)
        # prepared shards live at <prepared>/<split>/part-NNNNN.parquet
        columns["split"] = pa.array([p.rsplit("/", 2)[-2] for p in batch.column("path").to_pylist()], pa.string())
        return pa.table(columns)


def _list_array(a: np.ndarray) -> pa.Array:
    """(N, D) float32 -> list<float32> (the contract's column type; fixed-size lists would tie
    readers to one latent size)."""
    a = np.ascontiguousarray(a, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(a.reshape(-1)), a.shape[1]).cast(pa.list_(pa.float32()))


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------

def actor_resources(cfg: EncodeConfig) -> tuple[int, dict[str, float]]:
    """(pool size, per-actor resources): a whole GPU per actor where GPUs exist, else a CPU fraction."""
    import ray

    gpus = int(ray.cluster_resources().get("GPU", 0))
    if gpus:
        return (cfg.num_actors or gpus), {"num_gpus": 1}
    return (cfg.num_actors or cfg.cpu_actors), {"num_cpus": cfg.actor_num_cpus}


def encode_splits(cfg: EncodeConfig, ae_ref: Any, prepared_folder: str, shards: list[str], dest: str, num_rows: int) -> None:
    """All splits in one Ray Data execution (one actor pool start): read the shards (relative to
    ``prepared_folder``, the published version), encode with the actor pool, write parquet
    partitioned by split to ``dest/split=<name>/``."""
    import ray

    fs, _ = storage.resolve(cfg.prepared)
    paths = [storage.resolve(storage.join(prepared_folder, s))[1] for s in shards]
    pool_size, resources = actor_resources(cfg)
    # The parquet reader may hand over all the rows as one block, which only one actor of the pool
    # could work on: split them (streaming, no shuffle) into about four blocks per actor, of 1 to
    # 16 batches each (per-block task overhead against a balanced pool).
    rows_per_block = min(max(cfg.batch_size, math.ceil(num_rows / (4 * pool_size))), 16 * cfg.batch_size)
    # Blocks leave the pool in input order (a dataset keeps the context it was made in), so the
    # shards' rows and row groups are the same on every run: a training run resumed after a
    # re-encode finds the data order it started with.
    options = ray.data.DataContext.get_current().execution_options
    before, options.preserve_order = options.preserve_order, True
    try:
        ds = ray.data.read_parquet(paths, filesystem=fs, columns=[IMAGE_COLUMN, LABEL_COLUMN, KEY_COLUMN], include_paths=True)
    finally:
        options.preserve_order = before
    ds = ds.repartition(target_num_rows_per_block=rows_per_block)
    ds = ds.map_batches(
        EncodeBatch,
        fn_constructor_kwargs={"autoencoder": ae_ref, "mode": cfg.mode, "seed": cfg.seed, "views": cfg.views},
        batch_size=cfg.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=pool_size),
        **resources,
    )
    out_fs, out_path = storage.resolve(dest)
    ds.write_parquet(out_path, filesystem=out_fs, partition_cols=["split"], row_group_size=cfg.rows_per_group)


def arrange_shards(staging: str) -> dict[str, list[str]]:
    """Move Ray's ``split=<name>/<uuid>.parquet`` files to the contract's ``<name>/part-NNNNN.parquet``."""
    fs, base = storage.resolve(staging)
    written: dict[str, list[str]] = {s: [] for s in SPLITS}
    for split in SPLITS:
        files = storage.list_files(storage.join(staging, f"split={split}"), ".parquet")
        for i, f in enumerate(files):
            name = f"{split}/part-{i:05d}.parquet"
            fs.create_dir(f"{base}/{split}", recursive=True)
            fs.move(storage.resolve(f)[1], f"{base}/{name}")
            written[split].append(storage.join(staging, name))
        storage.delete(storage.join(staging, f"split={split}"))
    return written


def latent_stats(splits: dict[str, list[str]], latent_shape: tuple[int, int, int], columns: Sequence[str]) -> dict[str, Any]:
    """Channel mean/std of the train split's posterior means and an order-independent hash of the
    rows' ``columns``, read back from the written shards (so they describe exactly what is on disk)."""
    channels = latent_shape[0]
    total = np.zeros(channels)
    total_sq = np.zeros(channels)
    n = 0
    row_hashes: list[str] = []
    counts = {}
    for split, files in splits.items():
        counts[split] = 0
        for f in files:
            fs, path = storage.resolve(f)
            table = pq.read_table(path, filesystem=fs, columns=[*columns, LABEL_COLUMN, KEY_COLUMN])
            counts[split] += table.num_rows
            flat = {c: table.column(c).combine_chunks().flatten().to_numpy().reshape(table.num_rows, -1) for c in columns}
            for c in columns:
                if flat[c].shape[1] != int(np.prod(latent_shape)):
                    raise ValueError(f"{f}: column {c} has {flat[c].shape[1]} values per row, expected {latent_shape}")
            if split == "train":
                m = flat[LATENT_VIEWS["image"][0]].reshape(table.num_rows, channels, -1).astype(np.float64)
                total += m.sum(axis=(0, 2))
                total_sq += (m ** 2).sum(axis=(0, 2))
                n += m.shape[0] * m.shape[2]
            labels = table.column(LABEL_COLUMN).to_pylist()
            for i, key in enumerate(table.column(KEY_COLUMN).to_pylist()):
                h = hashlib.sha256(f"{split}\t{key}\t{labels[i]}\t".encode())
                for c in columns:
                    h.update(flat[c][i].tobytes())
                row_hashes.append(h.hexdigest())
    mean = total / max(n, 1)
    std = np.sqrt(np.maximum(total_sq / max(n, 1) - mean ** 2, 0))
    content = hashlib.sha256("\n".join(sorted(row_hashes)).encode()).hexdigest()
    return {"channel_mean": mean.tolist(), "channel_std": std.tolist(), COUNTS_KEY: counts, "content_sha256": content}


def latents_fingerprint(input_fingerprint: str, ae: Autoencoder, cfg: EncodeConfig) -> str:
    """What identifies the latents: the prepared data, the autoencoder's weights and record, and the
    encode settings that change values or columns (mode, seed, the stored views, so that latents with
    and without the flip view never pass for each other). Not the float bytes, whose last bits vary
    with batch size, device and thread count (``content_sha256`` pins those)."""
    h = hashlib.sha256(f"{input_fingerprint}\t{json.dumps(asdict(ae.record), sort_keys=True)}\t{cfg.mode}\t"
                       f"views={','.join(cfg.views)}\t".encode())
    if cfg.mode == "sample":
        h.update(f"seed={cfg.seed}".encode())
    for name, tensor in sorted(ae.vae.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def check_autoencoder(ae: Autoencoder, source: str, image_size: int, trained_here: bool) -> None:
    """Refuse an autoencoder that cannot encode the prepared images: one that does not take RGB, or
    (one of ours, trained for a single size) one trained on images of another size."""
    in_channels = int(getattr(ae.vae.config, "in_channels", 3))
    if in_channels != 3:
        raise ValueError(f"autoencoder {source!r} takes {in_channels}-channel images, and the prepared images are RGB "
                         "(3 channels); use an RGB autoencoder (encode.autoencoder / --autoencoder)")
    if trained_here and ae.record.image_size and ae.record.image_size != image_size:
        raise ValueError(f"autoencoder {source!r} was trained on {ae.record.image_size}px images, and the prepared images "
                         f"are {image_size}px; re-run train_autoencoder on these images, or prepare at {ae.record.image_size}px")


def encode(cfg: EncodeConfig) -> dict[str, Any]:
    """Run the job; returns the stats.json contents."""
    import ray

    cfg.validate()
    if storage.is_s3(cfg.output):  # a missing bucket or refused credentials: now, not after the encoding
        storage.check_writable(cfg.output)
    manifest_uri = storage.join(cfg.prepared, MANIFEST_FILE)
    if not storage.exists(manifest_uri):
        raise FileNotFoundError(f"{manifest_uri} not found: {cfg.prepared} is not a complete prepared data set; run prepare")
    manifest = storage.read_json(manifest_uri)
    with storage.local_copy(cfg.autoencoder, AUTOENCODER_RECORD_FILE) as path:
        ae = load_autoencoder(path)  # on the driver: the actors get it through the object store
        ours = os.path.isfile(os.path.join(path, AUTOENCODER_RECORD_FILE))  # trained here, for one image size
    check_autoencoder(ae, cfg.autoencoder, int(manifest[IMAGE_SIZE_KEY]), ours)
    latent_shape = ae.latent_shape(int(manifest[IMAGE_SIZE_KEY]))
    init_ray()
    runtime.require_shared({"encode input": cfg.prepared, "encode output": cfg.output}, runtime.cluster_hosts(), "the Ray cluster")
    runtime.require_persistent({"encode output": cfg.output})
    ae_ref = ray.put(ae.to("cpu"))
    staging = storage.begin_output(cfg.output, LATENT_STATS_FILE)
    try:
        shards = [s for split in SPLITS for s in manifest[SPLITS_KEY][split][SHARDS_KEY]]
        encode_splits(cfg, ae_ref, storage.version_folder(cfg.prepared, manifest), shards, staging,
                      sum(int(manifest[SPLITS_KEY][s][COUNT_KEY]) for s in SPLITS))
        written = arrange_shards(staging)
        stats = {
            "autoencoder_id": ae.id,
            AUTOENCODER_PATH_KEY: storage.absolute(cfg.autoencoder) if os.path.exists(cfg.autoencoder) else cfg.autoencoder,
            SCALE_FACTOR_KEY: ae.scale_factor,
            LATENT_SHAPE_KEY: list(latent_shape),
            NUM_CLASSES_KEY: manifest[NUM_CLASSES_KEY],
            CLASS_NAMES_KEY: manifest[CLASS_NAMES_KEY],
            DATASET_KEY: manifest.get(DATASET_KEY),
            "input_fingerprint": manifest[FINGERPRINT_KEY],
            "mode": cfg.mode,
            VIEWS_KEY: list(cfg.views),
            SHARDS_KEY: {s: [f[len(staging):].lstrip("/") for f in files] for s, files in written.items()},
            FINGERPRINT_KEY: latents_fingerprint(manifest[FINGERPRINT_KEY], ae, cfg),
            **latent_stats(written, latent_shape, cfg.columns),
        }
        expected = {s: manifest[SPLITS_KEY][s][COUNT_KEY] for s in SPLITS}
        if stats[COUNTS_KEY] != expected:
            raise RuntimeError(f"encoded {stats['counts']} rows but {cfg.prepared} holds {expected}")
        storage.write_json(storage.join(staging, LATENT_STATS_FILE), stats)  # last: completes the version
        stats = storage.commit_output(staging, cfg.output, LATENT_STATS_FILE)  # publishes it
    except BaseException:
        storage.abort_output(staging, cfg.output)
        raise
    return stats


def config_from(prepared: str, autoencoder: str, output: str, params: dict[str, Any]) -> EncodeConfig:
    return settings.build(EncodeConfig, {**params, "prepared": prepared, "autoencoder": autoencoder, "output": output}, "encode")


def command_parser(doc: str | None, params_file: str | None) -> settings.CommandParser:
    """The flags of the job and of its DVC stage (``pipelines/encode.py``, whose ``--params`` defaults
    to ``params_file``); ``doc`` heads the ``--help``."""
    p = settings.command_parser(doc)
    p.add_argument("--prepared", required=True, help="prepared data folder or s3:// URI (the prepare stage's output)")
    p.add_argument("--autoencoder", required=True, help="autoencoder folder, s3:// URI or Hugging Face id (local cache)")
    p.add_argument("--out", required=True, help="latents folder or s3:// URI to write")
    settings.add_settings_arguments(p, EncodeConfig, "encode", params_file, skip=("prepared", "autoencoder", "output"),
                                    example="batch_size=64")
    return p


def main(argv: list[str] | None = None) -> int:
    """``ray job submit`` entry point; settings from ``--params`` (default: ./params.yaml if present,
    else EncodeConfig's defaults) and ``--set`` overrides."""
    p = command_parser(__doc__, None)
    a = p.parse_args(argv)
    with p.refusing(a):
        cfg = config_from(a.prepared, a.autoencoder, a.out, settings.read_settings(a, EncodeConfig, "encode"))
        cfg.validate()
    stats = encode(cfg)
    print(json.dumps({k: stats[k] for k in ("autoencoder_id", SCALE_FACTOR_KEY, LATENT_SHAPE_KEY, VIEWS_KEY, COUNTS_KEY)}))
    return 0


if __name__ == "__main__":
    # The imported module's main: Ray then ships the encoder actor by reference (ray_jobs.encode on
    # the workers' path) rather than pickling this script's __main__ by value.
    from ray_jobs.encode import main as _main

    sys.exit(_main())

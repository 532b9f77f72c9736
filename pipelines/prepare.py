"""prepare stage: a source of labelled images -> RGB ``image_size`` squares in parquet shards.

Sources (``prepare.source``):
- ``digits``: scikit-learn's 1,797 labelled 8x8 digits, bundled with scikit-learn (offline). They
  are upsampled to ``image_size`` by design, so the "smaller than image_size" rule does not apply.
- ``imagefolder``: ``<path>/<class name>/<any/sub/dirs>/<file>``, local or ``s3://bucket/prefix``.
- ``parquet``: one file or a folder of files with an image column (encoded bytes, or a struct
  with a ``bytes`` field as Hugging Face datasets write it) and a label column (int or string).

How: the driver lists the source, fixes each input's split (seeded, stratified) and its place in
the output (seeded order, ``rows_per_shard`` inputs per shard) before anything is decoded. Each
shard is then one unit of work: read, decode, ADM-crop, write ``<split>/part-NNNNN.parquet``. For
imagefolder and parquet the shards run as Ray Data tasks over the cluster's CPUs
(``num_workers`` at once); the digits run in this process. What a shard holds depends only on the
plan, never on which worker ran it or when, so the manifest and its fingerprint are the same
whatever the number of workers.

Output (docs/CONTRACTS.md): ``{train,val}/part-NNNNN.parquet`` (image PNG bytes, label int32, key
string) and ``manifest.json``, published atomically: they go to a fresh version folder
``<out>/v-<n>/`` and ``<out>/manifest.json`` naming it is written last (``storage.begin_output``),
so a failed or killed run leaves the previous output as it was, and the next run removes its leftovers.

    python -m pipelines.prepare --out data/prepared [--params params.yaml]
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import sys
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from dit_core import settings
from dit_core.contract import (CLASS_NAMES_KEY, COUNT_KEY, DATASET_KEY, FINGERPRINT_KEY, IMAGE_COLUMN, IMAGE_SIZE_KEY, KEY_COLUMN,
                               LABEL_COLUMN, MANIFEST_FILE, NUM_CLASSES_KEY, SHARDS_KEY, SPLITS_KEY)
from dit_core.data import BadImage, png_bytes, prepare_image
from pipelines.common import SPLITS, StageIO, run_stage, stage_arguments, write_parquet
from ray_jobs import runtime, storage

SOURCES = ("digits", "imagefolder", "parquet")
SCHEMA = pa.schema([(IMAGE_COLUMN, pa.binary()), (LABEL_COLUMN, pa.int32()), (KEY_COLUMN, pa.string())])
IMAGEFOLDER_LAYOUT = "<path>/<class name>/<image files>"


@dataclass(frozen=True)
class PrepareConfig:
    """The ``prepare`` settings (params.yaml repeats these defaults for DVC)."""

    source: str = "digits"  # digits | imagefolder | parquet
    path: str | None = None  # imagefolder/parquet: local folder or s3://bucket/prefix
    image_size: int = 16  # digits (8x8) are upsampled; other sources skip smaller images
    val_fraction: float = 0.1
    seed: int = 0
    rows_per_shard: int = 1000  # also the unit of work: one Ray task reads, decodes and writes a shard
    max_skipped_fraction: float = 0.01  # share of inputs that may be skipped before the stage fails
    num_workers: int | None = None  # imagefolder/parquet: shards decoded at once (Ray tasks of 1 CPU); null: every CPU of the cluster
    read_threads: int = 4  # threads per worker fetching files (S3 reads wait on the network)
    image_column: str = "image"  # parquet source only
    label_column: str = "label"
    key_column: str | None = None

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> "PrepareConfig":
        cfg = settings.build(cls, params, "prepare")
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"prepare.source={self.source!r} is not one of {SOURCES}")
        if self.source != "digits" and not self.path:
            raise ValueError(f"prepare.source={self.source!r} needs prepare.path (a local folder or s3:// URI)")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"prepare.val_fraction={self.val_fraction} must be in [0, 1)")
        if self.image_size < 1 or self.rows_per_shard < 1 or self.read_threads < 1:
            raise ValueError("prepare.image_size, rows_per_shard and read_threads must be positive")
        if self.num_workers is not None and self.num_workers < 1:
            raise ValueError(f"prepare.num_workers={self.num_workers} must be positive, or null for every CPU")


@dataclass(frozen=True)
class Item:
    """One input, as plain values a Ray task can receive."""

    key: str  # the source's name for the item: relative file path, parquet file#row, digits/NNNN
    label: int
    where: str  # imagefolder: file URI; parquet: file path on the source's filesystem; digits: index
    row: int = -1  # parquet: row in that file


@dataclass
class Listing:
    class_names: list[str]
    items: list[Item]
    skipped: list[dict[str, str]]  # inputs rejected while listing (empty class folder, ...)
    shuffle: bool  # False where items must be read in order (parquet files stream row groups)


# --------------------------------------------------------------------------------------------
# Sources: listing (driver) and reading (workers)
# --------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _digit_pixels() -> tuple[np.ndarray, np.ndarray, list[str]]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    max_value = 16.0  # sklearn's digits are 4-bit intensities in [0, 16]
    pixels = np.round(digits.images / max_value * 255).astype(np.uint8)
    return pixels, digits.target, [str(n) for n in digits.target_names]


def list_digits() -> Listing:
    _, targets, names = _digit_pixels()
    items = [Item(f"digits/{i:04d}", int(y), str(i)) for i, y in enumerate(targets)]
    return Listing(names, items, [], shuffle=True)


def _list_tree(root: str) -> tuple[pafs.FileInfo, list[pafs.FileInfo]]:
    """(info of ``root``, everything under it); refuses a missing or unreadable ``root``."""
    fs, path = storage.resolve(root)
    try:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(
                f"prepare.path={root} does not exist: set prepare.path to an existing folder or s3://bucket/prefix "
                f"(imagefolder: {IMAGEFOLDER_LAYOUT}; parquet: a .parquet file or a folder of them)")
        if info.type != pafs.FileType.Directory:
            return info, [info]
        return info, fs.get_file_info(pafs.FileSelector(path, recursive=True))
    except FileNotFoundError:
        raise
    except OSError as e:
        raise PermissionError(
            f"cannot list source {root}: {e}. Check prepare.path, the bucket name and the AWS_* credentials/endpoint."
        ) from e


def list_imagefolder(root: str) -> Listing:
    fs, base = storage.resolve(root)
    info, infos = _list_tree(root)
    if info.type != pafs.FileType.Directory:
        raise ValueError(f"prepare.path={root} is a file, but source imagefolder reads a folder {IMAGEFOLDER_LAYOUT}: "
                         "set prepare.path to that folder (or prepare.source: parquet for a parquet file)")
    by_class: dict[str, list[str]] = {}
    skipped: list[dict[str, str]] = []
    for entry in infos:
        rel = entry.path[len(base):].strip("/")
        parts = rel.split("/")
        if any(p.startswith(".") for p in parts):  # .DS_Store, .ipynb_checkpoints: not inputs
            continue
        if entry.type == pafs.FileType.Directory:
            if len(parts) == 1:
                by_class.setdefault(parts[0], [])
        elif len(parts) == 1:
            skipped.append({"key": rel, "reason": "file is not inside a class folder"})
        else:
            by_class.setdefault(parts[0], []).append(rel)
    for name in sorted(n for n, files in by_class.items() if not files):
        skipped.append({"key": f"{name}/", "reason": "empty class folder"})
    class_names = sorted(n for n, files in by_class.items() if files)
    if not class_names:
        loose = sum(s["reason"] == "file is not inside a class folder" for s in skipped)
        found = (f"{loose} files directly under it and no class folder" if loose else
                 f"only empty class folders ({', '.join(sorted(by_class))})" if by_class else "nothing in it")
        raise ValueError(f"prepare.path={root} has {found}: source imagefolder expects {IMAGEFOLDER_LAYOUT}, class ids "
                         "from the folder names. Move the images into one folder per class, or point prepare.path "
                         "at the folder that holds the class folders")
    where = storage.absolute(root)  # workers may run in another folder
    items = [Item(rel, label, storage.join(where, rel)) for label, name in enumerate(class_names)
             for rel in sorted(by_class[name])]
    return Listing(class_names, items, skipped, shuffle=True)


def list_parquet(root: str, image_column: str, label_column: str, key_column: str | None) -> Listing:
    fs, base = storage.resolve(root)
    _, infos = _list_tree(root)
    files = sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(".parquet"))
    if not files:
        raise ValueError(f"prepare.path={root} holds no .parquet files: set prepare.path to a parquet file or a "
                         f"folder of them (or prepare.source: imagefolder for {IMAGEFOLDER_LAYOUT})")
    rows: list[tuple[str, str, int, Any]] = []  # (key, file, row, label value)
    for path in files:
        schema = pq.read_schema(path, filesystem=fs)
        for col in (image_column, label_column):
            if col not in schema.names:
                raise ValueError(
                    f"{path} has no column {col!r} (columns: {schema.names}); set prepare.image_column/label_column"
                )
        cols = [label_column] + ([key_column] if key_column and key_column in schema.names else [])
        table = pq.read_table(path, filesystem=fs, columns=cols)
        labels = table.column(label_column).to_pylist()
        keys = table.column(key_column).to_pylist() if len(cols) == 2 else None
        name = path[len(base):].strip("/") or path.rsplit("/", 1)[-1]
        for row, value in enumerate(labels):
            rows.append((str(keys[row]) if keys else f"{name}#{row}", path, row, value))
    skipped = [{"key": k, "reason": "missing label"} for k, _, _, v in rows if v is None]
    values = sorted({v for _, _, _, v in rows if v is not None})
    index = {v: i for i, v in enumerate(values)}
    items = [Item(k, index[v], p, r) for k, p, r, v in rows if v is not None]
    return Listing([str(v) for v in values], items, skipped, shuffle=False)


def list_source(cfg: PrepareConfig) -> Listing:
    if cfg.source == "digits":
        return list_digits()
    if cfg.source == "imagefolder":
        return list_imagefolder(cfg.path)
    return list_parquet(cfg.path, cfg.image_column, cfg.label_column, cfg.key_column)


def _read_parquet_rows(fs: pafs.FileSystem, column: str, items: list[Item]) -> Iterator[bytes | OSError]:
    """The encoded images of ``items`` (in file order), reading only the row groups that hold them."""
    file: tuple[str, pq.ParquetFile, np.ndarray] | None = None  # (path, reader, first row of each group)
    group: tuple[int, pa.ChunkedArray] | None = None  # (row group, its image column)
    for it in items:
        try:
            if file is None or file[0] != it.where:
                reader = pq.ParquetFile(it.where, filesystem=fs)
                sizes = [reader.metadata.row_group(g).num_rows for g in range(reader.metadata.num_row_groups)]
                file, group = (it.where, reader, np.cumsum([0] + sizes)), None
            g = int(np.searchsorted(file[2], it.row, side="right")) - 1
            if group is None or group[0] != g:
                group = (g, file[1].read_row_group(g, columns=[column]).column(0))
            value = group[1][it.row - int(file[2][g])].as_py()
        except OSError as e:
            yield e
            continue
        if isinstance(value, dict):  # Hugging Face datasets' Image feature: {"bytes": ..., "path": ...}
            value = value.get("bytes")
        yield value or b""


def read_items(source: str, root: str | None, items: list[Item], threads: int, image_column: str) -> Iterator[bytes | OSError]:
    """The encoded bytes of each item, in order (an OSError in place of an unreadable one)."""
    if source == "digits":
        pixels = _digit_pixels()[0]
        yield from (png_bytes(np.repeat(pixels[int(it.where)][..., None], 3, axis=2)) for it in items)
    elif source == "parquet":
        yield from _read_parquet_rows(storage.resolve(root)[0], image_column, items)
    else:
        def fetch(it: Item) -> bytes | OSError:
            try:
                return storage.read_bytes(it.where)
            except OSError as e:
                return e

        with ThreadPoolExecutor(threads) as pool:  # fetches overlap; decoding stays on this worker's CPU
            yield from pool.map(fetch, items)


# --------------------------------------------------------------------------------------------
# Plan: splits and shards, fixed before anything is decoded
# --------------------------------------------------------------------------------------------

def assign_splits(items: list[Item], val_fraction: float, seed: int) -> dict[str, str]:
    """key -> split, stratified by class and fixed by the seed. Decided before decoding, so a
    skipped image leaves its own split and never moves another image across. One pass groups the
    keys by class; then each class's sorted keys take the next permutation of one seeded stream."""
    by_label: dict[int, list[str]] = defaultdict(list)
    for it in items:
        by_label[it.label].append(it.key)
    rng = np.random.default_rng(seed)
    split: dict[str, str] = {}
    for label in sorted(by_label):
        keys = sorted(by_label[label])
        n_val = int(round(val_fraction * len(keys)))
        for rank, i in enumerate(rng.permutation(len(keys))):
            split[keys[i]] = "val" if rank < n_val else "train"
    return split


@dataclass(frozen=True)
class Shard:
    """One unit of work: ``items`` (in output order) of one split -> ``<split>/part-<index>.parquet``."""

    split: str
    index: int
    positions: list[int]  # each item's place in the plan's order (the fingerprint's order)
    items: list[Item]

    @property
    def name(self) -> str:
        return f"{self.split}/part-{self.index:05d}.parquet"


def plan_shards(items: list[Item], splits: dict[str, str], rows_per_shard: int) -> list[Shard]:
    """Cut each split's items, in the given order, into shards of ``rows_per_shard`` inputs. A shard
    whose inputs are partly skipped holds fewer rows; one whose inputs are all skipped is not written."""
    by_split: dict[str, list[int]] = {s: [] for s in SPLITS}
    for pos, it in enumerate(items):
        by_split[splits[it.key]].append(pos)
    return [Shard(split, k // rows_per_shard, positions[k:k + rows_per_shard],
                  [items[p] for p in positions[k:k + rows_per_shard]])
            for split, positions in by_split.items() for k in range(0, len(positions), rows_per_shard)]


# --------------------------------------------------------------------------------------------
# Work: one shard (in a Ray task, or in this process for the digits)
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ShardJob:
    """What every shard's task needs besides its items (plain values, shipped to the workers)."""

    source: str
    root: str | None
    out: str  # the staging folder
    image_size: int
    read_threads: int
    image_column: str
    # The driver's AWS_* variables: a worker has its node's environment, and a runtime_env would start
    # new workers for every change of it and print it with Ray Data's task options.
    env: dict[str, str] = field(default_factory=dict, repr=False)


def _clean_reason(reason: str) -> str:
    """A reason without the memory addresses some exceptions print (``<_io.BytesIO object at 0x7f..>``),
    so that the manifest is the same on every run."""
    return re.sub(r" at 0x[0-9a-fA-F]+", "", reason)


def _process(data: bytes | OSError, image_size: int, allow_upsample: bool) -> tuple[bytes | None, str | None]:
    """(png, conversion note) or (None, skip reason)."""
    if isinstance(data, OSError):
        return None, _clean_reason(f"unreadable ({type(data).__name__}: {data})")
    try:
        return prepare_image(data, image_size, allow_upsample)
    except BadImage as e:
        return None, _clean_reason(e.reason)


def run_shard(shard: Shard, job: ShardJob) -> dict[str, Any]:
    """Read, decode and write one shard. Returns per position: the PNG's sha256 (written rows), the
    skip reason or the conversion note; and the shard's name when it has rows."""
    allow_upsample = job.source == "digits"  # digits are 8x8: upsampled by design
    rows: list[tuple[bytes, int, str]] = []
    done: dict[str, Any] = {"sha256": {}, "skipped": {}, "converted": {}, "shard": None}
    data = read_items(job.source, job.root, shard.items, job.read_threads, job.image_column)
    for pos, item, raw in zip(shard.positions, shard.items, data):
        png, note = _process(raw, job.image_size, allow_upsample)
        if png is None:
            done["skipped"][pos] = note
            continue
        if note:
            done["converted"][pos] = note
        done["sha256"][pos] = hashlib.sha256(png).hexdigest()
        rows.append((png, item.label, item.key))
    if rows:
        images, labels, keys = zip(*rows)
        table = pa.table([pa.array(images, pa.binary()), pa.array(labels, pa.int32()), pa.array(keys, pa.string())],
                         schema=SCHEMA)
        write_parquet(storage.join(job.out, shard.name), table)
        done["shard"] = shard.name
    return done


def _ray_task(row: dict[str, Any], job: ShardJob) -> dict[str, Any]:
    """Ray Data ``map`` function: a shard (as JSON, so Arrow keeps it as given) -> its result (JSON)."""
    os.environ.update(job.env)
    spec = json.loads(row["shard"])
    shard = Shard(spec["split"], spec["index"], spec["positions"], [Item(**it) for it in spec["items"]])
    return {"result": json.dumps(run_shard(shard, job))}


def run_shards_ray(shards: list[Shard], job: ShardJob, num_workers: int | None) -> list[dict[str, Any]]:
    """Every shard as one Ray Data task of one CPU, ``num_workers`` at once (None: as many as the
    cluster's CPUs allow). The results come back in any order; the caller orders them by position."""
    import ray

    specs = [{"shard": json.dumps({"split": s.split, "index": s.index, "positions": s.positions,
                                   "items": [asdict(it) for it in s.items]})} for s in shards]
    results = ray.data.from_items(specs, override_num_blocks=len(specs)).map(
        _ray_task,
        fn_kwargs={"job": job},
        num_cpus=1,
        compute=ray.data.TaskPoolStrategy(size=num_workers),
    ).take_all()
    return [_json_result(r["result"]) for r in results]


def _json_result(text: str) -> dict[str, Any]:
    done = json.loads(text)
    for name in ("sha256", "skipped", "converted"):  # JSON object keys are strings
        done[name] = {int(k): v for k, v in done[name].items()}
    return done


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------

def prepare(cfg: PrepareConfig, out: str, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the stage: list, plan, decode and write shards, check the skip share, write the manifest."""
    listing = list_source(cfg)  # refuses a missing path or one without classes before any work
    items = listing.items
    if listing.shuffle:  # class-mixed shards, so any one shard is a fair sample
        items = [items[i] for i in np.random.default_rng(cfg.seed + 1).permutation(len(items))]
    splits = assign_splits(items, cfg.val_fraction, cfg.seed)
    shards = plan_shards(items, splits, cfg.rows_per_shard)
    num_inputs = len(listing.items) + len(listing.skipped)
    log(f"prepare: {len(listing.items)} inputs in {len(listing.class_names)} classes from {cfg.source} "
        f"{cfg.path or ''}, {len(shards)} shards")
    on_ray = cfg.source != "digits"
    if on_ray:
        runtime.init_ray()
        runtime.require_shared({"prepare.path": cfg.path, "prepare output": out}, runtime.cluster_hosts(),
                               "the Ray cluster")

    staging = storage.begin_output(out, MANIFEST_FILE)
    try:
        job = ShardJob(cfg.source, cfg.path and storage.absolute(cfg.path), storage.absolute(staging), cfg.image_size,
                       cfg.read_threads, cfg.image_column, storage.aws_env())
        results = run_shards_ray(shards, job, cfg.num_workers) if on_ray else [run_shard(s, job) for s in shards]
        manifest = _manifest(cfg, listing, items, splits, results, num_inputs)
        _check_skipped(manifest["skipped"], num_inputs, cfg)
        if manifest[SPLITS_KEY]["train"][COUNT_KEY] == 0:
            raise ValueError(f"no usable training images from {cfg.source} {cfg.path or ''}")
        storage.write_json(storage.join(staging, MANIFEST_FILE), manifest)  # last: completes the version
        manifest = storage.commit_output(staging, out, MANIFEST_FILE)  # publishes it
    except BaseException:
        storage.abort_output(staging, out)
        raise
    log(
        f"prepare: train {manifest['splits']['train']['count']}, val {manifest['splits']['val']['count']}, "
        f"skipped {len(manifest['skipped'])}, converted {manifest['converted']['count']} -> {out}"
    )
    return manifest


def _manifest(cfg: PrepareConfig, listing: Listing, items: list[Item], splits: dict[str, str],
              results: list[dict[str, Any]], num_inputs: int) -> dict[str, Any]:
    """The manifest from the shards' results, walked in the plan's order (one pass), so that it is
    the same whatever order the results came back in."""
    sha = [None] * len(items)
    skipped_at: dict[int, str] = {}
    converted_at: dict[int, str] = {}
    written: dict[str, list[str]] = {s: [] for s in SPLITS}
    for done in results:
        for pos, h in done["sha256"].items():
            sha[pos] = h
        skipped_at.update(done["skipped"])
        converted_at.update(done["converted"])
        if done["shard"]:
            written[done["shard"].split("/", 1)[0]].append(done["shard"])
    skipped = list(listing.skipped)
    converted: Counter[str] = Counter()
    per_class: dict[str, Counter[int]] = {s: Counter() for s in SPLITS}
    digest = hashlib.sha256()
    for pos, item in enumerate(items):
        if pos in skipped_at:
            skipped.append({"key": item.key, "reason": skipped_at[pos]})
            continue
        if sha[pos] is None:
            raise RuntimeError(f"prepare: no result for input {item.key}: a shard's task was lost; run the stage again")
        if pos in converted_at:
            converted[converted_at[pos]] += 1
        split = splits[item.key]
        per_class[split][item.label] += 1
        digest.update(f"{split}\t{item.key}\t{item.label}\t{sha[pos]}\n".encode())
    digest.update(f"image_size={cfg.image_size}\n".encode())
    return {
        "source": {"type": cfg.source, "path": cfg.path},
        DATASET_KEY: dataset_name(cfg),
        IMAGE_SIZE_KEY: cfg.image_size,
        NUM_CLASSES_KEY: len(listing.class_names),
        CLASS_NAMES_KEY: listing.class_names,
        "seed": cfg.seed,
        "val_fraction": cfg.val_fraction,
        "num_inputs": num_inputs,
        SPLITS_KEY: {
            s: {COUNT_KEY: sum(c.values()), "per_class": {str(k): c[k] for k in sorted(c)}, SHARDS_KEY: sorted(written[s])}
            for s, c in per_class.items()
        },
        "skipped": skipped,
        "skipped_reasons": dict(Counter(_reason_kind(s["reason"]) for s in skipped)),
        "converted": {"count": sum(converted.values()), "by_reason": dict(converted)},
        FINGERPRINT_KEY: digest.hexdigest(),
    }


def dataset_name(cfg: PrepareConfig) -> str:
    """The data set's name, which the registered model's default name follows (``dit-<name>``):
    ``digits``, else the last part of ``prepare.path`` (``s3://bucket/images/flowers/`` -> ``flowers``),
    lower case, characters other than letters, digits, ``.``, ``_`` and ``-`` as ``-``."""
    if cfg.source == "digits" or not cfg.path:
        return cfg.source
    last = str(cfg.path).rstrip("/").rsplit("/", 1)[-1]
    last = os.path.splitext(last)[0] if cfg.source == "parquet" and last.endswith(".parquet") else last
    name = re.sub(r"[^a-z0-9._-]+", "-", last.lower()).strip("-.")
    return name or cfg.source


def _reason_kind(reason: str) -> str:
    """The reason without its details, for the summary counts ("not a decodable image (...)")."""
    return reason.split(" (", 1)[0].split(",", 1)[0]


def _check_skipped(skipped: list[dict[str, str]], num_inputs: int, cfg: PrepareConfig) -> None:
    share = len(skipped) / max(num_inputs, 1)
    if share > cfg.max_skipped_fraction:
        examples = "; ".join(f"{s['key']}: {s['reason']}" for s in skipped[:5])
        raise RuntimeError(
            f"prepare: {len(skipped)} of {num_inputs} inputs ({share:.1%}) from {cfg.source} {cfg.path or ''} are "
            f"unusable, above prepare.max_skipped_fraction={cfg.max_skipped_fraction:.1%}. First ones: {examples}. "
            "Fix or remove those files, or raise prepare.max_skipped_fraction."
        )


def main(argv: list[str] | None = None) -> int:
    flags = {"--out": "output folder or s3:// URI (from dvc.yaml)"}
    p, a, params = stage_arguments(argv, __doc__, flags, PrepareConfig, "prepare", "source=imagefolder path=s3://b/images")
    with p.refusing(a):
        cfg = PrepareConfig.from_params(params)
    run_stage("prepare", a, StageIO(outputs=("out",), settings_paths=lambda _: {"prepare.path": cfg.path}),
              lambda job: prepare(cfg, job.out))
    return 0


if __name__ == "__main__":
    # The imported module's main, not __main__'s: Ray then ships the shard task (_ray_task) by
    # reference to pipelines.prepare rather than pickling this script by value, which the workers
    # could not unpickle (`python -m pipelines.prepare` with an imagefolder or parquet source).
    from pipelines.prepare import main as _main

    sys.exit(_main())

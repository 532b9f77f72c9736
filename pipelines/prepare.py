"""prepare stage: a source of labelled images -> RGB ``image_size`` squares in parquet shards.

Sources (``prepare.source``):
- ``digits``: scikit-learn's 1,797 labelled 8x8 digits, bundled with scikit-learn (offline). They
  are upsampled to ``image_size`` by design, so the "smaller than image_size" rule does not apply.
- ``imagefolder``: ``<path>/<class name>/<any/sub/dirs>/<file>``, local or ``s3://bucket/prefix``.
- ``parquet``: one file or a folder of files with an image column (encoded bytes, or a struct
  with a ``bytes`` field as Hugging Face datasets write it) and a label column (int or string).

Output (docs/CONTRACTS.md): ``<out>/{train,val}/part-NNNNN.parquet`` (image PNG bytes, label
int32, key string) and ``<out>/manifest.json``, written last; locally the whole folder is built
under a temporary name and renamed, so a failed or killed run leaves nothing that looks complete.

    python -m pipelines.prepare --out data/prepared [--params params.yaml]
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import sys
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from dit_core import settings
from dit_core.data import BadImage, png_bytes, prepare_image
from pipelines.common import MANIFEST, SPLITS, StageIO, load_params, run_stage, write_parquet
from ray_jobs import storage

SOURCES = ("digits", "imagefolder", "parquet")
SCHEMA = pa.schema([("image", pa.binary()), ("label", pa.int32()), ("key", pa.string())])
CHUNK = 256  # items decoded per thread-pool round: bounds memory, keeps all workers busy


@dataclass(frozen=True)
class PrepareConfig:
    """The ``prepare`` settings (params.yaml repeats these defaults for DVC)."""

    source: str = "digits"  # digits | imagefolder | parquet
    path: str | None = None  # imagefolder/parquet: local folder or s3://bucket/prefix
    image_size: int = 16  # digits (8x8) are upsampled; other sources skip smaller images
    val_fraction: float = 0.1
    seed: int = 0
    rows_per_shard: int = 1000
    max_skipped_fraction: float = 0.01  # share of inputs that may be skipped before the stage fails
    workers: int = 4  # threads that read and decode (S3 reads are latency-bound)
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
        if self.image_size < 1 or self.rows_per_shard < 1 or self.workers < 1:
            raise ValueError("prepare.image_size, rows_per_shard and workers must be positive")


@dataclass(frozen=True)
class Item:
    key: str  # the source's name for the item: relative file path, parquet file#row, digits/NNNN
    label: int
    fetch: Callable[[], bytes]  # reads the encoded bytes; run in a worker thread


@dataclass
class Listing:
    class_names: list[str]
    items: list[Item]
    skipped: list[dict[str, str]]  # inputs rejected while listing (empty class folder, ...)
    shuffle: bool  # False where items must be read in order (parquet files stream row groups)


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------

def list_digits() -> Listing:
    from sklearn.datasets import load_digits

    digits = load_digits()
    max_value = 16.0  # sklearn's digits are 4-bit intensities in [0, 16]
    pixels = np.round(digits.images / max_value * 255).astype(np.uint8)

    def fetch(i: int) -> Callable[[], bytes]:
        return lambda: png_bytes(np.repeat(pixels[i][..., None], 3, axis=2))

    items = [Item(f"digits/{i:04d}", int(y), fetch(i)) for i, y in enumerate(digits.target)]
    return Listing([str(n) for n in digits.target_names], items, [], shuffle=True)


def _list_tree(root: str) -> list[pafs.FileInfo]:
    fs, path = storage.resolve(root)
    try:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"source {root} does not exist: check prepare.path")
        return fs.get_file_info(pafs.FileSelector(path, recursive=True))
    except FileNotFoundError:
        raise
    except OSError as e:
        raise PermissionError(
            f"cannot list source {root}: {e}. Check prepare.path, the bucket name and the AWS_* credentials/endpoint."
        ) from e


def list_imagefolder(root: str) -> Listing:
    fs, base = storage.resolve(root)
    infos = _list_tree(root)
    by_class: dict[str, list[str]] = {}
    skipped: list[dict[str, str]] = []
    for info in infos:
        rel = info.path[len(base):].strip("/")
        parts = rel.split("/")
        if any(p.startswith(".") for p in parts):  # .DS_Store, .ipynb_checkpoints: not inputs
            continue
        if info.type == pafs.FileType.Directory:
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
        raise ValueError(f"no class folder with files under {root}: expected {root}/<class name>/<image files>")

    def fetch(rel: str) -> Callable[[], bytes]:
        uri = storage.join(root, rel)
        return lambda: storage.read_bytes(uri)

    items = [Item(rel, label, fetch(rel)) for label, name in enumerate(class_names) for rel in sorted(by_class[name])]
    return Listing(class_names, items, skipped, shuffle=True)


class _ParquetColumnCache:
    """The image column of the parquet file being read; items come in file order, so each file is
    read once. A lock because worker threads share it."""

    def __init__(self, fs: pafs.FileSystem, column: str):
        self.fs, self.column = fs, column
        self.lock = threading.Lock()
        self.path: str | None = None
        self.values: pa.ChunkedArray | None = None

    def get(self, path: str, row: int) -> bytes:
        with self.lock:
            if path != self.path:
                self.values = pq.read_table(path, filesystem=self.fs, columns=[self.column]).column(0)
                self.path = path
            value = self.values[row].as_py()
        if isinstance(value, dict):  # Hugging Face datasets' Image feature: {"bytes": ..., "path": ...}
            value = value.get("bytes")
        return value or b""


def list_parquet(root: str, image_column: str, label_column: str, key_column: str | None) -> Listing:
    fs, base = storage.resolve(root)
    infos = _list_tree(root) if fs.get_file_info(base).type == pafs.FileType.Directory else [fs.get_file_info(base)]
    files = sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(".parquet"))
    if not files:
        raise ValueError(f"no .parquet files under {root}")
    cache = _ParquetColumnCache(fs, image_column)
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
    class_names = [str(v) for v in values]
    index = {v: i for i, v in enumerate(values)}

    def fetch(path: str, row: int) -> Callable[[], bytes]:
        return lambda: cache.get(path, row)

    items = [Item(k, index[v], fetch(p, r)) for k, p, r, v in rows if v is not None]
    return Listing(class_names, items, skipped, shuffle=False)


def list_source(cfg: PrepareConfig) -> Listing:
    if cfg.source == "digits":
        return list_digits()
    if cfg.source == "imagefolder":
        return list_imagefolder(cfg.path)
    return list_parquet(cfg.path, cfg.image_column, cfg.label_column, cfg.key_column)


# --------------------------------------------------------------------------------------------
# Split, decode, write
# --------------------------------------------------------------------------------------------

def assign_splits(items: list[Item], val_fraction: float, seed: int) -> dict[str, str]:
    """key -> split, stratified by class and fixed by the seed. Decided before decoding, so a
    skipped image leaves its own split and never moves another image across."""
    rng = np.random.default_rng(seed)
    split: dict[str, str] = {}
    for label in sorted({it.label for it in items}):
        keys = sorted(it.key for it in items if it.label == label)
        order = rng.permutation(len(keys))
        n_val = int(round(val_fraction * len(keys)))
        for rank, i in enumerate(order):
            split[keys[i]] = "val" if rank < n_val else "train"
    return split


class ShardWriter:
    """Buffers rows of one split and writes ``<split>/part-NNNNN.parquet`` files."""

    def __init__(self, out: str, split: str, rows_per_shard: int):
        self.out, self.split, self.rows_per_shard = out, split, rows_per_shard
        self.rows: list[tuple[bytes, int, str]] = []
        self.shards: list[str] = []
        self.per_class: Counter[int] = Counter()

    def add(self, image: bytes, label: int, key: str) -> None:
        self.rows.append((image, label, key))
        self.per_class[label] += 1
        if len(self.rows) >= self.rows_per_shard:
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        name = f"{self.split}/part-{len(self.shards):05d}.parquet"
        images, labels, keys = zip(*self.rows)
        table = pa.table([pa.array(images, pa.binary()), pa.array(labels, pa.int32()), pa.array(keys, pa.string())],
                         schema=SCHEMA)
        write_parquet(storage.join(self.out, name), table)
        self.shards.append(name)
        self.rows = []

    @property
    def count(self) -> int:
        return sum(self.per_class.values())


def _process(item: Item, image_size: int, allow_upsample: bool) -> tuple[bytes | None, str | None]:
    """(png, conversion note) or (None, skip reason)."""
    try:
        data = item.fetch()
    except OSError as e:
        return None, f"unreadable ({type(e).__name__}: {e})"
    try:
        return prepare_image(data, image_size, allow_upsample)
    except BadImage as e:
        return None, e.reason


def _chunks(items: Iterable[Item], size: int) -> Iterator[list[Item]]:
    it = iter(items)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def prepare(cfg: PrepareConfig, out: str, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the stage: list, split, decode, write shards, check the skip share, write the manifest."""
    listing = list_source(cfg)
    items = listing.items
    if listing.shuffle:  # class-mixed shards, so any one shard is a fair sample
        items = [items[i] for i in np.random.default_rng(cfg.seed + 1).permutation(len(items))]
    splits = assign_splits(items, cfg.val_fraction, cfg.seed)
    num_inputs = len(listing.items) + len(listing.skipped)
    log(f"prepare: {len(listing.items)} inputs in {len(listing.class_names)} classes from {cfg.source} {cfg.path or ''}")

    staging = storage.begin_output(out)
    try:
        writers = {s: ShardWriter(staging, s, cfg.rows_per_shard) for s in SPLITS}
        skipped = list(listing.skipped)
        converted: Counter[str] = Counter()
        digest = hashlib.sha256()
        allow_upsample = cfg.source == "digits"  # digits are 8x8: upsampled by design
        with ThreadPoolExecutor(cfg.workers) as pool:
            for chunk in _chunks(items, CHUNK):
                results = pool.map(lambda it: _process(it, cfg.image_size, allow_upsample), chunk)
                for item, (png, note) in zip(chunk, results):
                    if png is None:
                        skipped.append({"key": item.key, "reason": note})
                        continue
                    if note:
                        converted[note] += 1
                    split = splits[item.key]
                    writers[split].add(png, item.label, item.key)
                    digest.update(f"{split}\t{item.key}\t{item.label}\t{hashlib.sha256(png).hexdigest()}\n".encode())
        _check_skipped(skipped, num_inputs, cfg)
        for w in writers.values():
            w.flush()
        if writers["train"].count == 0:
            raise ValueError(f"no usable training images from {cfg.source} {cfg.path or ''}")
        digest.update(f"image_size={cfg.image_size}\n".encode())
        manifest = {
            "source": {"type": cfg.source, "path": cfg.path},
            "image_size": cfg.image_size,
            "num_classes": len(listing.class_names),
            "class_names": listing.class_names,
            "seed": cfg.seed,
            "val_fraction": cfg.val_fraction,
            "num_inputs": num_inputs,
            "splits": {
                s: {"count": w.count, "per_class": {str(k): w.per_class[k] for k in sorted(w.per_class)}, "shards": w.shards}
                for s, w in writers.items()
            },
            "skipped": skipped,
            "skipped_reasons": dict(Counter(_reason_kind(s["reason"]) for s in skipped)),
            "converted": {"count": sum(converted.values()), "by_reason": dict(converted)},
            "fingerprint": digest.hexdigest(),
        }
        storage.write_json(storage.join(staging, MANIFEST), manifest)  # last: marks the output complete
        storage.commit_output(staging, out)
    except BaseException:
        storage.abort_output(staging, out)
        raise
    log(
        f"prepare: train {manifest['splits']['train']['count']}, val {manifest['splits']['val']['count']}, "
        f"skipped {len(skipped)}, converted {manifest['converted']['count']} -> {out}"
    )
    return manifest


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
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output folder or s3:// URI (from dvc.yaml)")
    p.add_argument("--params", default="params.yaml")
    a = p.parse_args(argv)
    cfg = PrepareConfig.from_params(load_params("prepare", a.params))
    run_stage("prepare", a, StageIO(outputs=("out",), settings_paths=lambda _: {"prepare.path": cfg.path}),
              lambda job: prepare(cfg, job.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Streaming training input: each worker reads only its share of the latents' parquet row groups,
shuffles them inside a bounded window and prefetches the next window on a thread while the model
computes. A worker's memory is a few windows, whatever the size of the data set.

The data order (which rows, in which order, which ones flipped) is a pure function of (seed, epoch,
worker count, shuffle window, the row-group layout of the latents):

- the units are the row groups, split in equal pieces only where a row group is too large for the
  ranks' shares to stay balanced (small data, large batches);
- every epoch the units are permuted with a generator seeded by (seed, epoch) and dealt in that
  order, each to the rank with the fewest rows so far, so the ranks read disjoint parts of every
  epoch and their shares differ by less than one unit;
- a rank cuts its units, in that order, into windows of at least ``shuffle_rows`` rows and
  permutes the rows of each window with a generator seeded by (seed, epoch, rank, window); the flip
  choice of each row is drawn there too;
- every rank yields the same number of micro-batches per epoch (the least any rank's rows allow),
  so the last rows of the larger shares are left out of that epoch (other rows each epoch).

Resume is exact mid-epoch: the stream that starts at micro-batch k yields exactly what the stream
from 0 yields from its k-th micro-batch on (only the windows from there are read). Choosing a
micro-batch's rows costs O(batch): the permutation is per window, not per data set.
"""

from __future__ import annotations

import heapq
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dit_core.contract import (FINGERPRINT_KEY, LABEL_COLUMN, LATENT_SHAPE_KEY, LATENT_STATS_FILE, LATENT_VIEWS, NUM_CLASSES_KEY,
                               SCALE_FACTOR_KEY, SHARDS_KEY, VIEWS_KEY)
from dit_core.training import derive_seed

from . import runtime, storage

# stats.json without "views" was written before encode.flip_views existed, always with both views
VIEWS_BEFORE_FLIP_VIEWS = ("image", "flip")
# seeds of the two generators of an epoch (distinct streams of derive_seed)
_UNIT_ORDER, _WINDOW_ORDER = 1, 2


@dataclass(frozen=True)
class Unit:
    """One parquet row group of a train shard."""

    file: str          # URI
    group: int         # row group index in the file
    rows: int
    first_row: int     # index of its first row in the listing (shard order, then row order)
    offset: int = 0    # first row within the row group (a piece of a large row group)


def scan_units(files: Sequence[str], threads: int = 8) -> list[Unit]:
    """The row groups of ``files`` (parquet footers only; no data is read). An empty shard is refused."""

    def footer(uri: str) -> pq.FileMetaData:
        fs, path = storage.resolve(uri)
        with fs.open_input_file(path) as f:
            return pq.ParquetFile(f).metadata

    with ThreadPoolExecutor(min(threads, max(len(files), 1))) as pool:
        metas = list(pool.map(footer, files))
    units, first = [], 0
    for uri, meta in zip(files, metas):
        if meta.num_rows == 0:
            raise ValueError(f"latents shard {uri} has no rows; re-run the encode stage (or remove the shard and its "
                             "entry in stats.json 'shards')")
        for g in range(meta.num_row_groups):
            n = meta.row_group(g).num_rows
            if n:
                units.append(Unit(uri, g, n, first))
                first += n
    return units


def split_units(units: Sequence[Unit], max_rows: int) -> list[Unit]:
    """Units of at most ``max_rows`` rows: each larger row group cut into equal pieces."""
    out = []
    for u in units:
        k = -(-u.rows // max_rows)
        bounds = [u.rows * i // k for i in range(k + 1)]
        out += [Unit(u.file, u.group, b - a, u.first_row + a, u.offset + a) for a, b in zip(bounds, bounds[1:])]
    return out


def plan_stream(units: Sequence[Unit], per_rank: int, world_size: int, seed: int, shuffle_rows: int,
                flip_prob: float = 0.0) -> tuple["StreamPlan", list[Unit]]:
    """The plan and its units. A unit is at most (rows per rank - rows per micro-batch) rows, so that
    every epoch gives every rank at least one micro-batch (the greedy deal keeps the ranks' shares
    within one unit of each other)."""
    total = sum(u.rows for u in units)
    room = total // world_size - per_rank
    if room < 1:
        raise ValueError(
            f"a micro-batch of {per_rank} rows per worker is too large for a worker's share of the data ({total} rows, "
            f"{world_size} workers): lower train.batch_size (or use fewer workers)")
    pieces = split_units(units, room)
    return StreamPlan(tuple(u.rows for u in pieces), per_rank, world_size, seed, shuffle_rows, flip_prob), pieces


@dataclass(frozen=True)
class StreamPlan:
    """Which rows each rank reads in each micro-batch (see the module docstring)."""

    unit_rows: tuple[int, ...]     # rows of each unit, in listing order
    per_rank: int                  # rows per rank per micro-batch
    world_size: int
    seed: int
    shuffle_rows: int = 1024       # a window holds at least this many rows (whole units)
    flip_prob: float = 0.0         # share of rows read as their horizontal flip
    _deals: dict = field(default_factory=dict, compare=False, repr=False)     # a few epochs' deals
    _batches: dict = field(default_factory=dict, compare=False, repr=False)   # micro-batches of each epoch

    def __post_init__(self) -> None:
        if not 0.0 <= self.flip_prob <= 1.0:
            raise ValueError(f"flip_prob={self.flip_prob} must be in [0, 1]")
        if self.shuffle_rows < 1 or self.per_rank < 1 or self.world_size < 1:
            raise ValueError(f"shuffle_rows={self.shuffle_rows}, per_rank={self.per_rank} and world_size={self.world_size} "
                             "must be positive")
        if self.batches_in_epoch(0) < 1:
            raise ValueError(
                f"a micro-batch of {self.per_rank} rows per worker is more than a worker's share of the data "
                f"({min(self.rank_rows(0, r) for r in range(self.world_size))} rows of {sum(self.unit_rows)}, "
                f"{self.world_size} workers); lower train.batch_size")

    def deal(self, epoch: int) -> list[list[int]]:
        """The units of each rank in epoch ``epoch``: a seeded permutation dealt to the least-loaded rank."""
        key = epoch
        if key not in self._deals:
            order = np.random.default_rng(derive_seed(self.seed, _UNIT_ORDER, epoch)).permutation(len(self.unit_rows))
            shares: list[list[int]] = [[] for _ in range(self.world_size)]
            heap = [(0, r) for r in range(self.world_size)]  # (rows so far, rank): ties go to the lower rank
            for u in order.tolist():
                rows, r = heapq.heappop(heap)
                shares[r].append(u)
                heapq.heappush(heap, (rows + self.unit_rows[u], r))
            if len(self._deals) > 8:
                self._deals.clear()
            self._deals[key] = shares
        return self._deals[key]

    def units_of(self, epoch: int, rank: int) -> np.ndarray:
        return np.asarray(self.deal(epoch)[rank], dtype=np.int64)

    def rank_rows(self, epoch: int, rank: int) -> int:
        return int(sum(self.unit_rows[u] for u in self.deal(epoch)[rank]))

    def batches_in_epoch(self, epoch: int) -> int:
        if epoch not in self._batches:
            self._batches[epoch] = min(self.rank_rows(epoch, r) for r in range(self.world_size)) // self.per_rank
        return self._batches[epoch]

    def locate(self, micro: int) -> tuple[int, int]:
        """(epoch, micro-batch within it) of the ``micro``-th micro-batch of the run."""
        epoch = 0
        while micro >= self.batches_in_epoch(epoch):
            n = self.batches_in_epoch(epoch)
            if n < 1:
                raise ValueError(f"epoch {epoch} gives no whole micro-batch of {self.per_rank} rows per worker; lower train.batch_size")
            micro -= n
            epoch += 1
        return epoch, micro

    def epoch_of(self, micro: int) -> int:
        return self.locate(micro)[0]

    def windows(self, epoch: int, rank: int) -> list[np.ndarray]:
        """This rank's units of the epoch, cut into windows of at least ``shuffle_rows`` rows (the last may be smaller)."""
        out, current, n = [], [], 0
        for u in self.units_of(epoch, rank):
            current.append(u)
            n += self.unit_rows[u]
            if n >= self.shuffle_rows:
                out.append(np.array(current))
                current, n = [], 0
        if current:
            out.append(np.array(current))
        return out

    def window_order(self, epoch: int, rank: int, window: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(permutation of the window's n rows, flip flag of each row in that new order)."""
        rng = np.random.default_rng(derive_seed(self.seed, _WINDOW_ORDER, epoch, rank, window))
        perm = rng.permutation(n)
        flips = rng.random(n) < self.flip_prob
        return perm, flips


@dataclass
class Batch:
    """One micro-batch of a rank: the chosen view's posterior mean and std (N, C, H, W) float32,
    labels, and each row's index in the listing (for tests and audits)."""

    mean: np.ndarray
    std: np.ndarray
    labels: np.ndarray
    rows: np.ndarray
    flips: np.ndarray


def _column(table: pa.Table, name: str, shape: tuple[int, ...], where: str) -> np.ndarray:
    col = table.column(name).combine_chunks()
    flat = col.flatten().to_numpy(zero_copy_only=False)
    n = table.num_rows
    if flat.size != n * int(np.prod(shape)):
        raise ValueError(f"{where}: column {name} has {flat.size / max(n, 1):g} values per row; stats.json latent_shape "
                         f"{list(shape)} says {int(np.prod(shape))}; re-run the encode stage")
    return flat.astype(np.float32, copy=False).reshape(n, *shape)


class LatentStream:
    """Micro-batches of one rank, from micro-batch ``start`` of the run on (an endless iterator over
    epochs). A thread reads the next window while the caller computes; ``wait_seconds`` adds up the
    time the caller waited for data."""

    def __init__(self, plan: StreamPlan, units: Sequence[Unit], shape: Sequence[int], rank: int, start: int = 0,
                 prefetch: int = 1):
        if len(units) != len(plan.unit_rows):
            raise ValueError("the plan and the units describe different latents")
        self.plan, self.units, self.shape, self.rank, self.start = plan, list(units), tuple(shape), rank, start
        views = ("image", "flip") if plan.flip_prob > 0 else ("image",)
        self.columns = [c for v in views for c in LATENT_VIEWS[v]]
        self.wait_seconds = 0.0
        self._queue: queue.Queue = queue.Queue(maxsize=max(prefetch, 1))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._files: dict[str, pq.ParquetFile] = {}

    # -- reading -----------------------------------------------------------------------------
    def _file(self, uri: str) -> pq.ParquetFile:
        """An open shard (the last few are kept open: units of one window often share shards)."""
        if uri not in self._files:
            if len(self._files) >= 8:
                self._files.pop(next(iter(self._files))).close()
            fs, path = storage.resolve(uri)
            self._files[uri] = pq.ParquetFile(fs.open_input_file(path))
        return self._files[uri]

    def _read_window(self, epoch: int, w: int, units: np.ndarray, keep_from: int, keep_to: int) -> Batch:
        """The window's rows in their shuffled order, positions [keep_from, keep_to) of it. Each row
        group is read and scattered into the output at once, so the window's memory is its output
        arrays plus one row group (no concatenated copy of the window)."""
        n = int(sum(self.units[u].rows for u in units))
        perm, flips = self.plan.window_order(epoch, self.rank, w, n)
        take, flips = perm[keep_from:keep_to], flips[keep_from:keep_to]
        k = len(take)
        dest = np.full(n, -1, dtype=np.int64)      # window row -> its place in the output (or -1: not kept)
        dest[take] = np.arange(k)
        mean, std = np.empty((k, *self.shape), np.float32), np.empty((k, *self.shape), np.float32)
        labels, ids = np.empty(k, np.int64), np.empty(k, np.int64)
        first = 0
        for u in units:
            unit = self.units[u]
            d = dest[first:first + unit.rows]
            first += unit.rows
            keep = np.flatnonzero(d >= 0)
            if not keep.size:
                continue
            table = self._file(unit.file).read_row_group(unit.group, columns=[*self.columns, LABEL_COLUMN], use_threads=False)
            if table.num_rows != unit.rows:
                table = table.slice(unit.offset, unit.rows)
            where, to, flip = unit.file, d[keep], flips[d[keep]]
            for out, name in ((mean, "mean"), (std, "std")):
                values = _column(table, name, self.shape, where)[keep]
                if flip.any():
                    mirror = _column(table, f"{name}_flip", self.shape, where)[keep]
                    values = np.where(flip[:, None, None, None], mirror, values)
                out[to] = values
            labels[to] = table.column(LABEL_COLUMN).to_numpy()[keep]
            ids[to] = unit.first_row + keep
        return Batch(mean, std, labels, ids, flips)

    def _windows_from(self, start: int) -> Iterator[tuple[int, Batch]]:
        """(epoch, rows) of consecutive windows, the first starting at micro-batch ``start``."""
        epoch, micro = self.plan.locate(start)
        skip = micro * self.plan.per_rank
        while True:
            quota = self.plan.batches_in_epoch(epoch) * self.plan.per_rank
            pos = 0
            for w, units in enumerate(self.plan.windows(epoch, self.rank)):
                n = int(sum(self.plan.unit_rows[u] for u in units))
                lo, hi = max(skip - pos, 0), min(n, quota - pos)
                if lo < hi:
                    yield epoch, self._read_window(epoch, w, units, lo, hi)
                pos += n
                if pos >= quota or self._stop.is_set():
                    break
            if self._stop.is_set():
                return
            epoch, skip = epoch + 1, 0

    def _produce(self) -> None:
        try:
            for item in self._windows_from(self.start):
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
        except BaseException as e:  # handed to the consumer
            self._queue.put(("error", e))

    # -- consuming ---------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Batch]:
        import time

        self._thread = threading.Thread(target=self._produce, name="latent-prefetch", daemon=True)
        self._thread.start()
        need = self.plan.per_rank
        pieces: list[Batch] = []   # the micro-batch being assembled (views; a copy only across windows)
        have, current_epoch = 0, None
        try:
            while True:
                t0 = time.perf_counter()
                item = self._queue.get()
                self.wait_seconds += time.perf_counter() - t0
                if item[0] == "error":
                    raise item[1]
                epoch, window = item
                if current_epoch is not None and epoch != current_epoch:
                    pieces, have = [], 0  # an epoch's quota is a whole number of micro-batches
                current_epoch = epoch
                pos, n = 0, len(window.labels)
                while pos < n:
                    k = min(need - have, n - pos)
                    pieces.append(_slice(window, pos, pos + k))
                    have, pos = have + k, pos + k
                    if have == need:
                        yield pieces[0] if len(pieces) == 1 else _concat(pieces)
                        pieces, have = [], 0
                del window, item
        finally:
            self.close()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            while self._thread.is_alive():
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    pass
                self._thread.join(timeout=0.05)
        for f in self._files.values():
            f.close()
        self._files.clear()


def _concat(parts: list[Batch]) -> Batch:
    return Batch(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("mean", "std", "labels", "rows", "flips")))


def _slice(b: Batch, lo: int, hi: int) -> Batch:
    return Batch(b.mean[lo:hi], b.std[lo:hi], b.labels[lo:hi], b.rows[lo:hi], b.flips[lo:hi])


def check_latents(files: Sequence[str], units: Sequence[Unit], shape: Sequence[int], num_classes: int,
                  views: Sequence[str]) -> None:
    """Refuse, before any training, latents the workers could not read: a missing view column, a
    row width other than stats.json's ``latent_shape``, labels outside [0, num_classes). Reads the
    schema of every shard and the label column; the latents themselves only for one row per shard."""
    width = int(np.prod(shape))
    columns = [c for v in views for c in LATENT_VIEWS[v]]
    first_unit = {}
    for u in units:
        first_unit.setdefault(u.file, u)
    for uri in files:
        fs, path = storage.resolve(uri)
        with fs.open_input_file(path) as f:
            pf = pq.ParquetFile(f)
            names = set(pf.schema_arrow.names)
            missing = [c for c in [*columns, LABEL_COLUMN] if c not in names]
            if missing:
                raise ValueError(f"latents shard {uri} has no column {missing}; stats.json lists views {list(views)} "
                                 "(docs/CONTRACTS.md); re-run the encode stage")
            labels = pf.read(columns=[LABEL_COLUMN]).column(LABEL_COLUMN).to_numpy()
            bad = labels[(labels < 0) | (labels >= num_classes)]
            if bad.size:
                raise ValueError(f"latents shard {uri} has labels {sorted(set(bad.tolist()))[:5]} outside [0, {num_classes}) "
                                 f"(stats.json num_classes={num_classes}); the shard and stats.json disagree: re-run encode")
            unit = first_unit.get(uri)
            if unit is not None:
                table = pf.read_row_group(unit.group, columns=columns).slice(0, 1)
                for c in columns:
                    got = len(table.column(c)[0]) if table.num_rows else width
                    if got != width:
                        raise ValueError(f"latents shard {uri}: column {c} has {got} values per row; stats.json "
                                         f"latent_shape {list(shape)} says {width}; re-run the encode stage")


# --------------------------------------------------------------------------------------------
# The latents folder: its record and its train shards (the driver checks them, every worker reads them)
# --------------------------------------------------------------------------------------------

def read_stats(latents: str) -> dict[str, Any]:
    """The latents' ``stats.json``, refused (naming the fix) when missing or not of docs/CONTRACTS.md."""
    uri = storage.join(latents, LATENT_STATS_FILE)
    if not storage.exists(uri):
        shipped = runtime.job_working_dir()
        hint = (f"; a Ray job gets a copy of the code ({shipped}), not the project's git-ignored data: pass the "
                "latents as an s3:// URI (store.root) or an absolute path every node reads") if shipped else ""
        raise FileNotFoundError(f"{uri} not found: {latents} is not a complete latents folder; run the encode stage first{hint}")
    stats = storage.read_json(uri)
    for key in (LATENT_SHAPE_KEY, SCALE_FACTOR_KEY, NUM_CLASSES_KEY, FINGERPRINT_KEY):
        if key not in stats:
            raise ValueError(f"{uri} has no {key!r}; it does not follow docs/CONTRACTS.md (re-run encode)")
    views = stored_views(stats)
    if "image" not in views or set(views) - set(LATENT_VIEWS):
        raise ValueError(f"{uri} lists views {list(views)}; docs/CONTRACTS.md allows 'image' and optionally 'flip' (re-run encode)")
    return stats


def stored_views(stats: dict[str, Any]) -> tuple[str, ...]:
    """The views the latents hold: stats.json's ``views``, or both for latents written before it existed."""
    return tuple(stats.get(VIEWS_KEY, VIEWS_BEFORE_FLIP_VIEWS))


def train_shards(latents: str, stats: dict[str, Any]) -> list[str]:
    """The URIs of the train split's shards, in the order of the published version stats.json names."""
    names = (stats.get(SHARDS_KEY) or {}).get("train")
    folder = storage.version_folder(latents, stats)  # the published version stats.json names
    files = [storage.join(folder, n) for n in names] if names else storage.list_files(storage.join(folder, "train"), ".parquet")
    if not files:
        raise FileNotFoundError(f"no train shards under {latents}/train; re-run the encode stage")
    return files


def check_data(latents: str, stats: dict[str, Any]) -> list[Any]:
    """The train units, after refusing (on the driver, before any work) latents the workers could not
    train on: an empty shard, a missing column, a wrong row width, labels outside the classes."""
    files = train_shards(latents, stats)
    units = scan_units(files)
    if not units:
        raise ValueError(f"the train shards under {latents} hold no rows; re-run the encode stage")
    check_latents(files, units, stats[LATENT_SHAPE_KEY], int(stats[NUM_CLASSES_KEY]), stored_views(stats))
    return units


__all__ = ["Batch", "LatentStream", "StreamPlan", "Unit", "check_data", "check_latents", "plan_stream", "read_stats",
           "scan_units", "split_units", "stored_views", "train_shards"]

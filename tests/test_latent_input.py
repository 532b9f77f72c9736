"""The streaming training input (ray_jobs/latent_input.py): each worker's disjoint share of every
epoch, the same order for the same (seed, epoch, worker count), exact mid-epoch resume, the values
it hands over, bounded reads, and the latents it refuses before any work."""

from __future__ import annotations

import itertools

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ray_jobs.latent_input import LatentStream, StreamPlan, plan_stream, scan_units, split_units
from ray_jobs.train import check_data, read_stats, train_shards
from tests.fixtures_latents import write_synthetic_latents

SHAPE = (4, 4, 4)


def listing(latents: str) -> dict[str, np.ndarray]:
    """Every train row in listing order (shard order, then row order), read here without the code under test."""
    stats = read_stats(latents)
    tables = [pq.read_table(f"{latents}/{s}") for s in stats["shards"]["train"]]
    t = pa.concat_tables(tables)
    out = {"label": t.column("label").to_numpy()}
    for c in ("mean", "std", "mean_flip", "std_flip"):
        if c in t.column_names:
            out[c] = np.stack(t.column(c).to_numpy(zero_copy_only=False)).reshape(t.num_rows, *SHAPE)
    return out


def stream_for(latents: str, per_rank: int, world: int, rank: int, seed: int = 0, start: int = 0,
               shuffle_rows: int = 64, flip_prob: float = 0.0) -> tuple[StreamPlan, LatentStream]:
    plan, units = plan_stream(scan_units(train_shards(latents, read_stats(latents))), per_rank, world, seed,
                              shuffle_rows, flip_prob)
    return plan, LatentStream(plan, units, SHAPE, rank, start=start)


def take(stream: LatentStream, n: int) -> list:
    out = list(itertools.islice(iter(stream), n))
    stream.close()
    return out


@pytest.fixture(scope="module")
def latents(tmp_path_factory) -> str:
    """330 rows in shards of 50 (one row group each): 7 units of unequal size (the last has 30)."""
    out = str(tmp_path_factory.mktemp("latents") / "lat")
    write_synthetic_latents(out, n=330, num_classes=5, shape=SHAPE, rows_per_shard=50)
    return out


def test_each_worker_gets_a_disjoint_share_of_every_epoch_in_a_reproducible_order(latents):
    world, per_rank = 3, 8
    plan, _ = stream_for(latents, per_rank, world, 0)
    for epoch in range(3):
        n = plan.batches_in_epoch(epoch)
        first = sum(plan.batches_in_epoch(e) for e in range(epoch))
        rows = [np.concatenate([b.rows for b in take(stream_for(latents, per_rank, world, r, start=first)[1], n)])
                for r in range(world)]
        assert all(len(r) == n * per_rank for r in rows)                   # every rank the same number of steps
        joined = np.concatenate(rows)
        assert len(set(joined.tolist())) == len(joined)                   # disjoint within the epoch
        assert len(joined) >= 330 - 2 * 50 - world * per_rank             # and most of the data
    # same (seed, epoch, world): the same order; another seed or worker count: another order
    a = take(stream_for(latents, per_rank, world, 1)[1], 12)
    b = take(stream_for(latents, per_rank, world, 1)[1], 12)
    assert all(np.array_equal(x.rows, y.rows) for x, y in zip(a, b))
    c = take(stream_for(latents, per_rank, world, 1, seed=1)[1], 12)
    d = take(stream_for(latents, per_rank, 2, 1)[1], 12)
    assert not np.array_equal(np.concatenate([x.rows for x in a]), np.concatenate([x.rows for x in c]))
    assert not np.array_equal(np.concatenate([x.rows for x in a]), np.concatenate([x.rows for x in d]))
    # epochs differ (the rows of epoch 1 are not epoch 0's again)
    e0 = plan.batches_in_epoch(0)
    whole = take(stream_for(latents, per_rank, world, 0)[1], 2 * e0)
    assert not np.array_equal(np.concatenate([x.rows for x in whole[:e0]]), np.concatenate([x.rows for x in whole[e0:]]))


def test_a_stream_started_at_micro_batch_k_is_the_tail_of_the_stream_from_0(latents):
    """Exact mid-epoch resume: from any k (within an epoch, at and across its end) the rows, flips
    and values equal those of the uninterrupted stream, and only the windows from k on are read."""
    plan, _ = stream_for(latents, 8, 2, 1, flip_prob=0.5)
    full = take(stream_for(latents, 8, 2, 1, flip_prob=0.5)[1], 3 * plan.batches_in_epoch(0))
    for k in (1, 5, plan.batches_in_epoch(0) - 1, plan.batches_in_epoch(0), plan.batches_in_epoch(0) + 3):
        tail = take(stream_for(latents, 8, 2, 1, start=k, flip_prob=0.5)[1], len(full) - k)
        for x, y in zip(full[k:], tail):
            assert np.array_equal(x.rows, y.rows) and np.array_equal(x.flips, y.flips)
            assert np.array_equal(x.mean, y.mean) and np.array_equal(x.labels, y.labels)
    # a restart from 0 would not pass for a resume: the first batches differ from the k-th
    assert not np.array_equal(full[0].rows, full[5].rows)


def test_the_values_are_the_stored_rows_and_flipped_rows_read_the_mirror(latents):
    data = listing(latents)
    batches = take(stream_for(latents, 16, 1, 0, flip_prob=0.5)[1], 10)
    flips = np.concatenate([b.flips for b in batches])
    assert 0.3 < flips.mean() < 0.7
    for b in batches:
        expected = np.where(b.flips[:, None, None, None], data["mean_flip"][b.rows], data["mean"][b.rows])
        assert np.array_equal(b.mean, expected) and np.array_equal(b.labels, data["label"][b.rows])
        assert b.mean.shape == (16, *SHAPE) and b.mean.dtype == np.float32


def test_without_flips_only_the_image_columns_are_read(tmp_path):
    """flip_prob 0 streams latents that have no flip view (and never asks for its columns)."""
    out = str(tmp_path / "lat")
    write_synthetic_latents(out, n=64, num_classes=2, shape=SHAPE, rows_per_shard=32, views=("image",))
    plan, stream = stream_for(out, 8, 1, 0)
    assert stream.columns == ["mean", "std"]
    data = listing(out)
    for b in take(stream, 20):  # more than two epochs
        assert not b.flips.any() and np.array_equal(b.mean, data["mean"][b.rows])


def test_the_worker_reads_windows_not_the_data_set(latents, monkeypatch):
    """The first micro-batch reads only the units of its window (and a prefetched one), not all 7."""
    import ray_jobs.latent_input as li

    read = []
    original = li.LatentStream._read_window

    def counting(self, epoch, w, units, lo, hi):
        read.append(len(units))
        return original(self, epoch, w, units, lo, hi)

    monkeypatch.setattr(li.LatentStream, "_read_window", counting)
    _, stream = stream_for(latents, 8, 1, 0, shuffle_rows=50)
    batches = iter(stream)
    next(batches)
    import time

    time.sleep(0.3)  # let the prefetch thread fill its queue
    stream.close()
    assert 1 <= sum(read) <= 3, read


def test_plan_refuses_what_it_cannot_serve(latents):
    units = scan_units(train_shards(latents, read_stats(latents)))
    with pytest.raises(ValueError, match="lower train.batch_size"):
        plan_stream(units, 166, 2, 0, 64)
    with pytest.raises(ValueError, match="flip_prob"):
        plan_stream(units, 4, 1, 0, 64, flip_prob=2.0)


def test_large_row_groups_are_split_so_every_epoch_serves_every_rank(latents):
    """7 units of 50/30 rows, 4 workers of 40 rows each: whole units would leave some rank short in
    some epoch; the pieces (at most 330 // 4 - 40 = 42 rows) never do, over many epochs."""
    units = scan_units(train_shards(latents, read_stats(latents)))
    assert [u.rows for u in units] == [50] * 6 + [30]
    plan, pieces = plan_stream(units, 40, 4, 0, 64)
    assert max(p.rows for p in pieces) <= 42 and sum(p.rows for p in pieces) == 330
    assert all(plan.batches_in_epoch(e) >= 1 for e in range(200))
    for e in range(20):
        shares = [plan.rank_rows(e, r) for r in range(4)]
        assert max(shares) - min(shares) <= 42
    # a piece reads its own rows of the row group
    data = listing(latents)
    stream = LatentStream(plan, pieces, SHAPE, 2)
    for b in take(stream, 6):
        assert np.array_equal(b.mean, data["mean"][b.rows])
    assert [(p.offset, p.rows) for p in split_units(units[:1], 20)] == [(0, 16), (16, 17), (33, 17)]


def _rewrite(path: str, table: pa.Table) -> None:
    pq.write_table(table, path)


@pytest.mark.parametrize("fault, message", [
    ("empty_shard", r"part-00001\.parquet has no rows; re-run the encode stage"),
    ("label_too_large", r"part-00001\.parquet has labels \[7\] outside \[0, 5\).*re-run encode"),
    ("row_width", r"part-00001\.parquet: column mean has 32 values per row; stats.json latent_shape \[4, 4, 4\] says 64"),
    ("missing_column", r"part-00001\.parquet has no column \['std'\]"),
])
def test_bad_latents_are_refused_on_the_driver_before_any_work(tmp_path, fault, message):
    out = str(tmp_path / "lat")
    write_synthetic_latents(out, n=100, num_classes=5, shape=SHAPE, rows_per_shard=50, views=("image",))
    shard = f"{out}/train/part-00001.parquet"
    t = pq.read_table(shard)
    if fault == "empty_shard":
        t = t.slice(0, 0)
    elif fault == "label_too_large":
        t = t.set_column(t.column_names.index("label"), "label", pa.array([7] + [0] * (t.num_rows - 1), pa.int32()))
    elif fault == "row_width":
        short = pa.array([list(np.zeros(32, np.float32)) for _ in range(t.num_rows)], pa.list_(pa.float32()))
        t = t.set_column(t.column_names.index("mean"), "mean", short)
    else:
        t = t.drop_columns(["std"])
    _rewrite(shard, t)
    with pytest.raises(ValueError, match=message):
        check_data(out, read_stats(out))


def test_the_stream_reads_s3_as_it_reads_local(latents, s3_bucket):
    from ray_jobs import storage

    uri = f"s3://{s3_bucket}/lat"
    storage.upload_folder(latents, uri)
    assert storage.list_files(f"{uri}/train", ".parquet")
    local = take(stream_for(latents, 8, 2, 0)[1], 30)
    remote = take(stream_for(uri, 8, 2, 0)[1], 30)
    assert len(remote) == 30
    assert all(np.array_equal(a.rows, b.rows) and np.array_equal(a.mean, b.mean) for a, b in zip(local, remote))

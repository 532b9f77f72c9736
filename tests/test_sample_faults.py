"""The sample job survives losing a node and an actor (issue 14, point 5): on the session cluster
plus a third node of its own, one actor is killed and the third node removed while shards are being
written. The job completes, its output equals an uninterrupted run's, and no shard is ever visible
half written (every shard that appears reads back whole)."""

from __future__ import annotations

import io
import os
import signal
import tarfile
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ray_jobs import storage
from dit_core.contract import SAMPLES_NPZ_FILE
from ray_jobs.sample import missing_shards, run
from tests.test_sample import config, files_under, sample_model  # noqa: F401,F811  (a module fixture)

NUM_IMAGES, PER_SHARD = 24, 2


def _actor_processes() -> list[Any]:
    """The sample job's actors (``ray::MapWorker(MapBatches(ShardGenerator))`` processes)."""
    import psutil

    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "ShardGenerator" in cmd and "MapWorker" in cmd:
            found.append(p)
    return found


def _raylet_pid(node: Any) -> int:
    return node.all_processes["raylet"][0].process.pid


def _on_node(proc: Any, raylet_pid: int) -> bool:
    """A worker process belongs to the node whose raylet started it."""
    try:
        return any(parent.pid == raylet_pid for parent in proc.parents())
    except Exception:  # noqa: BLE001 - gone meanwhile
        return False


class ShardWatcher(threading.Thread):
    """Reads back every shard the moment its final name appears: a shard that is visible but not
    whole (a truncated parquet file or tar) is recorded in ``partial``."""

    def __init__(self, output: str):
        super().__init__(daemon=True)
        self.output, self.seen, self.partial = output, set(), []
        self.stop = threading.Event()

    def check(self, path: str) -> None:
        import pyarrow.parquet as pq

        data = storage.read_bytes(path)
        if path.endswith(".parquet"):
            if pq.read_table(io.BytesIO(data)).num_rows != PER_SHARD:
                raise ValueError("rows missing")
        else:
            with tarfile.open(fileobj=io.BytesIO(data)) as tar:
                if len(tar.getmembers()) != 2 * PER_SHARD or any(len(tar.extractfile(m).read()) != m.size for m in tar):
                    raise ValueError("members missing")

    def run(self) -> None:
        while not self.stop.is_set():
            for path in storage.list_files(self.output):
                if path in self.seen or ".tmp-" in os.path.basename(path) or not path.endswith((".parquet", ".tar")):
                    continue
                try:
                    self.check(path)
                except FileNotFoundError:
                    continue  # renamed over meanwhile (a retried shard): read it next round
                except Exception as e:  # noqa: BLE001
                    self.partial.append(f"{path}: {type(e).__name__}: {e}")
                self.seen.add(path)
            time.sleep(0.02)


def _parquet_rows(output: str) -> dict[int, tuple[int, int, bytes]]:
    import pyarrow.parquet as pq

    rows = {}
    for f in storage.list_files(storage.join(output, "parquet"), ".parquet"):
        t = pq.read_table(io.BytesIO(storage.read_bytes(f))).to_pydict()
        for i, label, seed, image in zip(t["index"], t["label"], t["seed"], t["image"]):
            rows[i] = (label, seed, image)
    return rows


@pytest.mark.timeout(600)
def test_losing_a_node_and_an_actor_costs_only_their_shards(ray_cluster, sample_model, tmp_path):
    faulted = config(sample_model, tmp_path / "faulted", num_images=NUM_IMAGES, images_per_shard=PER_SHARD, num_steps=40,
                     num_actors=3, actor_num_cpus=0.5, formats=["png", "parquet", "npz"], grid_per_class=0)
    node = ray_cluster.add_node(num_cpus=2)   # ours to remove: the session's two nodes serve other tests
    ray_cluster.wait_for_nodes()
    doomed = _raylet_pid(node)
    watcher = ShardWatcher(faulted.output)
    watcher.start()
    out: dict[str, Any] = {}

    def job() -> None:
        try:
            out["summary"] = run(faulted, progress=False)
        except BaseException as e:  # noqa: BLE001 - reported by the assertions below
            out["error"] = e

    thread = threading.Thread(target=job, daemon=True)
    removed = False
    try:
        thread.start()
        deadline = time.time() + 240
        # wait until the pool works on every node: one actor on the third node, and shards written
        while time.time() < deadline and thread.is_alive():
            actors = _actor_processes()
            if (len(actors) >= 3 and any(_on_node(p, doomed) for p in actors)
                    and storage.list_files(Path(faulted.output, "parquet"), ".parquet")):
                break
            time.sleep(0.05)
        actors = _actor_processes()
        assert thread.is_alive(), f"the job ended before the faults: {out}"
        assert any(_on_node(p, doomed) for p in actors), "no actor was placed on the third node"
        assert len(missing_shards(faulted)) > 3, "the faults came too late to hit shards in progress"
        survivor = next(p for p in actors if not _on_node(p, doomed))
        os.kill(survivor.pid, signal.SIGKILL)        # an actor dies mid-shard ...
        ray_cluster.remove_node(node, allow_graceful=False)   # ... and a node with an actor on it
        removed = True
        thread.join(timeout=400)
    finally:
        if not removed:
            ray_cluster.remove_node(node, allow_graceful=False)
        watcher.stop.set()
        watcher.join(timeout=10)
    assert not thread.is_alive(), "the job did not finish after the faults"
    assert "error" not in out, f"the job failed after losing an actor and a node: {out.get('error')!r}"
    assert out["summary"]["generated_now"] == NUM_IMAGES
    assert missing_shards(faulted) == []
    assert not watcher.partial, f"half-written shards were visible: {watcher.partial}"
    assert len(watcher.seen) == 2 * NUM_IMAGES // PER_SHARD, "the watcher read every shard as it appeared"

    # the same job, never interrupted: the same files and the same images
    whole = replace(faulted, output=str(tmp_path / "whole"))
    run(whole, progress=False)
    assert files_under(faulted.output) == files_under(whole.output)
    got, want = _parquet_rows(faulted.output), _parquet_rows(whole.output)
    assert sorted(got) == list(range(NUM_IMAGES)) and got == want
    with np.load(Path(faulted.output, SAMPLES_NPZ_FILE)) as a, np.load(Path(whole.output, SAMPLES_NPZ_FILE)) as b:
        np.testing.assert_array_equal(a["arr_0"], b["arr_0"])
        np.testing.assert_array_equal(a["arr_1"], b["arr_1"])

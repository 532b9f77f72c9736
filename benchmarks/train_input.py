"""The streaming training input (ray_jobs/latent_input.py), measured two ways.

1. ``memory``: the peak RSS of a real training worker (``ray_jobs.train.train``, one Ray Train worker,
   its ``peak_memory_mb`` metric; per-worker batch 32, 200 steps: 6,400 rows, several windows) on
   latents of 1x and 20x the digits train split (4x8x8) and on ImageNet-shaped sets (4x32x32, image
   view only) of 1,617 and 200,000 rows (3.6 GB of parquet), all written
   here in the latents contract with the encode stage's row groups (256 rows). The in-memory reader
   this replaces held every row of the split (its size is printed beside).
2. ``speed``: optimizer steps/s of the digits default (its model, batch 128, one process) with the
   streamed input against the in-memory input of the previous version (all rows in RAM and a full
   permutation per micro-batch), alternating rounds in one run; and the share of the step spent
   waiting for data.

    python -m benchmarks.train_input                 # both (several minutes; ~7 GB of disk in --work)
    python -m benchmarks.train_input --parts speed [--ray-data]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from .common import median, table, write_result

DIGITS_ROWS = 1617          # the digits default's train split
DIGITS_SHAPE = (4, 8, 8)
IMAGENET_SHAPE = (4, 32, 32)
ROWS_PER_GROUP = 256        # encode.rows_per_group's default


def write_latents(root: Path, rows: int, shape: tuple[int, int, int], num_classes: int, rows_per_shard: int = 8192,
                  seed: int = 0) -> dict[str, Any]:
    """Class-patterned latents in the docs/CONTRACTS.md layout, written shard by shard (bounded memory)."""
    rng = np.random.default_rng(seed)
    patterns = rng.standard_normal((num_classes, *shape)).astype(np.float32)
    width = int(np.prod(shape))
    (root / "train").mkdir(parents=True, exist_ok=True)
    shards = []
    for i, start in enumerate(range(0, rows, rows_per_shard)):
        n = min(rows_per_shard, rows - start)
        labels = rng.integers(0, num_classes, n).astype(np.int32)
        mean = patterns[labels] + 0.1 * rng.standard_normal((n, *shape), dtype=np.float32)
        std = np.full((n, width), 0.05, np.float32)
        col = lambda a: pa.FixedSizeListArray.from_arrays(pa.array(a.reshape(-1)), width).cast(pa.list_(pa.float32()))
        table_ = pa.table({"mean": col(mean), "std": col(std), "label": pa.array(labels),
                           "key": pa.array([f"k{start + j}" for j in range(n)])})
        name = f"train/part-{i:05d}.parquet"
        pq.write_table(table_, root / name, row_group_size=ROWS_PER_GROUP)
        shards.append(name)
    stats = {
        "autoencoder_id": "synthetic", "autoencoder_path": "none", "scale_factor": 1.0, "latent_shape": list(shape),
        "channel_mean": [0.0] * shape[0], "channel_std": [1.0] * shape[0], "num_classes": num_classes,
        "class_names": [str(c) for c in range(num_classes)], "counts": {"train": rows, "val": 0},
        "input_fingerprint": "synthetic", "mode": "posterior", "views": ["image"], "shards": {"train": shards, "val": []},
        "content_sha256": "synthetic", "fingerprint": f"synthetic-{rows}-{'x'.join(map(str, shape))}-{seed}",
    }
    (root / "stats.json").write_text(json.dumps(stats))
    return stats


# --------------------------------------------------------------------------------------------
# 1. worker peak RSS through the real training job
# --------------------------------------------------------------------------------------------

def memory(work: Path, steps: int, batch: int) -> list[dict[str, Any]]:
    from ray_jobs.train import config_from, train

    sets = [
        ("digits 1x", DIGITS_ROWS, DIGITS_SHAPE, 10, {"depth": 6, "hidden_size": 128, "num_heads": 4, "patch_size": 4}),
        ("digits 20x", 20 * DIGITS_ROWS, DIGITS_SHAPE, 10, {"depth": 6, "hidden_size": 128, "num_heads": 4, "patch_size": 4}),
        ("imagenet-shaped 1x", DIGITS_ROWS, IMAGENET_SHAPE, 1000, {"depth": 6, "hidden_size": 128, "num_heads": 4, "patch_size": 8}),
        ("imagenet-shaped 200k", 200_000, IMAGENET_SHAPE, 1000, {"depth": 6, "hidden_size": 128, "num_heads": 4, "patch_size": 8}),
    ]
    rows_out = []
    for name, n, shape, classes, model in sets:
        folder = work / name.replace(" ", "-")
        t0 = time.perf_counter()
        if not (folder / "stats.json").exists():
            write_latents(folder, n, shape, classes)
        written = time.perf_counter() - t0
        on_disk = sum(p.stat().st_size for p in folder.rglob("*.parquet"))
        cfg = config_from(str(folder), {
            "model": model, "steps": steps, "batch_size": batch, "log_every": steps, "checkpoint_every": steps,
            "tracking": False, "num_workers": 1, "cpus_per_worker": 1, "storage_path": str(work / "ckpt"),
            "name": f"mem-{folder.name}"})
        shutil.rmtree(work / "ckpt" / f"mem-{folder.name}", ignore_errors=True)
        t0 = time.perf_counter()
        result = train(cfg)
        rows_out.append({
            "data": name, "rows": n, "latent_shape": "x".join(map(str, shape)), "parquet_mb": round(on_disk / 2**20, 1),
            "in_memory_reader_mb": round(n * 2 * int(np.prod(shape)) * 4 / 2**20, 1),  # mean + std, float32
            "worker_peak_rss_mb": round(result.metrics["peak_memory_mb"], 1),
            "data_wait_share": round(result.metrics.get("data_wait_share", float("nan")), 4),
            "steps": steps, "batch_size": batch, "train_s": round(time.perf_counter() - t0, 1), "write_s": round(written, 1),
        })
        print(table(rows_out[-1:], list(rows_out[-1])), flush=True)
    smallest = min(r["worker_peak_rss_mb"] for r in rows_out)
    for r in rows_out:
        r["over_smallest_mb"] = round(r["worker_peak_rss_mb"] - smallest, 1)
    return rows_out


# --------------------------------------------------------------------------------------------
# 2. steps/s: streamed against the previous in-memory input, alternating
# --------------------------------------------------------------------------------------------

class InMemoryInput:
    """The previous version's input, reproduced for comparison: every row in RAM, and each
    micro-batch's rows taken from a fresh permutation of all N rows (O(N) per step)."""

    def __init__(self, folder: Path, per_rank: int, seed: int = 0):
        stats = json.loads((folder / "stats.json").read_text())
        t = pa.concat_tables(pq.read_table(folder / s, columns=["mean", "std", "label"]) for s in stats["shards"]["train"])
        shape = tuple(stats["latent_shape"])
        flat = lambda c: t.column(c).combine_chunks().flatten().to_numpy().reshape(t.num_rows, *shape)
        self.mean, self.std, self.labels = flat("mean"), flat("std"), t.column("label").to_numpy().astype(np.int64)
        self.per_rank, self.seed, self.b = per_rank, seed, 0
        self.wait_seconds = 0.0

    def __iter__(self):
        from dit_core.training import derive_seed

        n = len(self.labels)
        per_epoch = n // self.per_rank
        while True:
            t0 = time.perf_counter()
            epoch, within = divmod(self.b, per_epoch)
            rng = np.random.default_rng(derive_seed(self.seed, epoch))
            order = rng.permutation(n)
            rng.random(n)  # the per-epoch flip draw of the old plan
            idx = order[within * self.per_rank:(within + 1) * self.per_rank]
            batch = (self.mean[idx], self.std[idx], self.labels[idx])
            self.wait_seconds += time.perf_counter() - t0
            self.b += 1
            yield batch


class RayDataInput:
    """The ecosystem's way, for comparison: Ray Data reading the same shards, batches from
    ``iter_batches`` with a local shuffle buffer of the same size as the streamed window (what
    ``get_dataset_shard(...).iter_torch_batches`` runs in a Ray Train worker), epoch after epoch."""

    def __init__(self, folder: Path, per_rank: int, shuffle_rows: int = 1024, seed: int = 0):
        import ray

        stats = json.loads((folder / "stats.json").read_text())
        self.shape, self.per_rank, self.shuffle_rows, self.seed = tuple(stats["latent_shape"]), per_rank, shuffle_rows, seed
        self.ds = ray.data.read_parquet([str(folder / s) for s in stats["shards"]["train"]], columns=["mean", "std", "label"])
        self.wait_seconds = 0.0

    def __iter__(self):
        epoch = 0
        while True:
            it = iter(self.ds.iter_batches(batch_size=self.per_rank, batch_format="pyarrow", drop_last=True, prefetch_batches=2,
                                           local_shuffle_buffer_size=self.shuffle_rows, local_shuffle_seed=self.seed + epoch))
            while True:
                t0 = time.perf_counter()
                try:
                    t = next(it)
                except StopIteration:
                    self.wait_seconds += time.perf_counter() - t0
                    break
                flat = lambda c: t.column(c).combine_chunks().flatten().to_numpy().reshape(t.num_rows, *self.shape)
                batch = (flat("mean"), flat("std"), t.column("label").to_numpy().astype(np.int64))
                self.wait_seconds += time.perf_counter() - t0
                yield batch
            epoch += 1


def streamed(folder: Path, per_rank: int):
    from ray_jobs.latent_input import LatentStream, plan_stream, scan_units
    from ray_jobs.train import read_stats, train_shards

    stats = read_stats(str(folder))
    plan, units = plan_stream(scan_units(train_shards(str(folder), stats)), per_rank, 1, 0, 1024)
    stream = LatentStream(plan, units, stats["latent_shape"], 0)

    def batches():
        for b in stream:
            yield b.mean, b.std, b.labels

    return stream, batches()


def speed(work: Path, rounds: int, steps: int, rows: int, ray_data: bool = False) -> dict[str, Any]:
    from dit_core.diffusion import create_diffusion, training_losses
    from dit_core.models import DiT, DiTConfig
    from dit_core.training import noisy_latents

    folder = work / f"speed-{rows}"
    if not (folder / "stats.json").exists():
        write_latents(folder, rows, DIGITS_SHAPE, 10)
    torch.manual_seed(0)
    model = DiT(DiTConfig(input_size=8, in_channels=4, num_classes=10, depth=6, hidden_size=128, num_heads=4, patch_size=4,
                          class_embed_init_std=1.0))
    opt = torch.optim.AdamW(model.parameters(), lr=6e-4)
    diffusion = create_diffusion(None)
    batch = 128

    def run(source_iter, n: int) -> float:
        t0 = time.perf_counter()
        for i in range(n):
            mean, std, labels = next(source_iter)
            x = noisy_latents(mean, std, 1.0, torch.Generator().manual_seed(i))
            y = torch.from_numpy(labels)
            t = torch.randint(0, diffusion.num_timesteps, (batch,))
            loss = training_losses(diffusion, lambda xt, tt: model(xt, tt, y), x, t)["loss"].mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    memory_in = InMemoryInput(folder, batch)
    stream, stream_iter = streamed(folder, batch)
    inputs = [("in_memory", iter(memory_in), memory_in), ("streamed", stream_iter, stream)]
    if ray_data:
        from ray_jobs import runtime

        runtime.init_ray()
        ray_in = RayDataInput(folder, batch)
        inputs.append(("ray_data", iter(ray_in), ray_in))
    for _, it, _ in inputs:
        run(it, 3)  # warm-up (the stream's first window, Ray Data's first blocks)
    res: dict[str, list[float]] = {name: [] for name, _, _ in inputs}
    waits: dict[str, list[float]] = {name: [] for name, _, _ in inputs}
    for r in range(rounds):
        for name, it, src in inputs[:: 1 if r % 2 == 0 else -1]:
            w0 = src.wait_seconds
            elapsed = run(it, steps)
            res[name].append(steps / elapsed)
            waits[name].append((src.wait_seconds - w0) / elapsed)
    stream.close()
    out = {
        "rows": rows, "batch_size": batch, "steps_per_round": steps, "rounds": rounds,
        "steps_per_sec": {k: round(median(v), 3) for k, v in res.items()},
        "data_wait_share": {k: round(median(v), 4) for k, v in waits.items()},
        "all_rounds": res,
    }
    out["streamed_over_in_memory"] = round(out["steps_per_sec"]["streamed"] / out["steps_per_sec"]["in_memory"], 3)
    if ray_data:
        out["streamed_over_ray_data"] = round(out["steps_per_sec"]["streamed"] / out["steps_per_sec"]["ray_data"], 3)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="speed,memory")
    p.add_argument("--work", default=None, help="folder for the synthetic latents (default: a temporary one, removed)")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--steps", type=int, default=40, help="steps per speed round")
    p.add_argument("--ray-data", action="store_true", help="speed: also Ray Data's iter_batches with a local shuffle buffer")
    p.add_argument("--memory-steps", type=int, default=200)
    p.add_argument("--memory-batch", type=int, default=32,
                   help="per-worker batch of the memory runs (32: a worker of the ImageNet preset, 256 over 8 GPUs)")
    a = p.parse_args()
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="train-input-"))
    try:
        if "speed" in a.parts:  # train_input-{cpu,gpu}-speed.json
            s = speed(work, a.rounds, a.steps, DIGITS_ROWS, a.ray_data)
            print(table([{"input": k, "steps_per_sec": v, "data_wait_share": s["data_wait_share"][k]}
                         for k, v in s["steps_per_sec"].items()], ["input", "steps_per_sec", "data_wait_share"]))
            print(f"streamed / in-memory: {s['streamed_over_in_memory']}"
                  + (f", streamed / Ray Data: {s['streamed_over_ray_data']}" if a.ray_data else ""), flush=True)
            print(write_result("train_input", {"speed": s}, tag="speed-ray-data" if a.ray_data else "speed"))
        if "memory" in a.parts:  # train_input-{cpu,gpu}-memory.json
            from ray_jobs import runtime

            runtime.init_ray()
            rows = memory(work, a.memory_steps, a.memory_batch)
            print(table(rows, list(rows[0])))
            print(write_result("train_input", {"memory": rows}, tag="memory"))
    finally:
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

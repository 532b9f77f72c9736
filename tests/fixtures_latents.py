"""Small latent data sets in the ``data/latents/`` format of docs/CONTRACTS.md, for the training tests
(the encode stage's real output has the same layout)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

# the contract's columns of each view, written down here rather than imported from the code under test
VIEW_COLUMNS = {"image": ("mean", "std"), "flip": ("mean_flip", "std_flip")}


def _list_column(a: np.ndarray) -> pa.Array:
    a = np.ascontiguousarray(a.reshape(len(a), -1), dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(a.reshape(-1)), a.shape[1]).cast(pa.list_(pa.float32()))


def write_synthetic_latents(
    dir: str | Path,
    n: int,
    num_classes: int,
    shape: tuple[int, int, int],
    seed: int = 0,
    rows_per_shard: int = 100,
    val: int = 0,
    views: Sequence[str] | None = ("image", "flip"),
) -> dict[str, Any]:
    """Write ``n`` train (and ``val``) rows of class-dependent latents: each class has its own
    pattern, each row is that pattern plus a little noise, its posterior std is small, and its flip
    view (where ``views`` has "flip") is the mirrored pattern. Returns the stats.json contents.
    ``views=None``: both views, and a stats.json without "views", as encode wrote it before
    ``flip_views`` existed. The same seed gives the same image view whatever ``views`` is."""
    stored = ("image", "flip") if views is None else tuple(views)
    columns = [c for v in stored for c in VIEW_COLUMNS[v]]
    rng = np.random.default_rng(seed)
    root = Path(dir)
    patterns = rng.standard_normal((num_classes, *shape)).astype(np.float32)
    shards: dict[str, list[str]] = {}
    counts: dict[str, int] = {}
    row_hashes = []
    for split, count in (("train", n), ("val", val)):
        shards[split], counts[split] = [], count
        labels = (np.arange(count) % num_classes).astype(np.int32)
        mean = patterns[labels] + 0.1 * rng.standard_normal((count, *shape)).astype(np.float32)
        std = np.full_like(mean, 0.05)
        arrays = {"mean": mean, "std": std, "mean_flip": mean[..., ::-1], "std_flip": std[..., ::-1]}
        for i, start in enumerate(range(0, count, rows_per_shard)):
            sl = slice(start, start + rows_per_shard)
            keys = [f"{split}-{j:06d}" for j in range(start, min(start + rows_per_shard, count))]
            table = pa.table({**{c: _list_column(arrays[c][sl]) for c in columns},
                              "label": pa.array(labels[sl], pa.int32()), "key": pa.array(keys)})
            rel = f"{split}/part-{i:05d}.parquet"
            (root / split).mkdir(parents=True, exist_ok=True)
            pq.write_table(table, root / rel)
            shards[split].append(rel)
            row_hashes += [hashlib.sha256(arrays["mean"][j].tobytes()).hexdigest() for j in range(start, min(start + rows_per_shard, count))]
    stats = {
        "autoencoder_id": "synthetic",
        "autoencoder_path": "none",
        "scale_factor": 1.0,
        "latent_shape": list(shape),
        "channel_mean": patterns.mean(axis=(0, 2, 3)).tolist(),
        "channel_std": patterns.std(axis=(0, 2, 3)).tolist(),
        "num_classes": num_classes,
        "class_names": [str(c) for c in range(num_classes)],
        "counts": counts,
        "input_fingerprint": "synthetic",
        "shards": shards,
        "fingerprint": hashlib.sha256("\n".join(row_hashes).encode()).hexdigest(),
    }
    if views is not None:  # the views decide the columns: latents with and without flips differ
        stats["views"] = list(stored)
        stats["fingerprint"] = hashlib.sha256(f"{stats['fingerprint']}\tviews={','.join(stored)}".encode()).hexdigest()
    (root / "stats.json").write_text(json.dumps(stats, indent=2, sort_keys=True))
    return stats


def publish_autoencoder(ae: Any, out: str) -> None:
    """Publish ``ae`` as the train_autoencoder stage does: a new version folder of ``out``, its record last."""
    from dit_core.contract import AUTOENCODER_RECORD_FILE
    from pipelines.train_autoencoder import write_version
    from ray_jobs import storage

    with storage.publishing(str(out), AUTOENCODER_RECORD_FILE) as staging:
        write_version(ae, staging)

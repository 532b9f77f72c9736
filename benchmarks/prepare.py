"""The prepare stage on Ray Data: images per second with 1, 2, ... workers on a synthetic image
folder of small JPEGs (``--images`` of them, ``--size`` pixels square, in ``--classes`` folders).

The folder is written once (not timed). The Ray runtime is started once and a warm-up run on a
small copy of the folder is discarded, so runtime start-up is not counted; each timed run is the
whole ``prepare`` call: listing, split, decoding and writing the shards, the manifest. The worker
counts alternate for ``--rounds`` rounds (so drift of a shared machine hits all alike); the figure
is the median run, min and max are in the JSON. Every run must give the same manifest
fingerprint (the script fails otherwise).

    python -m benchmarks.prepare --workers 1,2 --images 20000
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .common import machine, table, write_result


def synthetic_folder(root: Path, images: int, classes: int, size: int, seed: int = 0) -> None:
    """``root/class-NN/img-NNNNNN.jpg``: smooth colour gradients plus noise (JPEGs of typical size
    for their side, unlike pure noise), quality 90."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 1, size)[None, :, None]
    for i in range(images):
        c = i % classes
        base = rng.uniform(0, 255, 3) * ramp + rng.uniform(0, 255, 3) * ramp.transpose(1, 0, 2) / 2
        arr = np.clip(base + rng.normal(0, 12, (size, size, 3)), 0, 255).astype(np.uint8)
        folder = root / f"class-{c:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=90)
        (folder / f"img-{i:06d}.jpg").write_bytes(buf.getvalue())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", default="1,2", help="prepare.num_workers values, comma-separated")
    p.add_argument("--images", type=int, default=20000)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--size", type=int, default=64, help="side of the synthetic JPEGs")
    p.add_argument("--image-size", type=int, default=32, help="prepare.image_size")
    p.add_argument("--rows-per-shard", type=int, default=1000)
    p.add_argument("--warmup-images", type=int, default=400)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--tag", default=None)
    a = p.parse_args()
    import ray

    from pipelines.prepare import PrepareConfig, prepare
    from ray_jobs.runtime import init_ray

    counts = [int(k) for k in a.workers.split(",")]
    rows: list[dict[str, Any]] = []
    fingerprints: set[str] = set()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        synthetic_folder(Path(tmp) / "images", a.images, a.classes, a.size)
        synthetic_folder(Path(tmp) / "warmup", a.warmup_images, a.classes, a.size, seed=1)
        folder_bytes = sum(f.stat().st_size for f in (Path(tmp) / "images").rglob("*.jpg"))
        print(f"wrote {a.images} JPEGs ({folder_bytes / a.images / 1024:.1f} KiB each) in {time.perf_counter() - t0:.0f}s")
        init_ray()  # RAY_ADDRESS set: that cluster; unset: a private local runtime

        def once(k: int, src: str, name: str) -> tuple[float, dict[str, Any]]:
            cfg = PrepareConfig(source="imagefolder", path=str(Path(tmp) / src), image_size=a.image_size,
                                rows_per_shard=a.rows_per_shard, num_workers=k)
            t = time.perf_counter()
            manifest = prepare(cfg, str(Path(tmp) / name), log=lambda _: None)
            return time.perf_counter() - t, manifest

        once(max(counts), "warmup", "prepared-warmup")  # Ray's workers started, modules imported
        times: dict[int, list[float]] = {k: [] for k in counts}
        for r in range(a.rounds):
            for k in counts:
                seconds, manifest = once(k, "images", f"prepared-{k}-{r}")
                fingerprints.add(manifest["fingerprint"])
                times[k].append(seconds)
        done = manifest["splits"]["train"]["count"] + manifest["splits"]["val"]["count"]
        for k in counts:
            seconds = float(np.median(times[k]))
            rows.append({"workers": k, "images": done, "seconds": seconds, "images_per_s": done / seconds,
                         "min_s": min(times[k]), "max_s": max(times[k]), "fingerprint": manifest["fingerprint"][:12]})
    ray.shutdown()
    if len(fingerprints) != 1:
        raise SystemExit(f"the manifests differ between worker counts: {fingerprints}")
    for r in rows:
        r["speedup"] = r["images_per_s"] / rows[0]["images_per_s"]
    print(machine())
    print(table(rows, ["workers", "images", "seconds", "min_s", "max_s", "images_per_s", "speedup", "fingerprint"]))
    settings = {k: v for k, v in vars(a).items() if k != "tag"} | {"jpeg_bytes_mean": folder_bytes / a.images,
                                                                  "argv": sys.argv[1:], "cpus": os.cpu_count()}
    print("wrote", write_result("prepare", {"settings": settings, "rows": rows}, a.tag))


if __name__ == "__main__":
    main()

"""Ray Data bulk-sampling scaling: images per second with 1, 2, ... actors, and the efficiency
ips(k) / (k * ips(1)). On a GPU machine the actors are GPUs (``--actors 1,2,4,8``).

Uses ``ray_jobs.sample.run`` as the sample stage does. The Ray runtime is started once and a
warm-up run is discarded, so runtime start-up is not counted; actor start-up and model loading,
which a real job pays too, are. The model defaults to the checkpoint the train stage registered
(``models/dit.json``); any checkpoint or ``models:/`` URI can be given.

    python -m benchmarks.ray_scaling --actors 1,2 --num-images 64 --sampler ddim --num-steps 25
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .common import machine, table, write_result

REPO = Path(__file__).resolve().parent.parent


def default_model() -> str:
    pointer = REPO / "models" / "dit.json"
    if not pointer.is_file():
        raise SystemExit(f"no --model given and {pointer} does not exist: run the pipeline (make run) first")
    return json.loads(pointer.read_text())["checkpoint"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--actors", default="1,2")
    p.add_argument("--num-images", type=int, default=64)
    p.add_argument("--sampler", default="ddim")
    p.add_argument("--num-steps", type=int, default=25)
    p.add_argument("--guidance-scale", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--tag", default=None)
    a = p.parse_args()
    import ray

    from ray_jobs.sample import SampleConfig, run

    model = a.model or default_model()
    counts = [int(k) for k in a.actors.split(",")]
    # two shards per actor at the largest count, so every actor count splits the work evenly
    per_shard = max(1, a.num_images // (2 * max(counts)))
    # RAY_ADDRESS set: that cluster; unset: a private local runtime, not one another process started
    ray.init(address=None if os.environ.get("RAY_ADDRESS") else "local", include_dashboard=False, log_to_driver=False)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        def once(k: int, name: str) -> dict[str, Any]:
            cfg = SampleConfig(model=model, output=str(Path(tmp) / name), num_images=a.num_images, sampler=a.sampler,
                               num_steps=a.num_steps, guidance_scale=a.guidance_scale, batch_size=a.batch_size,
                               images_per_shard=per_shard, formats=["npz"], grid_per_class=0, num_actors=k)
            t0 = time.perf_counter()
            summary = run(cfg, progress=False)
            return {"seconds": time.perf_counter() - t0, **summary}

        once(counts[0], "warmup")
        for k in counts:
            s = once(k, f"actors-{k}")
            rows.append({"actors": k, "images": a.num_images, "seconds": s["seconds"], "images_per_s": a.num_images / s["seconds"]})
    ray.shutdown()
    base = rows[0]["images_per_s"] / rows[0]["actors"]
    for r in rows:
        r["speedup"] = r["images_per_s"] / rows[0]["images_per_s"]
        r["efficiency"] = r["images_per_s"] / (r["actors"] * base)
    print(machine())
    print(table(rows, ["actors", "images", "seconds", "images_per_s", "speedup", "efficiency"]))
    settings = {k: v for k, v in vars(a).items() if k != "tag"} | {"model": model, "images_per_shard": per_shard, "argv": sys.argv[1:]}
    print("wrote", write_result("ray_scaling", {"settings": settings, "rows": rows}, a.tag))


if __name__ == "__main__":
    main()

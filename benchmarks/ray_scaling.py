"""Ray Data scaling of bulk sampling and of the encode stage: images per second with 1, 2, ...
actors, and the efficiency ips(k) / (k * ips(1)). On a GPU machine the actors are GPUs
(``--actors 1,2,4,8``).

``--stage sample`` uses ``ray_jobs.sample.run`` as the sample stage does; ``--stage encode`` runs
``ray_jobs.encode.encode`` on the prepared digits train split copied ``--repeat`` times (so the
work is large enough to time). The Ray runtime is started once and a warm-up run is discarded, so
runtime start-up is not counted; actor start-up and model loading, which a real job pays too, are.
``--actor-num-cpus`` fixes each CPU actor's share (and so its PyTorch threads): ``0.75`` gives
every actor one thread whatever the count, the per-actor scaling; unset, the jobs' defaults apply
(one sample actor gets both cores). The sampling model defaults to the checkpoint the train stage
wrote (``models/dit``); any checkpoint or ``models:/`` URI can be given.

    python -m benchmarks.ray_scaling --actors 1,2 --num-images 64 --sampler ddim --num-steps 25
    python -m benchmarks.ray_scaling --stage encode --actors 1,2 --actor-num-cpus 0.75 --repeat 20
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
    """The train stage's model folder (``models/dit``, a DVC output)."""
    folder = REPO / "models" / "dit"
    if not folder.is_dir():
        raise SystemExit(f"no --model given and {folder} does not exist: run the pipeline (make run) or `dvc pull` first")
    return str(folder)


def scaled_prepared(src: Path, dest: Path, repeat: int) -> int:
    """A copy of the prepared data whose train split holds every train shard ``repeat`` times
    (keys made unique); returns the number of images encoded per run (train x repeat + val)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ray_jobs import storage

    manifest = json.loads((src / "manifest.json").read_text())
    manifest.pop(storage.VERSION_KEY, None)
    src = Path(storage.current(str(src), "manifest.json"))   # the published version's shards
    train = manifest["splits"]["train"]
    shards = []
    for r in range(repeat):
        for shard in train["shards"]:
            t = pq.read_table(src / shard)
            t = t.set_column(t.schema.get_field_index("key"), "key", pa.array([f"{k}-r{r}" for k in t.column("key").to_pylist()]))
            name = f"train/part-r{r:03d}-{Path(shard).name}"
            (dest / "train").mkdir(parents=True, exist_ok=True)
            pq.write_table(t, dest / name)
            shards.append(name)
    for shard in manifest["splits"]["val"]["shards"]:
        (dest / "val").mkdir(parents=True, exist_ok=True)
        (dest / shard).write_bytes((src / shard).read_bytes())
    train["shards"], train["count"] = shards, train["count"] * repeat
    (dest / "manifest.json").write_text(json.dumps(manifest))
    return train["count"] + manifest["splits"]["val"]["count"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stage", choices=("sample", "encode"), default="sample")
    p.add_argument("--model", default=None)
    p.add_argument("--actors", default="1,2")
    p.add_argument("--num-images", type=int, default=64)
    p.add_argument("--sampler", default="ddim")
    p.add_argument("--num-steps", type=int, default=25)
    p.add_argument("--guidance-scale", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--actor-num-cpus", type=float, default=None, help="each CPU actor's CPUs (= threads); default: the job's")
    p.add_argument("--repeat", type=int, default=20, help="encode: copies of the digits train split")
    p.add_argument("--prepared", default=str(REPO / "data" / "prepared"))
    p.add_argument("--autoencoder", default=str(REPO / "models" / "autoencoder"))
    p.add_argument("--tag", default=None)
    a = p.parse_args()
    import ray

    from ray_jobs.encode import EncodeConfig, encode
    from ray_jobs.sample import SampleConfig, run

    model = a.model or default_model() if a.stage == "sample" else None
    counts = [int(k) for k in a.actors.split(",")]
    # two shards per actor at the largest count, so every actor count splits the work evenly
    per_shard = max(1, a.num_images // (2 * max(counts)))
    # RAY_ADDRESS set: that cluster; unset: a private local runtime, not one another process started
    ray.init(address=None if os.environ.get("RAY_ADDRESS") else "local", include_dashboard=False, log_to_driver=False)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        images = a.num_images
        if a.stage == "encode":
            images = scaled_prepared(Path(a.prepared), Path(tmp) / "prepared", a.repeat)

        def once(k: int, name: str, num_images: int = a.num_images) -> dict[str, Any]:
            t0 = time.perf_counter()
            if a.stage == "encode":
                encode(EncodeConfig(prepared=str(Path(tmp) / "prepared"), autoencoder=a.autoencoder, output=str(Path(tmp) / name),
                                    batch_size=a.batch_size, mode="posterior", seed=0, num_actors=k, cpu_actors=k,
                                    actor_num_cpus=a.actor_num_cpus or 0.5))
            else:
                run(SampleConfig(model=model, output=str(Path(tmp) / name), num_images=num_images, sampler=a.sampler,
                                 num_steps=a.num_steps, guidance_scale=a.guidance_scale, batch_size=a.batch_size,
                                 images_per_shard=per_shard, formats=["npz"], grid_per_class=0, num_actors=k,
                                 actor_num_cpus=a.actor_num_cpus), progress=False)
            return {"seconds": time.perf_counter() - t0}

        once(counts[0], "warmup", min(a.num_images, 2 * per_shard))  # Ray, the workers and the files warm
        for k in counts:
            s = once(k, f"actors-{k}")
            rows.append({"actors": k, "images": images, "seconds": s["seconds"], "images_per_s": images / s["seconds"]})
    ray.shutdown()
    base = rows[0]["images_per_s"] / rows[0]["actors"]
    for r in rows:
        r["speedup"] = r["images_per_s"] / rows[0]["images_per_s"]
        r["efficiency"] = r["images_per_s"] / (r["actors"] * base)
    print(machine())
    print(table(rows, ["actors", "images", "seconds", "images_per_s", "speedup", "efficiency"]))
    settings = {k: v for k, v in vars(a).items() if k != "tag"} | {"model": model, "images_per_shard": per_shard, "argv": sys.argv[1:]}
    name = "ray_scaling" if a.stage == "sample" else "ray_scaling_encode"
    print("wrote", write_result(name, {"settings": settings, "rows": rows}, a.tag))


if __name__ == "__main__":
    main()

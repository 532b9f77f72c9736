"""Driver memory of the evaluation at scale: the peak resident memory of the process that runs
`pipelines.evaluate.evaluate` (features by a Ray Data actor pool, statistics merged in the driver)
and of the sample job's finishing steps (`ray_jobs.sample.finish`: samples.npz streamed, grid.png
of bounded size), at two sample counts, and the slope per 1,000 images. Beside them, the same
work done the way it was before (every image in the driver: `read_images`, then the features or
`np.savez`), for comparison.

Each measurement runs in a fresh Python process (its ru_maxrss is the figure; Ray's own processes
and the actors are not the driver). The samples are random RGB images written as the sample job's
parquet shards (random pixels: PNG cannot compress them, the worst case for memory), scored with
a random classifier of the images' size against fixed reference statistics: no model is sampled.

    python -m benchmarks.eval_memory --counts 2000,8000 --image-size 64
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from .common import machine, table, write_result

REPO = Path(__file__).resolve().parents[1]

# Run in a child process: the work, then its peak RSS (MiB) and seconds as one JSON line.
CHILD = r"""
import json, resource, sys, time
a = json.loads(sys.argv[1])
t0 = time.perf_counter()
if a["what"] == "evaluate":
    from pipelines.evaluate import evaluate
    m = evaluate(a["samples"], "unused", a["classifier"], {"features": "classifier", "reference": a["reference"],
                                                             "num_actors": None, "actor_num_cpus": None})
    extra = {"fid": m["fid"], "num_samples": m["num_samples"]}
elif a["what"] == "evaluate-in-driver":   # before: every image in the driver, features in-process
    from dit_core.classifier import load_classifier, predict
    from dit_core.metrics import batched_features, feature_stats, fid_from_stats, load_reference_npz, uint8_to_float
    from ray_jobs.sample import read_images
    from ray_jobs import storage
    with storage.local_copy(a["classifier"], "classifier.json") as folder:   # its published version
        clf, _ = load_classifier(folder)
    images, labels = read_images(a["samples"])
    ref = load_reference_npz(open(a["reference"], "rb").read())
    fid = fid_from_stats(feature_stats(batched_features(clf.features, images)), ref)
    acc = float((predict(clf, uint8_to_float(images)) == labels).mean())
    extra = {"fid": fid, "num_samples": len(images)}
elif a["what"] == "finish":
    from ray_jobs.sample import SampleConfig, finish
    cfg = SampleConfig(**a["cfg"])
    finish(cfg, cfg.labels(a["num_classes"]))
    extra = {}
else:                                    # finish-in-driver, before: read_images, np.savez, the grid of all
    import io, numpy as np
    from ray_jobs.sample import read_images
    images, labels = read_images(a["cfg"]["output"])
    buf = io.BytesIO()
    np.savez(buf, arr_0=images, arr_1=labels)
    open(a["cfg"]["output"] + "/samples-before.npz", "wb").write(buf.getvalue())
    extra = {}
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"peak_mib": peak, "seconds": time.perf_counter() - t0, **extra}))
"""


def make_samples(root: Path, count: int, size: int, num_classes: int, per_shard: int) -> dict[str, Any]:
    """A samples folder as the sample job leaves it (parquet shards, sample_config.json), random images."""
    import pyarrow as pa

    from dit_core.data import png_bytes
    from pipelines.common import write_parquet
    from ray_jobs import storage
    from dit_core.contract import SAMPLE_CONFIG_FILE
    from ray_jobs.sample import SampleConfig, shard_files

    cfg = SampleConfig(model="random", output=str(root), num_images=count, images_per_shard=per_shard,
                       formats=["parquet", "npz"], grid_per_class=8, baseline_images=0)
    rng = np.random.default_rng(count)
    for shard, start in enumerate(range(0, count, per_shard)):
        idx = np.arange(start, min(start + per_shard, count))
        images = rng.integers(0, 256, (len(idx), size, size, 3), dtype=np.uint8)
        write_parquet(shard_files(cfg.output, shard, ["parquet"])["parquet"], pa.table({
            "index": pa.array(idx, pa.int64()), "label": pa.array(idx % num_classes, pa.int32()),
            "seed": pa.array(idx.astype(np.uint64), pa.uint64()), "image": pa.array([png_bytes(im) for im in images], pa.binary())}))
    storage.write_json(storage.join(cfg.output, SAMPLE_CONFIG_FILE), cfg.identity())
    from dataclasses import asdict

    return asdict(cfg)


def measure(args: dict[str, Any]) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(args)], cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{args['what']} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(counts: list[int], size: int, num_classes: int, per_shard: int, keep: str | None) -> dict[str, Any]:
    import torch

    from dit_core.classifier import Classifier, ClassifierConfig, save_classifier

    tmp = Path(keep or tempfile.mkdtemp(prefix="eval_memory-"))
    torch.manual_seed(0)
    features = 64
    save_classifier(Classifier(ClassifierConfig(num_classes=num_classes, image_size=size, width=8, feature_dim=features)),
                    tmp / "classifier")
    rng = np.random.default_rng(0)
    a = rng.standard_normal((features, features))
    np.savez(tmp / "reference.npz", mu=rng.standard_normal(features), sigma=a @ a.T / features)
    rows = []
    for count in counts:
        t0 = time.perf_counter()
        cfg = make_samples(tmp / f"samples-{count}", count, size, num_classes, per_shard)
        print(f"{count} samples written in {time.perf_counter() - t0:.1f}s", flush=True)
        common = {"samples": cfg["output"], "classifier": str(tmp / "classifier"), "reference": str(tmp / "reference.npz"),
                  "cfg": cfg, "num_classes": num_classes}
        for what in ("evaluate", "evaluate-in-driver", "finish", "finish-in-driver"):
            r = measure({**common, "what": what})
            rows.append({"step": what, "images": count, **r})
            print(table([rows[-1]], COLUMNS), flush=True)
    slopes = []
    for what in ("evaluate", "evaluate-in-driver", "finish", "finish-in-driver"):
        (lo, hi) = [r for r in rows if r["step"] == what][0], [r for r in rows if r["step"] == what][-1]
        slopes.append({"step": what, "peak_mib_low": lo["peak_mib"], "peak_mib_high": hi["peak_mib"],
                       "mib_per_1000_images": 1000 * (hi["peak_mib"] - lo["peak_mib"]) / (hi["images"] - lo["images"])})
    settings = {"counts": counts, "image_size": size, "num_classes": num_classes, "images_per_shard": per_shard,
                "bytes_per_image": size * size * 3, "feature_dim": features, "argv": sys.argv[1:]}
    return {"settings": settings, "rows": rows, "slopes": slopes}


COLUMNS = ["step", "images", "peak_mib", "seconds", "fid"]
SLOPE_COLUMNS = ["step", "peak_mib_low", "peak_mib_high", "mib_per_1000_images"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--counts", default="2000,8000", help="two (or more) sample counts; the slope is between the first and the last")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--images-per-shard", type=int, default=250)
    p.add_argument("--keep", default=None, help="a folder for the samples (default: a temporary one)")
    p.add_argument("--tag", default=None, help="suffix of the results file name")
    a = p.parse_args()
    res = run([int(c) for c in a.counts.split(",")], a.image_size, a.num_classes, a.images_per_shard, a.keep)
    print(machine())
    print(table(res["rows"], COLUMNS))
    print(table(res["slopes"], SLOPE_COLUMNS))
    print("wrote", write_result("eval_memory", res, a.tag))


if __name__ == "__main__":
    main()

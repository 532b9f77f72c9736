"""Sampler quality and time to quality on the digits default: for each sampler (DDPM-250, DDIM-50,
DPM-Solver++ at a few step counts) the offline FID and class accuracy of the same images, and the
steady-state images per second of generating them (sampling loop + decoding, model already
loaded, in this process). Then the time-to-quality ratio: the fastest sampler whose FID is at most
the reference sampler's (DDPM-250) plus ``--fid-tolerance`` against the reference, in images per
second. The reference sampler also runs with ``--noise-seeds`` other seeds: the spread of its FID
over seeds is the noise of the measurement itself, which the tolerance should not undercut.

The model defaults to the one the pipeline's train stage wrote (``models/dit``); the
feature network and reference are the evaluate stage's defaults (the trained classifier, the
prepared val split), so run the pipeline first (``make run``).

    python -m benchmarks.sampler_quality --num-images 1000 --samplers ddpm-250,ddim-50,dpm-solver++-10,dpm-solver++-20
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

from .common import machine, table, write_result
from .ray_scaling import REPO, default_model


def parse_sampler(spec: str) -> tuple[str, int, int]:
    """NAME-STEPS[@K]: e.g. ddpm-250, dpm-solver++-20, ddpm-250@2 (block cache interval 2)."""
    spec, _, interval = spec.partition("@")
    name, _, steps = spec.rpartition("-")
    if not name or not steps.isdigit() or (interval and not interval.isdigit()):
        raise SystemExit(f"--samplers item {spec!r}: write NAME-STEPS[@CACHE_INTERVAL], e.g. ddpm-250, dpm-solver++-20 or ddpm-250@2")
    return name, int(steps), int(interval or 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="default: the train stage's model folder (models/dit)")
    p.add_argument("--samplers", default="ddpm-250,ddim-50,dpm-solver++-10,dpm-solver++-15,dpm-solver++-20")
    p.add_argument("--reference-sampler", default="ddpm-250")
    p.add_argument("--num-images", type=int, default=1000)
    p.add_argument("--guidance-scale", type=float, default=None, help="default: params.yaml sample.guidance_scale")
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--fid-tolerance", type=float, default=0.05, help="equal FID: at most (1 + this) x the reference's")
    p.add_argument("--noise-seeds", type=int, default=2, help="extra seeds of the reference sampler (FID noise)")
    p.add_argument("--threads", type=int, default=None, help="PyTorch threads (default: all cores)")
    p.add_argument("--prepared", default=str(REPO / "data" / "prepared"))
    p.add_argument("--classifier", default=str(REPO / "models" / "classifier"))
    p.add_argument("--tag", default=None)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)

    from dit_core.classifier import load_classifier, predict
    from dit_core.contract import CLASSIFIER_CONFIG_FILE
    from dit_core.data import pngs_to_batch, to_uint8
    from dit_core.metrics import batched_features, feature_stats, fid_from_stats, uint8_to_float
    from pipelines.common import load_params, read_manifest, read_split
    from ray_jobs import storage
    from ray_jobs.model_source import load_bundle
    from dit_core.pipeline import ImagePipeline, image_seed
    from ray_jobs.model_source import load_autoencoder_for
    from ray_jobs.sample import SampleConfig

    guidance = a.guidance_scale if a.guidance_scale is not None else float(load_params("sample", REPO / "params.yaml")["guidance_scale"])
    model = a.model or default_model()
    specs = [parse_sampler(s) for s in a.samplers.split(",") if s.strip()]
    if a.reference_sampler not in a.samplers.split(","):
        raise SystemExit(f"--reference-sampler {a.reference_sampler} is not in --samplers")
    with storage.local_copy(a.classifier, CLASSIFIER_CONFIG_FILE) as folder:   # its published version
        classifier, _ = load_classifier(folder)
    val = read_split(a.prepared, read_manifest(a.prepared), "val", ["image"])   # the evaluate stage's default reference
    ref = feature_stats(batched_features(classifier.features, to_uint8(pngs_to_batch(val.column("image").to_pylist()))))
    ref_name = f"{a.prepared}:val"
    bundle = load_bundle(model)
    autoencoder, scale = load_autoencoder_for(bundle)
    pipe = ImagePipeline(bundle.build_model(), autoencoder, scale, bundle.diffusion)
    rows: list[dict[str, Any]] = []
    runs = [(name, steps, k, 0) for name, steps, k in specs]
    runs += [(*parse_sampler(a.reference_sampler), seed) for seed in range(1, a.noise_seeds + 1)]
    for name, steps, k, seed in runs:
        cfg = SampleConfig(model=model, output="unused", num_images=a.num_images, sampler=name, num_steps=steps,
                           guidance_scale=guidance, batch_size=a.batch_size, seed=seed, cache_interval=k)
        labels = cfg.labels(bundle.config.num_classes)
        seeds = [image_seed(cfg.seed, i) for i in range(a.num_images)]
        pipe.generate(labels[: min(a.batch_size, 20)], seeds[:20], cfg, cfg.batch_size)  # warm-up
        t0 = time.perf_counter()
        images = pipe.generate(labels, seeds, cfg, cfg.batch_size)
        seconds = time.perf_counter() - t0
        fid = fid_from_stats(feature_stats(batched_features(classifier.features, images)), ref)
        acc = float((predict(classifier, uint8_to_float(images)) == labels).mean())
        n = pipe.sampler(cfg).num_evaluations
        evals = (2 if guidance != 1.0 else 1) * n
        rows.append({"sampler": f"{name}-{steps}" + (f"@{k}" if k > 1 else ""), "seed": seed, "cache_interval": k, "evals_per_image": evals,
                     "block_passes_per_image": (evals // n) * -(-n // k), "fid": fid, "class_accuracy": acc,
                     "seconds": seconds, "images_per_s": a.num_images / seconds})
        print(f"{rows[-1]['sampler']} (seed {seed}): FID {fid:.2f}, class accuracy {acc:.3f}, {a.num_images / seconds:.1f} images/s", flush=True)
    ref_runs = [r for r in rows if r["sampler"] == a.reference_sampler]
    ref_row = ref_runs[0]
    for r in rows:
        r["fid_vs_reference"] = r["fid"] / ref_row["fid"]
        r["speedup"] = r["images_per_s"] / ref_row["images_per_s"]
    ref_fids = [r["fid"] for r in ref_runs]
    noise = (max(ref_fids) - min(ref_fids)) / min(ref_fids)
    bar = ref_row["fid"] * (1 + a.fid_tolerance)
    at_quality = [r for r in rows if r["sampler"] != a.reference_sampler and r["fid"] <= bar]
    best = max(at_quality, key=lambda r: r["images_per_s"], default=None)
    print(machine())
    print(table(rows, ["sampler", "seed", "evals_per_image", "block_passes_per_image", "fid", "fid_vs_reference", "class_accuracy", "images_per_s", "speedup"]))
    print(f"{a.reference_sampler} FID over seeds {[round(f, 3) for f in ref_fids]}: spread {noise:.1%} (tolerance {a.fid_tolerance:.0%})")
    if best:
        print(f"time to quality: {best['sampler']} reaches FID {best['fid']:.2f} <= {bar:.2f} ({a.reference_sampler} "
              f"{ref_row['fid']:.2f} + {a.fid_tolerance:.0%}) at {best['speedup']:.1f}x its images/s")
    else:
        print(f"time to quality: no sampler reached {a.reference_sampler}'s FID {ref_row['fid']:.2f} + {a.fid_tolerance:.0%}")
    settings = {k: v for k, v in vars(a).items() if k != "tag"} | {
        "model": model, "guidance_scale": guidance, "reference": ref_name, "threads": torch.get_num_threads(), "argv": sys.argv[1:]}
    summary = {"reference_fid_spread": noise,
               "time_to_quality": {"sampler": best["sampler"], "speedup": best["speedup"], "fid_bar": bar} if best else None}
    print("wrote", write_result("sampler_quality", {"settings": settings, "rows": rows, **summary}, a.tag))


if __name__ == "__main__":
    main()

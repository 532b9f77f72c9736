"""How much do images differ between our DiT and diffusers' own timestep features? A trained model
(``models/dit`` of a project after ``dvc repro``) is exported (``dit export``) and sampled by plain
diffusers twice on the bulk sampler's (label, seed) rows and noise: as the exported pipeline does
(the official DiT's timestep frequencies 10000^(-i/128), as ours and ``load_pipeline``), and with
diffusers' own (10000^(-i/127), ``downscale_freq_shift=1``, what stock ``DiTPipeline`` uses).
Reports the pixel differences and the project's classifier's accuracy on both.

    python -m benchmarks.diffusers_frequencies --project /tmp/dit-image-sets/project-badges --images 400
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import yaml

from dit_core.classifier import load_classifier, predict
from dit_core.contract import CLASSIFIER_CONFIG_FILE, MODEL_CONFIG_FILE
from dit_core.diffusion import randn
from ray_jobs import storage

from .common import table, write_result


def sample(folder: Path, labels: list[int], noise: torch.Tensor, steps: int, guidance: float, diffusers_freqs: bool) -> torch.Tensor:
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(folder, custom_pipeline=str(folder), trust_remote_code=True, local_files_only=True)
    if diffusers_freqs:
        for block in pipe.transformer.transformer_blocks:
            block.norm1.emb.time_proj.downscale_freq_shift = 1   # what stock diffusers embeds
    out = pipe(class_labels=labels, guidance_scale=guidance, num_inference_steps=steps, latents=noise, output_type="np").images
    return torch.from_numpy(np.asarray(out)).permute(0, 3, 1, 2).float() * 2 - 1


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--project", required=True, help="a project folder after dvc repro (models/dit, models/classifier, samples/)")
    p.add_argument("--images", type=int, default=400, help="the first N sampled (label, seed) rows")
    p.add_argument("--guidance", type=float, default=2.0)
    p.add_argument("--tag", default=None)
    a = p.parse_args(argv)
    root = Path(a.project)
    steps = int(yaml.safe_load((root / "params.yaml").read_text())["sample"]["num_steps"])
    rows = pa.concat_tables([pq.read_table(f) for f in sorted((root / "samples/parquet").glob("shard-*.parquet"))])
    labels, seeds = rows.column("label").to_pylist()[:a.images], rows.column("seed").to_pylist()[:a.images]
    config = json.loads((root / "models/dit" / MODEL_CONFIG_FILE).read_text())["model_config"]
    noise = randn((len(seeds), config["in_channels"], config["input_size"], config["input_size"]),
                  [torch.Generator().manual_seed(int(s)) for s in seeds])
    with storage.local_copy(str(root / "models/classifier"), CLASSIFIER_CONFIG_FILE) as folder:
        classifier, _ = load_classifier(folder)
    truth = np.asarray(labels)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp, "pipe")
        subprocess.run([sys.executable, "-m", "pipelines.cli", "export", "--model", str(root / "models/dit"), str(out)],
                       check=True, cwd=root)
        official = sample(out, labels, noise, steps, a.guidance, diffusers_freqs=False)
        stock = sample(out, labels, noise, steps, a.guidance, diffusers_freqs=True)
    diff = (official - stock).abs() * 127.5   # in 0-255 pixel levels
    pred_official, pred_stock = predict(classifier, official), predict(classifier, stock)
    row = {"images": len(labels), "steps": steps, "guidance": a.guidance,
           "mean_abs_diff_levels": float(diff.mean()), "p99_abs_diff_levels": float(diff.flatten().quantile(0.99)),
           "max_abs_diff_levels": float(diff.max()),
           "class_accuracy_official": float((pred_official == truth).mean()),
           "class_accuracy_diffusers": float((pred_stock == truth).mean()),
           "predicted_class_changed": float((pred_official != pred_stock).mean())}
    cols = list(row)
    print(table([row], cols))
    print("wrote", write_result("diffusers_frequencies", {"project": str(root), "row": row}, a.tag))


if __name__ == "__main__":
    main()

"""Small image sets unlike the digits default, made here (no download), and the default pipeline
run on each as a new user runs it: only ``prepare.source``, ``prepare.path`` and
``prepare.image_size`` changed.

Sets (``--sets``):
- ``shapes``: 900 JPEGs, 3 classes (circle, square, triangle), 40-63 px, an upright shape of a random
  colour, size and position on white (the case a user reported).
- ``shapes-hard``: the same on a random plain background colour, at a random rotation.
- ``glyphs``: 2,000 JPEGs, 20 classes, 48x48: each class a fixed 3x3 pattern of coloured cells,
  with jitter, brightness changes and noise.
- ``stripes``: 600 JPEGs, 5 classes, 64x64: stripes at the class's angle in random colours.

For each set: ``dvc repro`` in a copy of the project with those three settings, timed per stage,
then ``metrics/eval.json`` (FID, class accuracy, the untrained model's FID) and the goal (class
accuracy >= 0.9, FID <= 1/4 of the untrained model's, under 15 minutes).

    python -m benchmarks.image_sets --sets shapes,glyphs,stripes --image-size 32
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image, ImageDraw

from .common import machine, table, write_result
from .ray_scaling import REPO


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(c) for c in rng.integers(0, 256, 3))


def _distinct(rng: np.random.Generator, other: tuple[int, int, int]) -> tuple[int, int, int]:
    while True:
        c = _colour(rng)
        if sum(abs(a - b) for a, b in zip(c, other)) > 200:
            return c


def shape_image(cls: int, rng: np.random.Generator, hard: bool = False) -> Image.Image:
    """A coloured circle, square or triangle on a white background, upright (the user's set), or with
    ``hard`` on a random background colour at a random rotation."""
    size = int(rng.integers(40, 64))
    bg = _colour(rng) if hard else (255, 255, 255)
    img = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(img)
    r = rng.uniform(0.22, 0.38) * size
    cx, cy = rng.uniform(r, size - r, 2)
    fill = _distinct(rng, bg)
    if cls == 0:
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        n = 4 if cls == 1 else 3
        a0 = rng.uniform(0, 2 * math.pi) if hard else (math.pi / 4 if n == 4 else -math.pi / 2)
        d.polygon([(cx + r * math.cos(a0 + 2 * math.pi * k / n), cy + r * math.sin(a0 + 2 * math.pi * k / n)) for k in range(n)], fill=fill)
    return img


def glyph_image(cls: int, rng: np.random.Generator, size: int = 48) -> Image.Image:
    import colorsys

    code = int(np.random.default_rng(7).permutation(256)[cls])     # 20 distinct 3x3 patterns (centre on)
    cells = np.array([(code >> k) & 1 for k in range(8)][:4] + [1] + [(code >> k) & 1 for k in range(4, 8)]).reshape(3, 3)
    hue = colorsys.hsv_to_rgb(cls / 20, 0.8, 0.95)
    palette = np.array([[30, 30, 40], [255 * c for c in hue]], np.float32)
    arr = np.zeros((3, 3, 3), np.float32)
    for i in range(3):
        for j in range(3):
            arr[i, j] = palette[cells[i, j]]
    img = np.kron(arr, np.ones((size // 3, size // 3, 1), np.float32))
    img = img * rng.uniform(0.7, 1.1) + rng.normal(0, 12, img.shape)
    shift = rng.integers(-3, 4, 2)
    img = np.roll(img, tuple(shift), axis=(0, 1))
    out = Image.fromarray(img.clip(0, 255).astype(np.uint8))
    return out.resize((size, size))


def stripes_image(cls: int, rng: np.random.Generator, size: int = 64, classes: int = 5) -> Image.Image:
    angle = math.pi * cls / classes + rng.normal(0, 0.05)
    period = rng.uniform(8, 14)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    wave = (np.sin((xx * math.cos(angle) + yy * math.sin(angle)) * 2 * math.pi / period + rng.uniform(0, 6.3)) > 0)[..., None]
    a, b = np.array(_colour(rng), np.float32), np.array(_colour(rng), np.float32)
    return Image.fromarray(np.where(wave, a, b).astype(np.uint8))


SETS: dict[str, tuple[int, int, Callable[[int, np.random.Generator], Image.Image], tuple[str, ...]]] = {
    # name: (images, classes, draw, class names)
    "shapes": (900, 3, shape_image, ("circle", "square", "triangle")),
    "shapes-hard": (900, 3, lambda cls, rng: shape_image(cls, rng, hard=True), ("circle", "square", "triangle")),
    "glyphs": (2000, 20, glyph_image, tuple(f"glyph{k:02d}" for k in range(20))),
    "stripes": (600, 5, stripes_image, tuple(f"angle{k}" for k in range(5))),
}


def make_set(name: str, root: Path, seed: int = 0) -> Path:
    """The image folder ``root/name/<class>/<i>.jpg`` (rewritten if present)."""
    images, classes, draw, names = SETS[name]
    out = root / name
    shutil.rmtree(out, ignore_errors=True)
    rng = np.random.default_rng(seed)
    for i in range(images):
        cls = i % classes
        folder = out / names[cls]
        folder.mkdir(parents=True, exist_ok=True)
        draw(cls, rng).save(folder / f"{i:05d}.jpg", quality=90)
    return out


STAGE_LINE = "Running stage '"


def copy_project(work: Path) -> dict[str, str]:
    """A fresh copy of this project at ``work`` (its working tree's code and settings, committed or
    not); returns the environment to run its stages in (this venv, no outside tracking server)."""
    if work.exists():
        shutil.rmtree(work)
    subprocess.run(["git", "clone", "-q", str(REPO), str(work)], check=True)
    for path in ("params.yaml", "dvc.yaml"):   # the working tree's, committed or not
        shutil.copy(REPO / path, work / path)
    for rel in ("dit_core", "pipelines", "ray_jobs"):
        shutil.rmtree(work / rel)
        shutil.copytree(REPO / rel, work / rel, ignore=shutil.ignore_patterns("__pycache__"))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "PYTHONPATH": str(work)}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("RAY_ADDRESS", None)
    return env


def timed_repro(command: list[str], work: Path, env: dict[str, str]) -> tuple[float, dict[str, float], list[str]]:
    """Run ``command`` (a ``dvc repro``) in ``work``: its seconds, each stage's seconds (from the
    stage's "Running stage" line to the next one's, or to the end), and its output lines."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(command, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    stages, current, started = {}, None, t0
    log = []
    assert proc.stdout is not None
    for line in proc.stdout:
        log.append(line)
        if line.startswith(STAGE_LINE):
            now = time.perf_counter()
            if current:
                stages[current] = now - started
            current, started = line[len(STAGE_LINE):].split("'")[0], now
    proc.wait()
    total = time.perf_counter() - t0
    if current:
        stages[current] = time.perf_counter() - started
    (work / "repro.log").write_text("".join(log))
    if proc.returncode:
        raise SystemExit(f"{' '.join(command)} failed in {work} (log: {work / 'repro.log'}):\n{''.join(log[-30:])}")
    return total, stages, log


def run_pipeline(folder: Path, work: Path, image_size: int, extra: list[str]) -> dict[str, Any]:
    """``dvc repro`` in a fresh copy of this project with the three settings a new user changes."""
    import yaml

    env = copy_project(work)
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["prepare"].update({"source": "imagefolder", "path": str(folder), "image_size": image_size})
    for item in extra:
        key, _, value = item.partition("=")
        section, _, field = key.partition(".")
        params[section][field] = yaml.safe_load(value)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    total, stages, _ = timed_repro([str(Path(sys.executable).parent / "dvc"), "repro"], work, env)
    ev = json.loads((work / "metrics" / "eval.json").read_text())
    ae = json.loads((work / "metrics" / "autoencoder.json").read_text()) if (work / "metrics" / "autoencoder.json").exists() else {}
    return {"seconds": total, "stages": stages, "eval": ev, "autoencoder": ae}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sets", default="shapes,glyphs,stripes")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--work", default="/tmp/dit-image-sets")
    p.add_argument("--set", dest="extra", action="append", default=[], help="SECTION.KEY=VALUE over params.yaml (a variant)")
    p.add_argument("--make-only", action="store_true", help="write the image folders and stop")
    p.add_argument("--tag", default=None)
    a = p.parse_args(argv)
    work = Path(a.work)
    rows = []
    for name in [s for s in a.sets.split(",") if s]:
        folder = make_set(name, work / "images")
        print(f"{name}: {folder}", flush=True)
        if a.make_only:
            continue
        r = run_pipeline(folder, work / f"project-{name}", a.image_size, a.extra)
        ev = r["eval"]
        ok = ev["class_accuracy"] >= 0.9 and ev["fid"] <= ev["fid_untrained"] / 4 and r["seconds"] <= 900
        rows.append({"set": name, "images": SETS[name][0], "classes": SETS[name][1], "image_size": a.image_size,
                     "fid": ev["fid"], "fid_untrained": ev["fid_untrained"], "fid_ratio": ev["fid"] / ev["fid_untrained"],
                     "class_accuracy": ev["class_accuracy"], "minutes": r["seconds"] / 60, "goal_met": ok,
                     "stages": r["stages"], "autoencoder": r["autoencoder"]})
        print(json.dumps(rows[-1], indent=1, default=str), flush=True)
    if rows:
        print(machine())
        print(table(rows, ["set", "images", "classes", "image_size", "fid", "fid_untrained", "fid_ratio", "class_accuracy", "minutes", "goal_met"]))
        print("wrote", write_result("image_sets", {"settings": vars(a), "rows": rows}, a.tag))


if __name__ == "__main__":
    main()

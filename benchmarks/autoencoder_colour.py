"""Does the small autoencoder keep the colours of the images? Variants trained in-process on sets
made here, each measured on its val split: seconds, reconstruction MSE, and the saturation of the
bright and dark pixels of the reconstructions as shares of the inputs' (``dit_core.image_stats``).

Sets (drawn with PIL at 40-63 px, saved as JPEG, then the prepare stage's ADM centre crop):
- ``dark-ground`` (the tuning set, like issue 22's): 900 images, 3 classes (circle, square,
  triangle), a shape in a random light colour on a random dark colour ground, at 32x32;
- ``digits``: the default data (8x8 greys upsampled to 16x16); reconstructions must stay grey;
- ``line-art``: 900 black shape outlines on white, 32x32;
- ``red-on-white``: 900 saturated red shapes (circle, square, heart) on white, 32x32.

A probe beside each: flat images of random colours (``flat_mse``): an autoencoder whose norms drop
each image's per-channel mean cannot tell them apart.

    python -m benchmarks.autoencoder_colour                      # all sets, the variants of VARIANTS
    python -m benchmarks.autoencoder_colour --sets digits --variants today,default
"""

from __future__ import annotations

import argparse
import colorsys
import io
import math
import time
from dataclasses import asdict, replace
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image, ImageDraw

from dit_core.autoencoders import SmallAutoencoderConfig, TrainConfig, reconstruction_quality, train_small_autoencoder
from dit_core.data import center_crop
from pipelines.train_autoencoder import AutoencoderSettings

from .common import table, write_result

VAL_FRACTION = 0.1  # as prepare's default
FLAT_IMAGES = 64

Colour = tuple[int, int, int]


def _hsv(h: float, s: float, v: float) -> Colour:
    return tuple(int(round(255 * c)) for c in colorsys.hsv_to_rgb(h, s, v))


def _draw(cls: int, rng: np.random.Generator, fill: Colour, ground: Colour, outline: int = 0) -> Image.Image:
    """Class 0 circle, 1 square, 2 triangle, 3 heart; filled, or only its outline ``outline`` px wide."""
    size = int(rng.integers(40, 64))
    img = Image.new("RGB", (size, size), ground)
    d = ImageDraw.Draw(img)
    r = rng.uniform(0.22, 0.38) * size
    cx, cy = rng.uniform(r, size - r, 2)
    kw = {"outline": fill, "width": outline} if outline else {"fill": fill}
    if cls == 0:
        d.ellipse([cx - r, cy - r, cx + r, cy + r], **kw)
    elif cls in (1, 2):
        n, a0 = (4, math.pi / 4) if cls == 1 else (3, -math.pi / 2)
        pts = [(cx + r * math.cos(a0 + 2 * math.pi * k / n), cy + r * math.sin(a0 + 2 * math.pi * k / n)) for k in range(n)]
        d.polygon(pts, **kw) if not outline else d.line(pts + pts[:1], fill=fill, width=outline)
    else:  # a heart: two lobes and a point (filled only)
        lobe = r / 2
        d.ellipse([cx - r, cy - r / 2 - lobe, cx, cy - r / 2 + lobe], fill=fill)
        d.ellipse([cx, cy - r / 2 - lobe, cx + r, cy - r / 2 + lobe], fill=fill)
        d.polygon([(cx - r, cy - r / 2 + lobe / 4), (cx + r, cy - r / 2 + lobe / 4), (cx, cy + r)], fill=fill)
    return img


def dark_ground(cls: int, rng: np.random.Generator) -> Image.Image:
    """Issue 22's set: light colour (V 0.75-1, S 0.1-0.5) on a dark colour (V 0.15-0.45, S 0.3-0.9)."""
    fill = _hsv(rng.uniform(), rng.uniform(0.1, 0.5), rng.uniform(0.75, 1.0))
    ground = _hsv(rng.uniform(), rng.uniform(0.3, 0.9), rng.uniform(0.15, 0.45))
    return _draw(cls, rng, fill, ground)


def line_art(cls: int, rng: np.random.Generator) -> Image.Image:
    return _draw(cls, rng, (0, 0, 0), (255, 255, 255), outline=int(rng.integers(3, 6)))


def red_on_white(cls: int, rng: np.random.Generator) -> Image.Image:
    fill = _hsv(rng.uniform(-0.02, 0.02) % 1.0, rng.uniform(0.85, 1.0), rng.uniform(0.75, 1.0))
    return _draw((0, 1, 3)[cls], rng, fill, (255, 255, 255))


def _jpeg_then_crop(img: Image.Image, image_size: int) -> np.ndarray:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)  # the user's files are JPEGs: their artefacts too
    return np.asarray(center_crop(Image.open(buf).convert("RGB"), image_size))


def drawn_set(draw: Callable[[int, np.random.Generator], Image.Image], n: int, image_size: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([_jpeg_then_crop(draw(i % 3, rng), image_size) for i in range(n)])


def digits_set() -> np.ndarray:
    """The default data as prepare makes it: sklearn's 8x8 digits, bicubically upsampled to 16x16, RGB."""
    from pipelines.prepare import _digit_pixels

    pixels = _digit_pixels()[0]
    return np.stack([np.asarray(center_crop(Image.fromarray(p).convert("RGB"), 16)) for p in pixels])


SETS: dict[str, Callable[[int], np.ndarray]] = {  # each takes the image size of the drawn sets
    "dark-ground": lambda size: drawn_set(dark_ground, 900, size, seed=0),
    "digits": lambda size: digits_set(),
    "line-art": lambda size: drawn_set(line_art, 900, size, seed=1),
    "red-on-white": lambda size: drawn_set(red_on_white, 900, size, seed=2),
}

# Each variant: overrides of the train_autoencoder settings. "today" is the default before issue 22.
TODAY = {"norm_num_groups": 16, "block_channels": [16, 32], "layers_per_block": 1, "steps": 400, "lr": 0.002,
         "kl_weight": 1e-6, "batch_size": 64, "latent_channels": 4, "deterministic": False}
VARIANTS: dict[str, dict[str, Any]] = {
    "today": TODAY,
    "kl0": {**TODAY, "kl_weight": 0.0},
    "steps800": {**TODAY, "steps": 800},
    "lr1e-3": {**TODAY, "lr": 0.001},
    "lr4e-3": {**TODAY, "lr": 0.004},
    "wide32-64": {**TODAY, "block_channels": [32, 64], "norm_num_groups": 32},
    "latent8": {**TODAY, "latent_channels": 8},
    "groups8": {**TODAY, "norm_num_groups": 8},
    "groups4": {**TODAY, "norm_num_groups": 4},
    "groups1": {**TODAY, "norm_num_groups": 1},
    "groups1-mean": {**TODAY, "norm_num_groups": 1, "deterministic": True},
    "groups1-mean-b32x800": {**TODAY, "norm_num_groups": 1, "deterministic": True, "batch_size": 32, "steps": 800},
    "groups1-mean-b32x1200": {**TODAY, "norm_num_groups": 1, "deterministic": True, "batch_size": 32, "steps": 1200},
    "default": {},  # whatever AutoencoderSettings holds now
}


def _tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def run_variant(name: str, overrides: dict[str, Any], images: np.ndarray, seed: int = 0) -> dict[str, Any]:
    s = replace(AutoencoderSettings(), **overrides)
    model = SmallAutoencoderConfig(s.latent_channels, tuple(s.block_channels), s.layers_per_block, s.norm_num_groups)
    train = TrainConfig(steps=s.steps, batch_size=s.batch_size, lr=s.lr, kl_weight=s.kl_weight, seed=seed,
                        deterministic=s.deterministic)
    n_val = max(1, round(VAL_FRACTION * len(images)))
    order = np.random.default_rng(seed).permutation(len(images))
    val, tr = _tensor(images[order[:n_val]]), _tensor(images[order[n_val:]])
    ae, metrics = train_small_autoencoder(tr, model, train, "bench")
    q = reconstruction_quality(ae, val, 256)
    flat_rng = np.random.default_rng(seed + 1)
    flat = np.broadcast_to(flat_rng.integers(0, 256, (FLAT_IMAGES, 1, 1, 3), dtype=np.uint8),
                           (FLAT_IMAGES, *images.shape[1:])).copy()
    fq = reconstruction_quality(ae, _tensor(flat), 256)
    ci, cr, ratio = q["colour_input"], q["colour_reconstruction"], q["colour_ratio"]
    return {
        "variant": name, "settings": {k: getattr(s, k) for k in TODAY},
        "train_seconds": round(metrics["train_seconds"], 1), "val_mse": q["mse"], "flat_mse": fq["mse"],
        "sat_bright_in": ci["saturation_bright"], "sat_bright_out": cr["saturation_bright"],
        "ratio_bright": ratio["saturation_bright"],
        "sat_dark_in": ci["saturation_dark"], "sat_dark_out": cr["saturation_dark"], "ratio_dark": ratio["saturation_dark"],
        "ratio_saturation": ratio["saturation"],
        "colour_input": ci, "colour_reconstruction": cr,
    }


COLUMNS = ["set", "variant", "seed", "train_seconds", "val_mse", "flat_mse", "sat_bright_in", "sat_bright_out", "ratio_bright",
           "sat_dark_in", "sat_dark_out", "ratio_dark"]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sets", default="dark-ground,digits,line-art,red-on-white")
    p.add_argument("--variants", default=None, help="comma list; default: all on dark-ground, today,default elsewhere")
    p.add_argument("--image-size", type=int, default=32, help="of the drawn sets (digits stay 16)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (1 on a loaded machine)")
    p.add_argument("--seeds", default="0", help="comma list: each variant trained once per seed (the run-to-run spread is large)")
    p.add_argument("--tag", default=None)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    rows: list[dict[str, Any]] = []
    for set_name in a.sets.split(","):
        images = SETS[set_name](a.image_size)
        names = a.variants.split(",") if a.variants else (list(VARIANTS) if set_name == "dark-ground" else ["today", "default"])
        for v in names:
            for seed in (int(x) for x in a.seeds.split(",")):
                start = time.time()
                row = {"set": set_name, "images": len(images), "image_size": images.shape[1], "seed": seed,
                       **run_variant(v, VARIANTS[v], images, seed)}
                rows.append(row)
                print(table([row], COLUMNS).splitlines()[-1], f"({time.time() - start:.0f} s)", flush=True)
    print(table(rows, COLUMNS))
    print("wrote", write_result("autoencoder_colour", {"default": asdict(AutoencoderSettings()), "argv": vars(a), "rows": rows,
                                                       "table": table(rows, COLUMNS)}, a.tag))


if __name__ == "__main__":
    main()

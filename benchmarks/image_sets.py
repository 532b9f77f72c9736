"""Small image sets unlike the digits default, made here (no download, the same files for a seed),
and the default pipeline run on each as a new user runs it: only ``prepare.source``,
``prepare.path`` and ``prepare.image_size`` changed.

Sets (``--sets``):
- ``shapes``: 900 JPEGs, 3 classes (circle, square, triangle), 40-63 px, an upright shape of a random
  colour, size and position on white.
- ``shapes-hard``: the same on a random plain background colour, at a random rotation.
- ``glyphs``: 2,000 JPEGs, 20 classes, 48x48: each class a fixed 3x3 pattern of coloured cells,
  with jitter, brightness changes and noise.
- ``stripes``: 600 JPEGs, 5 classes, 64x64: stripes at the class's angle in random colours.
- ``shapes-dark``: the user's case (the autoencoder is tuned on it): 900 JPEGs, circle, square,
  triangle, 40-63 px, upright, a random light colour on a random dark colour (dark red, navy, ...).
- ``badges`` (held out: nobody tunes on it): 800 JPEGs, 4 classes (star, plus, ring, arrow), 48-63 px,
  a vivid symbol of any colour on a coloured gradient, checker or noise texture.
- ``scenes`` (photograph-like): 800 JPEGs, 4 classes (field with a sun, trees, houses, lake), 4:3,
  64-95 px wide: gradient sky and ground under noon, dusk or overcast light, soft shadows, blur,
  sensor noise, exposure and white balance changes.
- ``icons``: 600 RGBA PNGs, 5 classes, 48-63 px, on a transparent ground (black beneath): black line
  art (envelope, magnifier, home), a red heart and a yellow sun; prepare puts them on white.
- ``unbalanced``: 840 JPEGs, the ``shapes`` drawing with 600 circles, 180 squares, 60 triangles (10:1).

For each set: ``dvc repro`` in a copy of the project with those three settings, timed per stage;
``metrics/eval.json`` (FID, class accuracy, the untrained model's FID, and the label-free distance
and colour ratio where evaluate writes them); colour statistics of the real val images and of the
samples (dit_core.image_stats) and their ratios; ``metrics/autoencoder.json``'s colour ratio where
present; a grid of real images and one of samples (the same classes per row) in
benchmarks/results/image_sets-grids/<set>[-<tag>]-{real,samples}.png; and the goal (class accuracy
>= 0.9, FID <= 1/4 of the untrained model's, under 15 minutes).

    python -m benchmarks.image_sets --sets shapes-dark,badges,scenes,icons,unbalanced --tag new-sets
    python -m benchmarks.image_sets --sets icons --max-images 400 --tag smoke \
        -S train_autoencoder.steps=100 -S train.steps=100 -S train_classifier.steps=100 -S sample.num_images=200
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
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .common import RESULTS, machine, table, write_result
from .ray_scaling import REPO


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(c) for c in rng.integers(0, 256, 3))


def _distinct(rng: np.random.Generator, other: tuple[int, int, int]) -> tuple[int, int, int]:
    while True:
        c = _colour(rng)
        if sum(abs(a - b) for a, b in zip(c, other)) > 200:
            return c


def _hsv(h: float, s: float, v: float) -> tuple[int, int, int]:
    import colorsys

    return tuple(int(round(255 * c)) for c in colorsys.hsv_to_rgb(h % 1.0, s, v))


def _light(rng: np.random.Generator) -> tuple[int, int, int]:
    """A light colour: any hue, some colour, bright (pale yellow, light blue, pink, near white...)."""
    return _hsv(rng.uniform(), rng.uniform(0.2, 0.8), rng.uniform(0.85, 1.0))


def _dark(rng: np.random.Generator) -> tuple[int, int, int]:
    """A dark, clearly coloured ground: dark red, dark green, navy, plum, brown..."""
    return _hsv(rng.uniform(), rng.uniform(0.6, 1.0), rng.uniform(0.2, 0.45))


def _polygon(cx: float, cy: float, r: float, n: int, a0: float) -> list[tuple[float, float]]:
    return [(cx + r * math.cos(a0 + 2 * math.pi * k / n), cy + r * math.sin(a0 + 2 * math.pi * k / n)) for k in range(n)]


def _draw_shape(d: ImageDraw.ImageDraw, cls: int, cx: float, cy: float, r: float, a0: float | None, fill: Any) -> None:
    """Circle (0), square (1) or triangle (2) of radius ``r`` at (cx, cy); ``a0`` None: upright."""
    if cls == 0:
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        n = 4 if cls == 1 else 3
        d.polygon(_polygon(cx, cy, r, n, a0 if a0 is not None else (math.pi / 4 if n == 4 else -math.pi / 2)), fill=fill)


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
    a0 = rng.uniform(0, 2 * math.pi) if hard and cls else None
    _draw_shape(d, cls, cx, cy, r, a0, fill)
    return img


def shape_dark_image(cls: int, rng: np.random.Generator) -> Image.Image:
    """The user's case: an upright circle, square or triangle in a random light colour on a random
    dark colour, 40-63 px."""
    size = int(rng.integers(40, 64))
    img = Image.new("RGB", (size, size), _dark(rng))
    r = rng.uniform(0.22, 0.38) * size
    cx, cy = rng.uniform(r, size - r, 2)
    _draw_shape(ImageDraw.Draw(img), cls, cx, cy, r, None, _light(rng))
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


SUPER = 4   # symbols are drawn this many times larger and shrunk: smooth (antialiased) edges


def _smooth_mask(size: int, draw: Callable[[ImageDraw.ImageDraw, float], None]) -> Image.Image:
    """An "L" mask of ``size`` drawn by ``draw(d, scale)`` at SUPER x and shrunk with a box filter."""
    big = Image.new("L", (size * SUPER, size * SUPER), 0)
    draw(ImageDraw.Draw(big), SUPER)
    return big.resize((size, size), Image.BOX)


def _ground(rng: np.random.Generator, size: int, avoid: tuple[int, int, int]) -> np.ndarray:
    """A coloured, textured (H, W, 3) float ground far from ``avoid``: a linear gradient between two
    colours, a checker of two colours, or a colour with smooth noise on it."""
    a = np.array(_distinct(rng, avoid), np.float32)
    b = np.clip(a + rng.uniform(-70, 70, 3), 0, 255)
    kind = int(rng.integers(3))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    if kind == 0:
        angle = rng.uniform(0, 2 * math.pi)
        t = ((xx - 0.5) * math.cos(angle) + (yy - 0.5) * math.sin(angle)) / math.sqrt(2) + 0.5
        return a * (1 - t[..., None]) + b * t[..., None]
    if kind == 1:
        cell = int(rng.integers(4, 11))
        iy, ix = np.mgrid[0:size, 0:size] // cell
        return np.where(((iy + ix) % 2 == 0)[..., None], a, b)
    coarse = rng.normal(0, 1, (int(rng.integers(4, 9)),) * 2 + (3,))
    noise = np.stack([np.asarray(Image.fromarray(c.astype(np.float32), "F").resize((size, size), Image.BICUBIC)) for c in coarse.transpose(2, 0, 1)], -1)
    return np.clip(a + 35 * noise + rng.normal(0, 6, (size, size, 3)), 0, 255)


BADGES = ("star", "plus", "ring", "arrow")


def badge_image(cls: int, rng: np.random.Generator) -> Image.Image:
    """A symbol (star, plus, ring, arrow) in a random vivid colour on a coloured textured ground
    (gradient, checker or noise), 48-63 px, turned a little; colour is no part of the class."""
    size = int(rng.integers(48, 64))
    fill = _hsv(rng.uniform(), rng.uniform(0.6, 1.0), rng.uniform(0.6, 1.0))
    ground = _ground(rng, size, fill)
    r = rng.uniform(0.28, 0.40) * size
    cx, cy = rng.uniform(r, size - r, 2)
    turn = rng.normal(0, 0.2)

    def draw(d: ImageDraw.ImageDraw, k: float) -> None:
        x, y, R = cx * k, cy * k, r * k
        if cls == 0:       # five-pointed star
            pts = [(x + (R if j % 2 == 0 else 0.45 * R) * math.cos(turn - math.pi / 2 + math.pi * j / 5),
                    y + (R if j % 2 == 0 else 0.45 * R) * math.sin(turn - math.pi / 2 + math.pi * j / 5)) for j in range(10)]
            d.polygon(pts, fill=255)
        elif cls == 1:     # plus: two bars
            w = 0.33 * R
            for ang in (turn, turn + math.pi / 2):
                c, s_ = math.cos(ang), math.sin(ang)
                d.polygon([(x + u * R * c - v * w * s_, y + u * R * s_ + v * w * c) for u, v in ((-1, -1), (1, -1), (1, 1), (-1, 1))], fill=255)
        elif cls == 2:     # ring
            d.ellipse([x - R, y - R, x + R, y + R], fill=255)
            d.ellipse([x - 0.55 * R, y - 0.55 * R, x + 0.55 * R, y + 0.55 * R], fill=0)
        else:              # arrow pointing right (turned a little): shaft and head
            shape = [(-1, -0.2), (0.1, -0.2), (0.1, -0.6), (1, 0), (0.1, 0.6), (0.1, 0.2), (-1, 0.2)]
            c, s_ = math.cos(turn), math.sin(turn)
            d.polygon([(x + R * (u * c - v * s_), y + R * (u * s_ + v * c)) for u, v in shape], fill=255)

    alpha = np.asarray(_smooth_mask(size, draw), np.float32)[..., None] / 255
    out = ground * (1 - alpha) + np.array(fill, np.float32) * alpha
    return Image.fromarray(out.clip(0, 255).astype(np.uint8))


SCENES = ("field", "trees", "houses", "lake")


def scene_image(cls: int, rng: np.random.Generator) -> Image.Image:
    """A photograph-like landscape, 4:3, 64-95 px wide: sky and ground in smooth gradients under a
    random light (noon, dusk, overcast, exposure), then by class a sun over an open field, trees, houses
    or a lake, with soft shadows; then lens blur, sensor noise and JPEG."""
    w = int(rng.integers(64, 96))
    h = int(round(w * 0.75))
    light = int(rng.integers(3))                    # 0 noon, 1 dusk, 2 overcast
    sky_top = np.array([(40, 90, 200), (70, 60, 140), (150, 155, 165)][light], np.float32) + rng.normal(0, 12, 3)
    sky_low = np.array([(170, 205, 245), (250, 160, 90), (205, 205, 210)][light], np.float32) + rng.normal(0, 12, 3)
    grass = np.array(_hsv(rng.uniform(0.17, 0.33), rng.uniform(0.45, 0.8), rng.uniform(0.4, 0.7)), np.float32)
    horizon = rng.uniform(0.42, 0.62) * h
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    t_sky = np.clip(yy / max(horizon, 1), 0, 1)[..., None]
    t_ground = np.clip((yy - horizon) / max(h - horizon, 1), 0, 1)[..., None]
    img = np.where(yy[..., None] < horizon, sky_top * (1 - t_sky) + sky_low * t_sky, grass * (0.8 + 0.45 * t_ground))
    shadow = Image.new("L", (w, h), 0)
    sd = ImageDraw.Draw(shadow)
    layer = Image.fromarray(img.clip(0, 255).astype(np.uint8))
    d = ImageDraw.Draw(layer)
    sun_x = rng.uniform(0.15, 0.85) * w               # shadows fall away from the light
    lean = 1 if sun_x < w / 2 else -1
    if cls == 0:       # the sun (a disc with a glow) over an open field, a few far bushes
        r = rng.uniform(0.06, 0.10) * w
        sy = rng.uniform(0.25, 0.75) * horizon
        glow = np.exp(-((xx - sun_x) ** 2 + (yy - sy) ** 2) / (2 * (2.5 * r) ** 2))[..., None]
        core = (((xx - sun_x) ** 2 + (yy - sy) ** 2) < r * r)[..., None]
        sun = np.array([(255, 250, 220), (255, 190, 120), (245, 245, 240)][light], np.float32)
        arr = np.asarray(layer, np.float32)
        arr = np.where(core, sun, arr * (1 - 0.6 * glow) + sun * 0.6 * glow)
        layer = Image.fromarray(arr.clip(0, 255).astype(np.uint8))
        d = ImageDraw.Draw(layer)
        for _ in range(int(rng.integers(0, 4))):
            bx, bw = rng.uniform(0, w), rng.uniform(0.03, 0.07) * w
            d.ellipse([bx - bw, horizon - bw * 0.6, bx + bw, horizon + bw * 0.3], fill=tuple(int(c) for c in grass * 0.6))
    elif cls == 1:     # trees: trunks and round crowns, nearer ones lower and larger
        for _ in range(int(rng.integers(2, 6))):
            depth = rng.uniform(0, 1)
            base = horizon + depth * (h - horizon) * 0.9
            size = (0.08 + 0.16 * depth) * h
            x = rng.uniform(0.05, 0.95) * w
            sd.ellipse([x - size * 0.3 + lean * size * 0.4, base - size * 0.12, x + size * 0.9 + lean * size * 0.4, base + size * 0.12], fill=170)
            d.rectangle([x - size * 0.08, base - size * 0.9, x + size * 0.08, base], fill=(90 + int(rng.integers(-20, 20)), 60, 35))
            crown = tuple(int(c) for c in np.array(_hsv(rng.uniform(0.22, 0.38), rng.uniform(0.5, 0.9), rng.uniform(0.2, 0.45))) )
            d.ellipse([x - size * 0.45, base - size * 1.7, x + size * 0.45, base - size * 0.7], fill=crown)
    elif cls == 2:     # houses: a wall, a pitched roof, a door and a window
        for _ in range(int(rng.integers(1, 4))):
            depth = rng.uniform(0.1, 1)
            base = horizon + depth * (h - horizon) * 0.85
            size = (0.14 + 0.18 * depth) * h
            x = rng.uniform(0.1, 0.9) * w
            sd.polygon([(x - size * 0.5, base), (x + size * 0.5, base), (x + size * 0.5 + lean * size * 0.7, base + size * 0.2), (x - size * 0.5 + lean * size * 0.7, base + size * 0.2)], fill=170)
            wall = _hsv(rng.uniform(0.05, 0.15), rng.uniform(0.1, 0.4), rng.uniform(0.7, 0.95))
            roof = _hsv(rng.uniform(0.0, 0.06), rng.uniform(0.5, 0.8), rng.uniform(0.35, 0.65))
            d.rectangle([x - size * 0.5, base - size * 0.7, x + size * 0.5, base], fill=wall)
            d.polygon([(x - size * 0.62, base - size * 0.7), (x, base - size * 1.15), (x + size * 0.62, base - size * 0.7)], fill=roof)
            d.rectangle([x - size * 0.1, base - size * 0.35, x + size * 0.1, base], fill=(80, 55, 40))
            d.rectangle([x + size * 0.2, base - size * 0.55, x + size * 0.38, base - size * 0.38], fill=(120, 160, 200))
    else:              # a lake: water mirroring the sky below the horizon, with a far shore
        arr = np.asarray(layer, np.float32)
        top = horizon + rng.uniform(0.05, 0.2) * (h - horizon)
        mirror = np.clip((top + (top - yy)) / max(horizon, 1), 0, 1)[..., None]
        water = (sky_top * (1 - mirror) + sky_low * mirror) * np.array([0.7, 0.85, 1.0], np.float32)
        ripple = 6 * np.sin(yy * rng.uniform(0.8, 1.6) + rng.uniform(0, 6))[..., None]
        arr = np.where((yy >= top)[..., None], water + ripple, arr)
        layer = Image.fromarray(arr.clip(0, 255).astype(np.uint8))
    arr = np.asarray(layer, np.float32)
    arr *= 1 - 0.45 * np.asarray(shadow.filter(ImageFilter.GaussianBlur(max(1.0, 0.02 * w))), np.float32)[..., None] / 255
    tint = np.array([1.0, 1.0, 1.0], np.float32) + rng.normal(0, 0.04, 3)          # white balance
    arr = arr * tint * rng.uniform(0.75, 1.2)                                          # exposure
    out = Image.fromarray(arr.clip(0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.9)))
    noisy = np.asarray(out, np.float32) + rng.normal(0, rng.uniform(2, 6), (h, w, 3))
    return Image.fromarray(noisy.clip(0, 255).astype(np.uint8))


ICONS = ("envelope", "magnifier", "home", "heart", "sun")


def icon_image(cls: int, rng: np.random.Generator) -> Image.Image:
    """A 48-63 px RGBA icon on a transparent ground whose hidden colour is black (what a decoder that
    drops alpha shows): black line art (envelope, magnifier, home) or a full-colour red heart or
    yellow sun, with smooth, semi-transparent edges."""
    size = int(rng.integers(48, 64))
    r = rng.uniform(0.3, 0.42) * size
    cx, cy = rng.uniform(r + 2, size - r - 2, 2)
    lw = rng.uniform(0.05, 0.09) * size
    if cls < 3:
        ink = tuple(int(c) for c in rng.integers(0, 40, 3))
    elif cls == 3:
        ink = _hsv(rng.uniform(-0.02, 0.02), rng.uniform(0.8, 1.0), rng.uniform(0.75, 1.0))
    else:
        ink = _hsv(rng.uniform(0.11, 0.15), rng.uniform(0.8, 1.0), rng.uniform(0.9, 1.0))

    def draw(d: ImageDraw.ImageDraw, k: float) -> None:
        x, y, R, L = cx * k, cy * k, r * k, max(1, int(lw * k))
        if cls == 0:       # envelope: a box and its flap
            box = [x - R, y - 0.65 * R, x + R, y + 0.65 * R]
            d.rectangle(box, outline=255, width=L)
            d.line([(box[0], box[1]), (x, y + 0.1 * R), (box[2], box[1])], fill=255, width=L, joint="curve")
        elif cls == 1:     # magnifier: a lens and a handle
            lr = 0.6 * R
            lx, ly = x - 0.3 * R, y - 0.3 * R
            d.ellipse([lx - lr, ly - lr, lx + lr, ly + lr], outline=255, width=L)
            d.line([(lx + 0.7 * lr, ly + 0.7 * lr), (x + R, y + R)], fill=255, width=int(L * 1.6))
        elif cls == 2:     # home: a roof line over a box with a door
            d.line([(x - R, y - 0.05 * R), (x, y - R), (x + R, y - 0.05 * R)], fill=255, width=L, joint="curve")
            d.rectangle([x - 0.7 * R, y - 0.25 * R, x + 0.7 * R, y + R], outline=255, width=L)
            d.rectangle([x - 0.18 * R, y + 0.35 * R, x + 0.18 * R, y + R], fill=255)
        elif cls == 3:     # heart: two discs and a point, filled
            q = 0.5 * R
            d.ellipse([x - 2 * q, y - 1.5 * q, x, y + 0.5 * q], fill=255)
            d.ellipse([x, y - 1.5 * q, x + 2 * q, y + 0.5 * q], fill=255)
            d.polygon([(x - 1.93 * q, y - 0.2 * q), (x + 1.93 * q, y - 0.2 * q), (x, y + 2 * q)], fill=255)
        else:              # sun: a disc and eight rays
            d.ellipse([x - 0.5 * R, y - 0.5 * R, x + 0.5 * R, y + 0.5 * R], fill=255)
            for j in range(8):
                a = math.pi * j / 4
                d.line([(x + 0.7 * R * math.cos(a), y + 0.7 * R * math.sin(a)), (x + R * math.cos(a), y + R * math.sin(a))], fill=255, width=L)

    alpha = _smooth_mask(size, draw)
    img = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    img.paste(Image.new("RGBA", (size, size), (*ink, 255)), mask=alpha)   # colour only under the ink; alpha = coverage
    img.putalpha(alpha)
    return img


@dataclass(frozen=True)
class ImageSet:
    """A set made here: class folder names, images per class, a drawer ``draw(class, rng)``, the
    file format (jpg: RGB; png: kept as drawn, e.g. RGBA)."""

    names: tuple[str, ...]
    counts: tuple[int, ...]
    draw: Callable[[int, np.random.Generator], Image.Image]
    fmt: str = "jpg"

    @property
    def images(self) -> int:
        return sum(self.counts)

    @property
    def classes(self) -> int:
        return len(self.names)


def _even(total: int, names: tuple[str, ...]) -> tuple[int, ...]:
    return tuple(total // len(names) + (k < total % len(names)) for k in range(len(names)))


SHAPE_NAMES = ("circle", "square", "triangle")
SETS: dict[str, ImageSet] = {
    "shapes": ImageSet(SHAPE_NAMES, _even(900, SHAPE_NAMES), shape_image),
    "shapes-hard": ImageSet(SHAPE_NAMES, _even(900, SHAPE_NAMES), lambda cls, rng: shape_image(cls, rng, hard=True)),
    "glyphs": ImageSet(tuple(f"glyph{k:02d}" for k in range(20)), (100,) * 20, glyph_image),
    "stripes": ImageSet(tuple(f"angle{k}" for k in range(5)), (120,) * 5, stripes_image),
    # the user's case; the autoencoder is tuned on it
    "shapes-dark": ImageSet(SHAPE_NAMES, _even(900, SHAPE_NAMES), shape_dark_image),
    # held out: nobody tunes on these
    "badges": ImageSet(BADGES, _even(800, BADGES), badge_image),
    "scenes": ImageSet(SCENES, _even(800, SCENES), scene_image),
    "icons": ImageSet(ICONS, _even(600, ICONS), icon_image, fmt="png"),
    "unbalanced": ImageSet(SHAPE_NAMES, (600, 180, 60), shape_image),    # 10:1 from the largest class to the smallest
}


def scaled_counts(counts: tuple[int, ...], max_images: int | None) -> tuple[int, ...]:
    """``counts`` cut proportionally to about ``max_images`` in all (ratios kept, at least 1 per class)."""
    total = sum(counts)
    if max_images is None or max_images >= total:
        return counts
    if max_images < len(counts):
        raise ValueError(f"max_images={max_images} is below the {len(counts)} classes; give at least one image per class")
    return tuple(max(1, round(c * max_images / total)) for c in counts)


def make_set(name: str, root: Path, seed: int = 0, max_images: int | None = None) -> Path:
    """The image folder ``root/name/<class>/<i>.<fmt>`` (rewritten if present): the same files for
    the same seed; classes interleaved (0, 1, 2, 0, 1, ...) until each has its count."""
    if name not in SETS:
        raise ValueError(f"unknown image set {name!r}; choose from {', '.join(SETS)}")
    spec = SETS[name]
    counts = scaled_counts(spec.counts, max_images)
    out = root / name
    shutil.rmtree(out, ignore_errors=True)
    rng = np.random.default_rng(seed)
    labels = [cls for k in range(max(counts)) for cls in range(spec.classes) if k < counts[cls]]
    for i, cls in enumerate(labels):
        folder = out / spec.names[cls]
        folder.mkdir(parents=True, exist_ok=True)
        img = spec.draw(cls, rng)
        if spec.fmt == "jpg":
            img.save(folder / f"{i:05d}.jpg", quality=90)
        else:
            img.save(folder / f"{i:05d}.{spec.fmt}")
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
        key, eq, value = item.partition("=")
        section, dot, field = key.partition(".")
        if not (eq and dot and section in params and isinstance(params[section], dict)):
            raise SystemExit(f"-S/--set {item!r}: give SECTION.KEY=VALUE with a section of params.yaml ({', '.join(params)}), e.g. train.steps=100")
        params[section][field] = yaml.safe_load(value)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    total, stages, _ = timed_repro([str(Path(sys.executable).parent / "dvc"), "repro"], work, env)
    return {**finished_run(work), "seconds": total, "stages": stages}


def finished_run(work: Path) -> dict[str, Any]:
    """A finished run's metrics in the project copy ``work`` (its time unknown here: None)."""
    if not (work / "metrics" / "eval.json").exists():
        raise SystemExit(f"{work / 'metrics' / 'eval.json'} not found: {work} holds no finished run; run without --report-only")
    ev = json.loads((work / "metrics" / "eval.json").read_text())
    ae = json.loads((work / "metrics" / "autoencoder.json").read_text()) if (work / "metrics" / "autoencoder.json").exists() else {}
    return {"seconds": None, "stages": {}, "eval": ev, "autoencoder": ae}


# ---------------------------------------------------------------------------------------------
# What a person sees: colour statistics and grids of real images and samples of a finished run
# ---------------------------------------------------------------------------------------------

GRID_PER_CLASS = 8   # images per class (row) in each grid
GRID_SCALE = 4       # nearest-neighbour enlargement of the grids
PREPARED = "data/prepared"          # in the project copy (store.root null: the outputs are local)
SAMPLE_SHARDS = "samples/parquet"


def val_shards(work: Path) -> list[Path]:
    """The prepared val split's parquet shards, in the version its manifest names (as evaluate reads them)."""
    from ray_jobs.storage import version_folder

    manifest_path = work / PREPARED / "manifest.json"
    if not manifest_path.exists():
        raise SystemExit(f"{manifest_path} not found: the run's prepared data must be local (leave store.root null)")
    manifest = json.loads(manifest_path.read_text())
    folder = Path(version_folder(work / PREPARED, manifest))
    return [folder / shard for shard in manifest["splits"]["val"]["shards"]]


def prepared_counts(work: Path) -> tuple[int, ...]:
    """Images per class the run prepared (train + val, after any skipped), from its manifest."""
    manifest = json.loads((work / PREPARED / "manifest.json").read_text())
    per_class = [manifest["splits"][split]["per_class"] for split in ("train", "val")]
    return tuple(sum(int(p.get(str(c), 0)) for p in per_class) for c in range(manifest["num_classes"]))


def sample_shards(work: Path) -> list[Path]:
    shards = sorted((work / SAMPLE_SHARDS).glob("*.parquet"))
    if not shards:
        raise SystemExit(f"no parquet shards in {work / SAMPLE_SHARDS}: the run's samples must be local (leave "
                         f"store.root null) and sample.formats must include parquet")
    return shards


def _read_shard(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A prepared or sample parquet shard's uint8 NHWC images and labels (as evaluate reads them)."""
    import pyarrow.parquet as pq

    from dit_core.data import pngs_to_uint8

    table = pq.read_table(path, columns=["image", "label"])
    return pngs_to_uint8(table.column("image").to_pylist()), np.asarray(table.column("label").to_pylist(), np.int64)


def grid_classes(labels: np.ndarray, most: int = 16) -> list[int]:
    """Up to ``most`` of the classes in ``labels``, evenly spaced (as the sample stage's grid.png)."""
    present = np.unique(labels)
    return [int(c) for c in present[np.unique(np.linspace(0, len(present) - 1, min(len(present), most)).round().astype(int))]]


def look(shards: list[Path], classes: list[int]) -> tuple[Any, bytes]:
    """The colour statistics (dit_core.image_stats.ColourStats) of every image in ``shards``, and a
    PNG grid: a row per class of ``classes``, GRID_PER_CLASS images each. One shard in memory at a time."""
    from dit_core.image_stats import ColourStats
    from ray_jobs.sample import GridBuilder

    stats, grid = ColourStats(), GridBuilder(np.asarray(classes), GRID_PER_CLASS)
    for path in shards:
        images, labels = _read_shard(path)
        stats = stats.merge(ColourStats.of(images))
        if not grid.full:
            grid.add(images, labels)
    return stats, grid.png(scale=GRID_SCALE)


def _pair(ratio: Any) -> tuple[float | None, float | None]:
    """(bright, dark) saturation ratios of a ``colour_ratio`` entry written by another stage: a dict
    of dit_core.image_stats.colour_ratios, or one number (kept as the bright figure); None if absent."""
    if isinstance(ratio, dict):
        return ratio.get("saturation_bright"), ratio.get("saturation_dark")
    if isinstance(ratio, (int, float)):
        return float(ratio), None
    return None, None


def grids_dir() -> Path:
    return Path(os.environ.get("BENCH_RESULTS", RESULTS)) / "image_sets-grids"


def what_a_person_sees(work: Path, name: str, tag: str | None) -> dict[str, Any]:
    """Colour statistics of the real val images and of the samples (and their ratios, samples/real),
    and the two grids written to benchmarks/results/image_sets-grids/<set>[-<tag>]-{real,samples}.png."""
    from dit_core.image_stats import colour_ratios

    val = val_shards(work)
    labels = np.concatenate([_read_shard(path)[1] for path in val])
    classes = grid_classes(labels)
    real_stats, real_grid = look(val, classes)
    sample_stats, sample_grid = look(sample_shards(work), classes)
    out_dir = grids_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = name + (f"-{tag}" if tag else "")
    files = {}
    for kind, png in (("real", real_grid), ("samples", sample_grid)):
        path = out_dir / f"{stem}-{kind}.png"
        path.write_bytes(png)
        files[kind] = str(path)
    real, samples = real_stats.means(), sample_stats.means()
    return {"colour_real": real, "colour_samples": samples, "colour_ratio_samples": colour_ratios(samples, real),
            "grid_classes": classes, "grids": files}


def report_row(name: str, r: dict[str, Any], seen: dict[str, Any], image_size: int, counts: tuple[int, ...]) -> dict[str, Any]:
    """One set's figures: eval.json's (the label-free keys None where evaluate does not write them
    yet), the colour ratios and the goal."""
    ev, ae = r["eval"], r["autoencoder"]
    ok = ev["class_accuracy"] >= 0.9 and ev["fid"] <= ev["fid_untrained"] / 4 and (r["seconds"] or 0) <= 900
    ratio = seen["colour_ratio_samples"]
    ae_bright, ae_dark = _pair(ae.get("colour_ratio"))
    ev_bright, ev_dark = _pair(ev.get("colour_ratio"))
    return {"set": name, "images": sum(counts), "classes": len(counts), "per_class": list(counts), "image_size": image_size,
            "fid": ev["fid"], "fid_untrained": ev["fid_untrained"], "fid_ratio": ev["fid"] / ev["fid_untrained"],
            "class_accuracy": ev["class_accuracy"],
            "fd_label_free": ev.get("fd_label_free"), "fd_label_free_floor": ev.get("fd_label_free_floor"),
            "fd_label_free_untrained": ev.get("fd_label_free_untrained"),
            "sat_bright_ratio": ratio["saturation_bright"], "sat_dark_ratio": ratio["saturation_dark"],
            "eval_colour_ratio": ev.get("colour_ratio"), "eval_sat_bright_ratio": ev_bright, "eval_sat_dark_ratio": ev_dark,
            "ae_colour_ratio": ae.get("colour_ratio"), "ae_sat_bright_ratio": ae_bright, "ae_sat_dark_ratio": ae_dark,
            "minutes": None if r["seconds"] is None else r["seconds"] / 60, "goal_met": ok, "stages": r["stages"], "autoencoder": ae, **seen}


def _slash(a: Any, b: Any) -> str:
    fmt = lambda v: "-" if v is None else (f"{v:.3g}" if abs(v) < 100 else f"{v:.1f}")   # noqa: E731
    return f"{fmt(a)} / {fmt(b)}"


def printed(rows: list[dict[str, Any]]) -> str:
    """The table: FID / untrained, fd_label_free / floor, saturation ratios (samples/real) bright / dark,
    and the autoencoder's reconstructions' (from metrics/autoencoder.json, "-" where absent)."""
    shown = [{"set": r["set"], "images": r["images"], "classes": r["classes"],
              "FID / untrained": _slash(r["fid"], r["fid_untrained"]), "class acc": r["class_accuracy"],
              "fd_label_free / floor": _slash(r["fd_label_free"], r["fd_label_free_floor"]),
              "sat samples/real bright / dark": _slash(r["sat_bright_ratio"], r["sat_dark_ratio"]),
              "sat AE/real bright / dark": _slash(r["ae_sat_bright_ratio"], r["ae_sat_dark_ratio"]),
              "minutes": r["minutes"], "goal": r["goal_met"]} for r in rows]
    return table(shown, list(shown[0]))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sets", default="shapes,glyphs,stripes", help=f"comma-separated, of: {', '.join(SETS)}")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--work", default="/tmp/dit-image-sets")
    p.add_argument("-S", "--set", dest="extra", action="append", default=[], help="SECTION.KEY=VALUE over params.yaml (a variant)")
    p.add_argument("--max-images", type=int, default=None, help="cut each set to about this many images, class ratios kept (a smoke run)")
    p.add_argument("--seed", type=int, default=0, help="the image sets' seed")
    p.add_argument("--make-only", action="store_true", help="write the image folders and stop")
    p.add_argument("--report-only", action="store_true",
                   help="make no run: report on the runs already in --work (their times unknown: minutes empty)")
    p.add_argument("--tag", default=None)
    a = p.parse_args(argv)
    names = [s for s in a.sets.split(",") if s]
    unknown = [n for n in names if n not in SETS]
    if unknown:
        p.error(f"--sets: unknown {', '.join(unknown)}; choose from {', '.join(SETS)}")
    work = Path(a.work)
    rows = []
    for name in names:
        project = work / f"project-{name}"
        if a.report_only:
            r = finished_run(project)
        else:
            folder = make_set(name, work / "images", seed=a.seed, max_images=a.max_images)
            print(f"{name}: {folder}", flush=True)
            if a.make_only:
                continue
            r = run_pipeline(folder, project, a.image_size, a.extra)
        seen = what_a_person_sees(project, name, a.tag)
        rows.append(report_row(name, r, seen, a.image_size, prepared_counts(project)))
        print(json.dumps(rows[-1], indent=1, default=str), flush=True)
    if rows:
        print(machine())
        print(printed(rows))
        print("wrote", write_result("image_sets", {"settings": vars(a), "rows": rows}, a.tag))


if __name__ == "__main__":
    main()

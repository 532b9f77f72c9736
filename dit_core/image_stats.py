"""Colour statistics of image sets: what a person sees first and a class-trained judge ignores.

Per image, from uint8 RGB pixels scaled to [0, 1]:
- saturation of a pixel: max(R, G, B) - min(R, G, B) (0 for any grey, 1 for a pure primary);
- ``saturation_bright``: mean saturation of the image's brightest 20% of pixels (by luminance),
  ``saturation_dark``: of its darkest 30%; on a light shape on a dark ground these are the shape's
  and the background's colourfulness, on a dark shape on a light ground the other way round;
- ``saturation``: mean saturation of all pixels; ``colourful_share``: share of pixels whose
  saturation exceeds ``COLOURFUL``;
- ``luminance`` and ``luminance_std``: mean and spread of luminance (contrast).

A set's figure is the mean of its images' figures. ``ColourStats`` holds sums and a count, so blocks
computed apart (Ray actors, shards) merge exactly, in any order.

``pixel_features``: a label-free description of each image for a Frechet distance between sets
(evaluate's ``fd_label_free``): the image average-pooled to ``pool x pool`` RGB cells (colour,
background and layout at low resolution; [0, 1]) beside the square roots of its joint colour
histogram (the colours whatever their place). Each block weighs about the same: the pooled pixels'
squared norm is up to pool**2 * 3, the root histogram's is 1, so it is scaled by ``pool``. No
network is trained, so nothing learns to ignore what does not separate the classes: a grey copy,
a swapped background or a set of one repeated image moves the distance (tests/test_label_free.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

BRIGHT_SHARE = 0.2     # the brightest pixels of an image that count as "bright"
DARK_SHARE = 0.3       # the darkest pixels that count as "dark"
COLOURFUL = 0.3        # a pixel with saturation above this counts as strongly coloured
HISTOGRAM_LEVELS = 4   # per channel: a colour histogram has HISTOGRAM_LEVELS ** 3 bins
PIXEL_POOL = 8         # pixel_features: images average-pooled to PIXEL_POOL x PIXEL_POOL cells
FIELDS = ("saturation_bright", "saturation_dark", "saturation", "colourful_share", "luminance", "luminance_std")
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _as_unit_rgb(images: np.ndarray) -> np.ndarray:
    x = np.asarray(images)
    if x.ndim != 4 or x.shape[-1] != 3 or x.dtype != np.uint8:
        raise ValueError(f"images {x.dtype} {x.shape}: expected uint8 (N, H, W, 3)")
    return x.reshape(len(x), -1, 3).astype(np.float32) / 255.0


def per_image_colour(images: np.ndarray) -> dict[str, np.ndarray]:
    """The FIELDS of each image of uint8 (N, H, W, 3): a dict of (N,) float64 arrays."""
    x = _as_unit_rgb(images)                                  # (N, P, 3)
    n, p = x.shape[:2]
    sat = x.max(axis=2) - x.min(axis=2)                       # (N, P)
    lum = x @ _LUMA                                           # (N, P)
    order = np.argsort(lum, axis=1, kind="stable")
    k_bright, k_dark = max(1, round(BRIGHT_SHARE * p)), max(1, round(DARK_SHARE * p))
    sat_sorted = np.take_along_axis(sat, order, axis=1)
    return {
        "saturation_bright": sat_sorted[:, p - k_bright:].mean(axis=1, dtype=np.float64),
        "saturation_dark": sat_sorted[:, :k_dark].mean(axis=1, dtype=np.float64),
        "saturation": sat.mean(axis=1, dtype=np.float64),
        "colourful_share": (sat > COLOURFUL).mean(axis=1, dtype=np.float64),
        "luminance": lum.mean(axis=1, dtype=np.float64),
        "luminance_std": lum.std(axis=1, dtype=np.float64),
    } if n else {f: np.zeros(0) for f in FIELDS}


def colour_histograms(images: np.ndarray, levels: int = HISTOGRAM_LEVELS) -> np.ndarray:
    """Each image's joint RGB histogram with ``levels`` bins per channel, as shares: (N, levels**3)."""
    x = np.asarray(images)
    if x.ndim != 4 or x.shape[-1] != 3 or x.dtype != np.uint8:
        raise ValueError(f"images {x.dtype} {x.shape}: expected uint8 (N, H, W, 3)")
    q = (x.reshape(len(x), -1, 3).astype(np.int64) * levels) // 256          # (N, P, 3) in [0, levels)
    bins = (q[..., 0] * levels + q[..., 1]) * levels + q[..., 2]              # (N, P)
    counts = np.stack([np.bincount(b, minlength=levels ** 3) for b in bins]) if len(x) else np.zeros((0, levels ** 3))
    return counts / max(1, bins.shape[1] if len(x) else 1)


@dataclass
class ColourStats:
    """Sums of the per-image FIELDS and the image count: mergeable, ``means()`` gives the set's figures."""

    count: int = 0
    sums: dict[str, float] = field(default_factory=lambda: {f: 0.0 for f in FIELDS})

    @classmethod
    def of(cls, images: np.ndarray) -> "ColourStats":
        per = per_image_colour(images)
        return cls(count=len(images), sums={f: float(per[f].sum()) for f in FIELDS})

    def merge(self, other: "ColourStats") -> "ColourStats":
        return ColourStats(self.count + other.count, {f: self.sums[f] + other.sums[f] for f in FIELDS})

    def means(self) -> dict[str, float]:
        if not self.count:
            raise ValueError("no images: colour statistics need at least one")
        return {f: self.sums[f] / self.count for f in FIELDS}


def colour_ratios(got: dict[str, float], want: dict[str, float]) -> dict[str, float]:
    """Each saturation figure of ``got`` as a share of ``want``'s (1.0: as colourful as the real images;
    a ratio of a figure that is 0 in ``want`` is 1.0 when ``got`` is 0 too, else inf)."""
    out = {}
    for f in ("saturation_bright", "saturation_dark", "saturation", "colourful_share"):
        out[f] = got[f] / want[f] if want[f] > 0 else (1.0 if got[f] == 0 else float("inf"))
    return out


def pixel_features(images: np.ndarray, pool: int = PIXEL_POOL, levels: int = HISTOGRAM_LEVELS) -> np.ndarray:
    """Label-free features of uint8 (N, H, W, 3) images: (N, pool * pool * 3 + levels ** 3) float32,
    the ``pool x pool`` average-pooled RGB in [0, 1], then ``pool`` times the root colour histogram."""
    x = np.asarray(images)
    if x.ndim != 4 or x.shape[-1] != 3 or x.dtype != np.uint8:
        raise ValueError(f"images {x.dtype} {x.shape}: expected uint8 (N, H, W, 3)")
    n, h, w, _ = x.shape
    if pool < 1 or h < pool or w < pool:
        raise ValueError(f"images of {h}x{w} cannot be pooled to {pool}x{pool} cells; lower evaluate.pixel_pool")
    # cell edges as an adaptive average pool places them: cell i covers rows [i*h//pool, ceil((i+1)*h/pool))
    rows = [(i * h // pool, -(-(i + 1) * h // pool)) for i in range(pool)]
    cols = [(j * w // pool, -(-(j + 1) * w // pool)) for j in range(pool)]
    unit = x.astype(np.float32) / 255.0
    cells = np.stack([np.stack([unit[:, a:b, c:d].mean(axis=(1, 2)) for c, d in cols], axis=1) for a, b in rows], axis=1)
    hist = np.sqrt(colour_histograms(x, levels)).astype(np.float32) * pool      # (N, levels**3)
    return np.concatenate([cells.reshape(n, -1), hist], axis=1).astype(np.float32)

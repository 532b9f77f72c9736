"""Colour statistics (dit_core/image_stats.py) against what they must measure."""

import numpy as np
import pytest

from dit_core.image_stats import ColourStats, colour_histograms, colour_ratios, per_image_colour


def _shape_on_ground(fg, bg, n=4, size=16):
    img = np.empty((n, size, size, 3), np.uint8)
    img[:] = bg
    img[:, 4:12, 4:12] = fg     # 64 of 256 pixels: the brightest 20% are all shape when fg is brighter
    return img


def test_saturation_of_shape_and_ground():
    img = _shape_on_ground((255, 200, 0), (0, 0, 128))          # orange shape on navy
    per = per_image_colour(img)
    assert per["saturation_bright"] == pytest.approx(1.0)       # 255 - 0
    assert per["saturation_dark"] == pytest.approx(128 / 255)
    grey = img.mean(axis=-1, keepdims=True).astype(np.uint8).repeat(3, axis=-1)
    assert per_image_colour(grey)["saturation"].max() == 0.0
    assert per_image_colour(grey)["colourful_share"].max() == 0.0


def test_stats_merge_equals_whole_and_ratios():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (10, 8, 8, 3), dtype=np.uint8)
    whole = ColourStats.of(img).means()
    merged = ColourStats.of(img[:3]).merge(ColourStats.of(img[3:])).means()
    assert merged == pytest.approx(whole)
    half = (img // 2).astype(np.uint8)                           # saturation halves (up to rounding)
    r = colour_ratios(ColourStats.of(half).means(), whole)
    assert 0.45 < r["saturation"] < 0.55


def test_histograms_are_shares():
    img = _shape_on_ground((255, 255, 255), (0, 0, 0), n=2)
    h = colour_histograms(img)
    assert h.shape == (2, 64)
    assert h.sum(axis=1) == pytest.approx([1.0, 1.0])
    assert h[0, 0] == pytest.approx(192 / 256) and h[0, 63] == pytest.approx(64 / 256)
    with pytest.raises(ValueError, match="uint8"):
        colour_histograms(img.astype(np.float32))

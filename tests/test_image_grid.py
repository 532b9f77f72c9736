"""dit_core.data.image_grid: the one grid of the project (grid.png of the sample job, `dit generate`)."""

from __future__ import annotations

import numpy as np
import pytest

from dit_core.data import image_grid


def test_images_sit_in_their_cells_on_a_white_ground():
    images = np.arange(2 * 3 * 2 * 2 * 3, dtype=np.uint8).reshape(2, 3, 2, 2, 3)   # 2 rows, 3 columns of 2x2
    grid = image_grid(images)
    assert grid.shape == (2 * 3 + 1, 3 * 3 + 1, 3) and grid.dtype == np.uint8
    for i in range(2):
        for j in range(3):
            np.testing.assert_array_equal(grid[1 + 3 * i:3 + 3 * i, 1 + 3 * j:3 + 3 * j], images[i, j])
    assert (grid[0] == 255).all() and (grid[:, 3] == 255).all(), "1-pixel white gaps"
    zoomed = image_grid(images, zoom=4)
    assert zoomed.shape == (4 * 7, 4 * 10, 3)
    np.testing.assert_array_equal(zoomed[::4, ::4], grid)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match=r"\(rows, columns, H, W, C\) uint8"):
        image_grid(np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="zoom=0 must be at least 1"):
        image_grid(np.zeros((1, 1, 8, 8, 3), np.uint8), zoom=0)

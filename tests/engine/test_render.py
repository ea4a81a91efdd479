"""Pictures: filter grids show the weights, overlays follow the heatmap."""

from __future__ import annotations

import numpy as np

from convlens.server.engine.render import DEAD_FRAME, filter_grid, overlay


def test_rgb_filters_are_drawn_as_colour_tiles_with_per_filter_scaling() -> None:
    w = np.zeros((2, 3, 2, 2), np.float32)
    w[0, 0] = 1.0  # filter 0: pure red
    w[1, 2, 0, 0] = -1.0  # filter 1: one dark-blue-less pixel
    grid = np.asarray(filter_grid(w, cell_scale=1))
    red_tile = grid[1:3, 1:3]
    assert (red_tile[..., 0] == 255).all() and (red_tile[..., 1] == 0).all()


def test_one_by_one_convolutions_are_not_flat_grey() -> None:
    rng = np.random.default_rng(0)
    w = rng.normal(size=(4, 8, 1, 1)).astype(np.float32)
    grid = np.asarray(filter_grid(w, cell_scale=4))
    tiles = grid[1::5, 1::5, 0][:4, :8]  # one pixel per tile (scale 4 + pad 1)
    for i in range(4):
        order = np.argsort(w[i, :, 0, 0])
        assert tiles[i, order[0]] == 0 and tiles[i, order[-1]] == 255  # min black, max white, per filter


def test_overlay_colours_where_the_heatmap_is_strong() -> None:
    image = np.full((32, 32, 3), 128, np.uint8)
    heat = np.zeros((32, 32), np.float32)
    heat[8:16, 8:16] = 1.0
    out = np.asarray(overlay(image, heat)).astype(int)
    hot, cold = out[12, 12], out[28, 28]
    assert hot.sum() > cold.sum() + 150 and (cold == cold[0]).all()  # coloured vs plain grey


def test_dead_filters_are_framed_in_red() -> None:
    w = np.random.default_rng(1).normal(size=(4, 3, 2, 2)).astype(np.float32)
    grid = np.asarray(filter_grid(w, cell_scale=4, dead=[3]))  # 2x2 layout, tiles 8 px, pad 1
    assert tuple(grid[9, 9]) == DEAD_FRAME  # the frame pixel just above-left of tile 3 (row 1, col 1)
    assert tuple(grid[0, 0]) != DEAD_FRAME  # tile 0 is alive

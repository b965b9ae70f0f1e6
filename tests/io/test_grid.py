"""tile_grid: full coverage, exact overlaps, edge rules."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pysynth.io import tile_grid


@st.composite
def grids(draw: st.DrawFn) -> tuple[tuple[int, int], int, int, str]:
    tile = draw(st.integers(1, 64))
    overlap = draw(st.integers(0, tile - 1))
    shape = (draw(st.integers(1, 300)), draw(st.integers(1, 300)))
    edge = draw(st.sampled_from(["shift", "clip", "pad"]))
    return shape, tile, overlap, edge


@settings(max_examples=300, deadline=None)
@given(grids())
def test_tiles_cover_every_pixel(args: tuple) -> None:
    shape, tile, overlap, edge = args
    tiles = tile_grid(shape, tile, overlap, edge=edge)
    covered = np.zeros(shape, np.int32)
    for y, x, h, w in tiles:
        covered[y : y + h, x : x + w] += 1
    assert covered.min() >= 1


@settings(max_examples=300, deadline=None)
@given(grids())
def test_overlap_is_exact_and_edges_follow_the_mode(args: tuple) -> None:
    shape, tile, overlap, edge = args
    tiles = tile_grid(shape, tile, overlap, edge=edge)
    for axis, length in ((0, shape[0]), (1, shape[1])):
        starts = np.unique(tiles[:, axis])
        sizes = np.array([tiles[tiles[:, axis] == s][0, axis + 2] for s in starts])
        assert starts[0] == 0
        ends = starts + sizes
        # neighbours overlap by exactly `overlap`, except the shifted last tile, which may overlap more
        gaps = ends[:-1] - starts[1:]
        if edge == "shift" and len(starts) > 1:
            assert (gaps[:-1] == overlap).all()
            assert gaps[-1] >= overlap
        else:
            assert (gaps == overlap).all()
        if edge == "pad":
            assert (sizes == tile).all()
            assert ends[-1] >= length
            assert len(starts) == 1 or ends[-2] < length  # no tile lies wholly in the padding
        else:
            assert ends[-1] == length  # flush with the border, never past it
            assert (sizes == min(tile, length)).all() if edge == "shift" else (sizes <= tile).all()


def test_known_grid() -> None:
    tiles = tile_grid((10, 25), tile=10, overlap=2)
    assert tiles.tolist() == [[0, 0, 10, 10], [0, 8, 10, 10], [0, 15, 10, 10]]
    clip = tile_grid((10, 25), tile=10, overlap=2, edge="clip")
    assert clip.tolist() == [[0, 0, 10, 10], [0, 8, 10, 10], [0, 16, 10, 9]]
    pad = tile_grid((10, 25), tile=10, overlap=2, edge="pad")
    assert pad.tolist() == [[0, 0, 10, 10], [0, 8, 10, 10], [0, 16, 10, 10]]
    small = tile_grid((5, 7), tile=10)
    assert small.tolist() == [[0, 0, 5, 7]]


@pytest.mark.parametrize(
    ("shape", "tile", "overlap", "edge", "message"),
    [
        ((0, 5), 4, 0, "shift", "shape_hw"),
        ((5, 5), 0, 0, "shift", "tile"),
        ((5, 5), 4, 4, "shift", "overlap"),
        ((5, 5), 4, -1, "shift", "overlap"),
        ((5, 5), 4, 1, "wrap", "edge"),
    ],
)
def test_bad_arguments(shape: tuple[int, int], tile: int, overlap: int, edge: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tile_grid(shape, tile, overlap, edge=edge)

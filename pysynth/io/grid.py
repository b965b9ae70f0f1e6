"""Tile grids: which rectangles cover an image, as a pure function of its shape."""

from __future__ import annotations

import numpy as np

EDGE_MODES = ("shift", "clip", "pad")


def _axis_starts(length: int, tile: int, overlap: int, edge: str) -> tuple[np.ndarray, np.ndarray]:
    """Starts and sizes of the tiles along one axis."""
    stride = tile - overlap
    if length <= tile:
        return np.zeros(1, np.int64), np.array([length if edge != "pad" else tile], np.int64)
    if edge == "shift":
        count = -(-(length - tile) // stride) + 1
        starts = np.arange(count, dtype=np.int64) * stride
        starts[-1] = length - tile
        return starts, np.full(count, tile, np.int64)
    # clip / pad: a regular lattice, one more tile while the previous one leaves uncovered pixels.
    count = -(-(length - overlap) // stride)
    starts = np.arange(count, dtype=np.int64) * stride
    sizes = np.minimum(tile, length - starts) if edge == "clip" else np.full(count, tile, np.int64)
    return starts, sizes.astype(np.int64)


def tile_grid(shape_hw: tuple[int, int], tile: int, overlap: int = 0, *, edge: str = "shift") -> np.ndarray:
    """Tiles of side ``tile`` overlapping by ``overlap`` pixels that cover an image, in row-major order.

    Neighbouring tiles overlap by exactly ``overlap`` pixels, except where ``edge`` says otherwise:

    - ``"shift"``: every tile lies inside the image and has the full size; the last tile of a row or column is
      moved back to end at the border, so it overlaps its neighbour by more. An axis shorter than ``tile`` gets
      one tile of the axis' length.
    - ``"clip"``: a regular lattice; tiles at the far border are cut to the image.
    - ``"pad"``: a regular lattice of full-size tiles; the last ones reach past the border (read as padding).

    Args:
        shape_hw: Image ``(height, width)`` in pixels (> 0).
        tile: Tile side in pixels (> 0).
        overlap: Overlap of neighbouring tiles in pixels, ``0 <= overlap < tile``.
        edge: ``"shift"``, ``"clip"`` or ``"pad"``.

    Returns:
        ``int64`` array of shape ``(n, 4)``: one row ``(y, x, h, w)`` per tile.

    Raises:
        ValueError: For a non-positive shape or tile, an overlap outside ``[0, tile)``, or an unknown ``edge``.
    """
    height, width = (int(v) for v in shape_hw)
    if height <= 0 or width <= 0:
        raise ValueError(f"shape_hw must be positive, got {shape_hw}")
    if tile <= 0:
        raise ValueError(f"tile must be positive, got {tile}")
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must be in [0, tile) = [0, {tile}), got {overlap}")
    if edge not in EDGE_MODES:
        raise ValueError(f"edge must be one of {EDGE_MODES}, got {edge!r}")
    ys, hs = _axis_starts(height, int(tile), int(overlap), edge)
    xs, ws = _axis_starts(width, int(tile), int(overlap), edge)
    grid = np.empty((len(ys), len(xs), 4), np.int64)
    grid[..., 0] = ys[:, None]
    grid[..., 1] = xs[None, :]
    grid[..., 2] = hs[:, None]
    grid[..., 3] = ws[None, :]
    return grid.reshape(-1, 4)

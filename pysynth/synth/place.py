"""Placing candidate nuclei in order, refusing those that overlap earlier ones too much (C++ kernel + twin)."""

from __future__ import annotations

import numpy as np

from pysynth import _core


def _check(xy: np.ndarray, offsets: np.ndarray, shape_hw: tuple[int, int], max_overlap: float):
    xy = np.ascontiguousarray(xy, dtype=np.float64)
    offsets = np.ascontiguousarray(offsets, dtype=np.int64)
    if xy.ndim != 2 or xy.shape[1] != 2:
        raise ValueError(f"xy must have shape (V, 2), got {xy.shape}")
    if offsets.ndim != 1 or len(offsets) < 1 or offsets[0] != 0 or offsets[-1] != len(xy):
        raise ValueError(f"offsets must run from 0 to len(xy) = {len(xy)}, got {offsets[:3]}...{offsets[-1:]}")
    if np.any(np.diff(offsets) < 0):
        raise ValueError("offsets must not decrease")
    if not np.isfinite(xy).all():
        raise ValueError("xy must be finite")
    h, w = (int(v) for v in shape_hw)
    if h <= 0 or w <= 0:
        raise ValueError(f"shape_hw must be positive, got {shape_hw}")
    if not 0.0 <= max_overlap <= 1.0:
        raise ValueError(f"max_overlap must be in [0, 1], got {max_overlap}")
    return xy, offsets, h, w


def place_polygons(
    xy: np.ndarray,
    offsets: np.ndarray,
    shape_hw: tuple[int, int],
    *,
    max_overlap: float = 0.15,
    min_area: int = 8,
    max_accept: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Accept candidate polygons in order into an instance label map.

    A pixel belongs to a polygon when its centre ``(j + 0.5, i + 0.5)`` is inside (even-odd rule). A candidate is
    refused when it covers fewer than ``min_area`` pixels or when more than ``max_overlap`` of its pixels are
    already taken; an accepted one gets the next label on its pixels that are still free (earlier nuclei stay
    whole, so every label is final when written).

    Args:
        xy: Vertices of all candidates, ``(V, 2)`` as ``(x, y)`` px.
        offsets: ``(K + 1,)``: candidate k has vertices ``xy[offsets[k]:offsets[k + 1]]``.
        shape_hw: Label map ``(height, width)``.
        max_overlap: Largest taken fraction of a candidate's pixels.
        min_area: Fewest pixels of an accepted candidate.
        max_accept: Stop after this many (default: no limit).

    Returns:
        ``(labels, centres)``: int32 ``(h, w)`` numbered 1..n, and float32 ``(n, 2)`` pixel centroids ``(x, y)``
        of each label's pixels (NaN for a label left without pixels, possible only with ``max_overlap = 1``).

    Raises:
        ValueError: For malformed polygons or out-of-range arguments.
    """
    xy, offsets, h, w = _check(xy, offsets, shape_hw, max_overlap)
    k = len(offsets) - 1
    limit = k if max_accept is None else max(0, int(max_accept))
    labels = np.zeros((h, w), np.int32)
    stats = np.zeros((max(1, min(k, limit)), 3), np.float64)
    n = _core.place_polygons(xy, offsets, float(max_overlap), int(min_area), limit, labels, stats)
    counts = stats[:n, 0:1]
    with np.errstate(invalid="ignore", divide="ignore"):  # a label left with no pixel has no centre (NaN)
        centres = (stats[:n, 1:3] / counts).astype(np.float32)
    return labels, centres


def place_polygons_reference(
    xy: np.ndarray,
    offsets: np.ndarray,
    shape_hw: tuple[int, int],
    *,
    max_overlap: float = 0.15,
    min_area: int = 8,
    max_accept: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The specification of :func:`place_polygons`: one whole-image point-in-polygon test per candidate."""
    xy, offsets, h, w = _check(xy, offsets, shape_hw, max_overlap)
    labels = np.zeros((h, w), np.int32)
    centres = []
    limit = len(offsets) - 1 if max_accept is None else int(max_accept)
    for k in range(len(offsets) - 1):
        if len(centres) >= limit:
            break
        poly = xy[offsets[k] : offsets[k + 1]]
        if len(poly) < 3:
            continue
        inside = _inside(poly, (h, w))
        area = int(inside.sum())
        if area < min_area or np.count_nonzero(labels[inside]) > max_overlap * area:
            continue
        new = inside & (labels == 0)
        labels[new] = len(centres) + 1
        ii, jj = np.nonzero(new)
        centres.append((jj.mean() + 0.5, ii.mean() + 0.5) if len(ii) else (np.nan, np.nan))
    return labels, np.array(centres, np.float32).reshape(-1, 2)


def _inside(poly: np.ndarray, shape_hw: tuple[int, int]) -> np.ndarray:
    """Pixels whose centres are inside a polygon (even-odd crossing test, half-open in y)."""
    h, w = shape_hw
    ys = np.arange(h)[:, None] + 0.5
    xs = np.arange(w)[None, :] + 0.5
    inside = np.zeros((h, w), bool)
    for (x0, y0), (x1, y1) in zip(poly, np.roll(poly, -1, axis=0), strict=True):
        if y0 == y1:
            continue
        crosses = ((y0 <= ys) & (ys < y1)) | ((y1 <= ys) & (ys < y0))
        x_at = x0 + (ys - y0) * (x1 - x0) / (y1 - y0)
        inside ^= crosses & (xs >= x_at)
    return inside

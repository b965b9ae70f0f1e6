"""Polygon rasterisation: nucleus polygons to an instance label map and an anti-aliased coverage map.

Convention: ``xy`` holds ``(x, y)`` in pixel units with pixel ``(i, j)`` spanning ``[j, j + 1) x [i, i + 1)``,
so its centre is ``(j + 0.5, i + 0.5)``. A pixel belongs to a polygon when its centre lies inside it (even-odd
rule; a centre exactly on an edge counts for left/top edges only, so polygons sharing an edge never share a
pixel). This is :func:`skimage.draw.polygon` with vertices moved by half a pixel, and :func:`cv2.fillPoly`'s
interior (with ``shift`` sub-pixel vertices and the same half-pixel move); OpenCV additionally paints the
pixels its outline touches (see :func:`rasterize_polygons_cv2`), which biases areas up by about half the
perimeter. Centre sampling keeps the rasterised area equal to the polygon's area on average and consistent
with the coverage map.
"""

from __future__ import annotations

import itertools

import cv2
import numpy as np

from pysynth import _core

__all__ = ["rasterize_polygons", "rasterize_polygons_cv2", "rasterize_polygons_reference"]

#: Sample points per pixel side of the coverage map (4 x 4 = 16 samples, so coverage is a multiple of 1/16).
COVERAGE_SUPERSAMPLING = 4


def _check_polygons(xy, offsets, shape_hw, ids) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[int, int]]:
    """Validate and convert the polygon arguments shared by the kernel and its reference."""
    h, w = (int(v) for v in shape_hw)
    if h <= 0 or w <= 0:
        raise ValueError(f"shape_hw must be two positive sizes, got {tuple(shape_hw)}")
    xy = np.ascontiguousarray(xy, dtype=np.float32)
    if xy.ndim != 2 or xy.shape[1] != 2:
        raise ValueError(f"xy must have shape (V, 2), got {xy.shape}")
    if not np.isfinite(xy).all():
        raise ValueError("xy must be finite, got NaN or infinite vertex coordinates")
    offsets = np.ascontiguousarray(offsets, dtype=np.int64)
    if offsets.ndim != 1 or offsets.size < 1:
        raise ValueError(f"offsets must have shape (n + 1,), got {offsets.shape}")
    if offsets[0] != 0 or offsets[-1] != len(xy) or (np.diff(offsets) < 0).any():
        raise ValueError(
            f"offsets must start at 0, never decrease and end at len(xy) = {len(xy)}, "
            f"got {offsets[:3].tolist()}...{offsets[-3:].tolist()}"
        )
    n = offsets.size - 1
    if ids is None:
        ids = np.arange(1, n + 1, dtype=np.int32)
    else:
        ids = np.asarray(ids)
        if ids.shape != (n,):
            raise ValueError(f"ids must have shape ({n},), one per polygon, got {ids.shape}")
        if not np.issubdtype(ids.dtype, np.integer) or (ids.size and (ids.min() < -(2**31) or ids.max() >= 2**31)):
            raise ValueError(f"ids must be integers that fit int32, got dtype {ids.dtype}")
        ids = np.ascontiguousarray(ids, dtype=np.int32)
    return xy, offsets, ids, (h, w)


def _check_out(arr: np.ndarray, name: str, shape: tuple[int, ...], dtype: type) -> np.ndarray:
    """Check a caller's output buffer: written in place, so it cannot be converted."""
    if not isinstance(arr, np.ndarray) or arr.dtype != dtype or arr.shape != shape:
        got = (arr.dtype, arr.shape) if isinstance(arr, np.ndarray) else type(arr).__name__
        raise ValueError(f"{name} must be a {np.dtype(dtype).name} array of shape {shape}, got {got}")
    if not arr.flags.c_contiguous or not arr.flags.writeable:
        raise ValueError(f"{name} must be C-contiguous and writeable to be drawn into in place")
    return arr


def rasterize_polygons(
    xy: np.ndarray,
    offsets: np.ndarray,
    shape_hw: tuple[int, int],
    ids: np.ndarray | None = None,
    *,
    labels: np.ndarray | None = None,
    coverage: bool | np.ndarray | None = None,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Paint polygons into an instance label map, optionally with the anti-aliased coverage of their union.

    Polygon ``k`` has vertices ``xy[offsets[k]:offsets[k + 1]]`` (pixel-centre convention in the module
    docstring) and is painted with ``ids[k]``; later polygons overwrite earlier ones. Polygons may reach
    outside the image (they are clipped); polygons with fewer than 3 vertices paint nothing.

    Coverage is the fraction of a 4 x 4 grid of sample points per pixel, at ``(j + (t + 0.5) / 4,
    i + (s + 0.5) / 4)`` for ``s, t`` in ``0..3``, inside any polygon: a multiple of 1/16, exact for the union
    (overlaps are not counted twice).

    Args:
        xy: Vertices ``(x, y)`` in pixels, all polygons one after another.
        offsets: Where each polygon starts in ``xy``, then ``len(xy)``.
        shape_hw: ``(height, width)`` of the maps.
        ids: Label of each polygon (int32 range); default ``1..n``.
        labels: Map to paint into, in place (int32, C-contiguous, ``shape_hw``); its other pixels are kept.
            Default: a new map of zeros.
        coverage: ``True`` to return a new coverage map, or a float32 C-contiguous ``shape_hw`` array to
            overwrite with it; ``None``/``False`` for labels only.

    Returns:
        ``labels``, or ``(labels, coverage)`` when coverage is asked for.

    Raises:
        ValueError: On a malformed argument: wrong shape, non-finite vertices, offsets that do not index
            ``xy``, ids outside int32, an output buffer of the wrong dtype, shape or layout.

    Shape:
        - xy: ``(V, 2)`` float (converted to float32).
        - offsets: ``(n + 1,)`` integer.
        - ids: ``(n,)`` integer.
        - labels: ``(H, W)`` int32.
        - coverage: ``(H, W)`` float32 in ``[0, 1]``.
    """
    xy, offsets, ids, shape = _check_polygons(xy, offsets, shape_hw, ids)
    labels = np.zeros(shape, np.int32) if labels is None else _check_out(labels, "labels", shape, np.int32)
    _core.rasterize_labels(xy, offsets, ids, labels)
    if coverage is None or coverage is False:
        return labels
    coverage = np.empty(shape, np.float32) if coverage is True else _check_out(coverage, "coverage", shape, np.float32)
    _core.rasterize_coverage(xy, offsets, coverage)
    return labels, coverage


def rasterize_polygons_reference(
    xy: np.ndarray,
    offsets: np.ndarray,
    shape_hw: tuple[int, int],
    ids: np.ndarray | None = None,
    *,
    coverage: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """The specification of :func:`rasterize_polygons`: one :func:`skimage.draw.polygon` call per polygon.

    scikit-image tests pixel centres at integer coordinates, so vertices are moved by half a pixel; coverage
    draws the union on a 4x finer grid and averages 4 x 4 blocks. The two agree except for a pixel centre
    lying exactly on an edge. Slow; for tests (needs scikit-image).

    Args:
        xy: As for :func:`rasterize_polygons`.
        offsets: As for :func:`rasterize_polygons`.
        shape_hw: As for :func:`rasterize_polygons`.
        ids: As for :func:`rasterize_polygons`.
        coverage: Also return the coverage map.

    Returns:
        ``labels``, or ``(labels, coverage)``.

    Raises:
        ValueError: As :func:`rasterize_polygons`.

    Shape:
        As for :func:`rasterize_polygons`.
    """
    from skimage.draw import polygon

    xy, offsets, ids, (h, w) = _check_polygons(xy, offsets, shape_hw, ids)
    polys = [xy[a:b].astype(np.float64) for a, b in itertools.pairwise(offsets)]
    polys = [p if len(p) >= 3 else None for p in polys]
    labels = np.zeros((h, w), np.int32)
    for poly, label in zip(polys, ids, strict=True):
        if poly is not None:
            rr, cc = polygon(poly[:, 1] - 0.5, poly[:, 0] - 0.5, (h, w))
            labels[rr, cc] = label
    if not coverage:
        return labels
    s = COVERAGE_SUPERSAMPLING
    fine = np.zeros((h * s, w * s), bool)
    for poly in polys:
        if poly is not None:
            rr, cc = polygon(poly[:, 1] * s - 0.5, poly[:, 0] * s - 0.5, (h * s, w * s))
            fine[rr, cc] = True
    return labels, fine.reshape(h, s, w, s).mean(axis=(1, 3)).astype(np.float32)


def rasterize_polygons_cv2(
    xy: np.ndarray, offsets: np.ndarray, shape_hw: tuple[int, int], ids: np.ndarray | None = None
) -> np.ndarray:
    """Labels the library way: :func:`cv2.fillPoly` per polygon with 8 bits of sub-pixel precision.

    OpenCV also paints every pixel that the polygon's 8-connected outline (drawn with ``cv2.line``) touches,
    so its polygons are about half a pixel larger all round than :func:`rasterize_polygons`'s and overlapping
    polygons' outlines cover each other; interior pixels agree. For comparison in tests and benchmarks.

    Args:
        xy: As for :func:`rasterize_polygons` (coordinates within ±2^22 px).
        offsets: As for :func:`rasterize_polygons`.
        shape_hw: As for :func:`rasterize_polygons`.
        ids: As for :func:`rasterize_polygons`.

    Returns:
        The label map.

    Raises:
        ValueError: As :func:`rasterize_polygons`.

    Shape:
        As for :func:`rasterize_polygons`.
    """
    xy, offsets, ids, shape = _check_polygons(xy, offsets, shape_hw, ids)
    shift = 8
    labels = np.zeros(shape, np.int32)
    for a, b, label in zip(offsets[:-1], offsets[1:], ids, strict=True):
        if b - a >= 3:
            pts = np.round((xy[a:b].astype(np.float64) - 0.5) * (1 << shift)).astype(np.int32)
            cv2.fillPoly(labels, [pts], int(label), lineType=cv2.LINE_8, shift=shift)
    return labels

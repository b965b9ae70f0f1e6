"""Shape measurements of instances: perimeter on a sub-pixel outline, circularity, solidity, fitted ellipse.

The pixel-edge outline of an instance (:func:`pysynth.instances.trace_contours`) is exact for its area and is kept
as the geometry of the outputs, but its length is that of a staircase: for a disc about 4/π ≈ 1.27 times the
circle's whatever the radius, which inflates every feature built on the perimeter. The perimeter here is measured
on a sub-pixel estimate of the outline (:func:`shape_features`), the other features on the pixel set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

#: Vossepoel & Smeulders' corner-count estimator of a line's length from its 8-connected chain code: weights of
#: an even (axis) step, an odd (diagonal) step and a corner (change of direction), in px.
CHAIN_WEIGHTS = (0.980, 1.406, -0.091)

#: QuPath measurement names of the :class:`ShapeFeatures` fields, in the order the outputs list them.
MEASUREMENT_NAMES = {
    "area_um2": "Area µm^2",
    "perimeter_um": "Perimeter µm",
    "circularity": "Circularity",
    "solidity": "Solidity",
    "eccentricity": "Eccentricity",
    "major_axis_um": "Major axis µm",
    "minor_axis_um": "Minor axis µm",
    "orientation_deg": "Orientation °",
}


@dataclass(frozen=True)
class ShapeFeatures:
    """Per-label shape features: every array is indexed by label (entry 0, and labels not measured, hold 0).

    Attributes:
        area_px: Pixel count.
        area_um2: Pixel count times ``mpp²``.
        perimeter_um: Length of the sub-pixel outline (µm; see :func:`shape_features`).
        circularity: ``4π·area / perimeter²`` (area the pixel count), clipped to at most 1; 1 for a disc.
        solidity: Pixel count over the area of the convex hull of the instance's pixel squares (in (0, 1]).
        eccentricity: Of the ellipse with the pixel set's second central moments: 0 for a disc, towards 1 for
            a line.
        major_axis_um: Full major axis length of that ellipse, ``4·sqrt(λ1)`` with ``λ1`` the larger eigenvalue
            of the pixel coordinates' covariance (scikit-image's ``major_axis_length``), in µm.
        minor_axis_um: Full minor axis length, ``4·sqrt(λ2)``, in µm.
        orientation_deg: Direction of the major axis in degrees in [-90, 90): the angle from the image's x axis
            (pointing right) to the major axis, positive anticlockwise *as seen on screen*, where the image's y
            axis points down (so +45 is an axis rising to the right on screen, going up-right from the centre);
            0 when the two axes are equal.
    """

    area_px: np.ndarray
    area_um2: np.ndarray
    perimeter_um: np.ndarray
    circularity: np.ndarray
    solidity: np.ndarray
    eccentricity: np.ndarray
    major_axis_um: np.ndarray
    minor_axis_um: np.ndarray
    orientation_deg: np.ndarray

    def measurements(self) -> dict[str, np.ndarray]:
        """The features as QuPath measurements: name (:data:`MEASUREMENT_NAMES`) to per-label array."""
        return {name: getattr(self, key) for key, name in MEASUREMENT_NAMES.items()}


def _boxes(ids: np.ndarray, rows: np.ndarray, cols: np.ndarray, n: int) -> np.ndarray:
    """``(n + 1, 4)`` int64 bounding boxes ``y0, x0, y1, x1`` (inclusive) of the labels' pixels."""
    box = np.empty((4, n + 1), np.int64)
    box[:2] = np.iinfo(np.int64).max
    box[2:] = -1
    np.minimum.at(box[0], ids, rows)
    np.minimum.at(box[1], ids, cols)
    np.maximum.at(box[2], ids, rows)
    np.maximum.at(box[3], ids, cols)
    return box.T


def _stack(polygons: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """OpenCV point arrays ``(m_i, 1, 2)`` as one int64 ``(Σm_i, 2)`` array and the offsets ``(len + 1,)``."""
    sizes = np.fromiter((len(p) for p in polygons), np.int64, len(polygons))
    starts = np.concatenate([[0], np.cumsum(sizes)])
    return np.concatenate(polygons)[:, 0, :].astype(np.int64), starts


def _following(starts: np.ndarray) -> np.ndarray:
    """Index of the next point of every point of closed polygons stacked at ``starts`` (the last goes to the first)."""
    following = np.arange(1, starts[-1] + 1)
    following[starts[1:] - 1] = starts[:-1]
    return following


def _chain_lengths(points: np.ndarray, owner: np.ndarray, starts: np.ndarray, n: int) -> np.ndarray:
    """Per label, the summed corner-count length (px) of its closed 8-connected pixel-centre contours.

    Args:
        points: ``(m, 2)`` points of all contours, one contour after another.
        owner: ``(c,)`` label of each of the ``c`` contours.
        starts: ``(c + 1,)`` offsets of the contours in ``points``.
        n: Largest label.

    Returns:
        ``(n + 1,)`` lengths without the half-pixel offset.
    """
    following = _following(starts)
    previous = np.empty_like(following)
    previous[following] = np.arange(len(following))
    step = points[following] - points
    moved = (step != 0).any(axis=1)
    odd = (step != 0).all(axis=1)
    code = (step[:, 0] + 1) * 3 + (step[:, 1] + 1)  # the direction, one of 9 values (4: a one-point contour)
    corner = moved & (code != code[previous])
    even_w, odd_w, corner_w = CHAIN_WEIGHTS
    length = np.where(odd, odd_w, np.where(moved, even_w, 0.0)) + corner_w * corner
    contour = np.repeat(np.arange(len(owner)), np.diff(starts))
    return np.bincount(owner[contour], weights=length, minlength=n + 1)


def shape_features(labels: np.ndarray, mpp: float, only: np.ndarray | list[int] | None = None) -> ShapeFeatures:
    """Perimeter, circularity, solidity and the moments' ellipse of every instance of a label image.

    **Perimeter.** Each instance (its own bounding-box crop, so touching neighbours and the image's border do not
    matter: outside the crop counts as background) is outlined by OpenCV's 8-connected contour through its
    boundary pixels' centres (``cv2.findContours``, outer boundaries only: the boundaries of holes are not part
    of the perimeter, as they are not part of the GeoJSON outline). That contour's length is estimated from its
    chain code with Vossepoel & Smeulders' corner-count estimator, ``L = 0.980·n_even + 1.406·n_odd −
    0.091·n_corners`` (A. M. Vossepoel and A. W. M. Smeulders, "Vector code probability and metrication error in
    the representation of straight lines of finite length", Computer Graphics and Image Processing 20, 1982),
    which is nearly unbiased for straight lines of any direction, unlike the plain ``n_even + √2·n_odd`` (about
    +5.5% on average over directions) or the pixel-edge staircase (+27% on a disc). The pixel centres lie half a
    pixel inside the instance's outline; offsetting a simple closed curve outward by ``d`` lengthens it by
    ``2πd`` whatever its shape, so each contour gets ``π`` px added. Measured on digital discs of radius 4-30 px at
    random sub-pixel centres the result is within 1% of ``2πr`` on average (spread ≈ 1%); on ellipses it varies
    by about 2% with the ellipse's rotation; axis-aligned rectangles come out 3-5% short (their corners are read
    as rounded, the price of being right on discs). Several parts of one label add their lengths. A one-pixel
    instance gets ``π`` px.

    **Circularity** is ``4π·A / P²`` with ``A`` the pixel count, clipped to at most 1.

    **Solidity** is ``A`` over the area of the convex hull of the instance's pixel squares: the hull ``H`` of the
    contour's pixel centres (``cv2.convexHull``) grown by the unit pixel square (Minkowski sum), whose area is
    exactly ``area(H) + ½·Σ(|Δx| + |Δy|) over H's edges + 1``.

    **Ellipse.** From the second central moments of the pixel centres (``μxx``, ``μyy``, ``μxy``, divided by the
    pixel count; no ``1/12`` pixel-extent term, as scikit-image's ``regionprops``): eigenvalues ``λ1 ≥ λ2`` of the
    covariance give the axes ``4·sqrt(λ)`` and the eccentricity ``sqrt(1 − λ2/λ1)``; the orientation is
    ``½·atan2(−2μxy, μxx − μyy)`` in degrees (anticlockwise on screen from the x axis, y pointing down; see
    :class:`ShapeFeatures`).

    Args:
        labels: ``(h, w)`` non-negative integer instance labels, 0 background.
        mpp: µm per pixel of the labels' grid.
        only: Labels to measure (others get zeros); all present labels when None.

    Returns:
        :class:`ShapeFeatures`, each array of length ``labels.max() + 1``.

    Raises:
        ValueError: If ``labels`` is not 2-D or has negative values, or ``mpp`` is not positive.
    """
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be 2-D, got {labels.shape}")
    if not mpp > 0:
        raise ValueError(f"mpp must be positive, got {mpp}")
    if labels.size and labels.min() < 0:
        raise ValueError("labels must be non-negative")
    n = int(labels.max()) if labels.size else 0
    where = np.flatnonzero(labels)
    ids = labels.ravel()[where].astype(np.intp)
    rows, cols = np.divmod(where, labels.shape[1])
    count = np.bincount(ids, minlength=n + 1).astype(np.float64)
    pick = count > 0
    pick[0] = False
    if only is not None:
        chosen = np.zeros(n + 1, bool)
        chosen[np.asarray(only, dtype=np.intp)] = True
        pick &= chosen

    # Second central moments of the pixel centres (about each label's box corner, for precision).
    box = _boxes(ids, rows, cols, n)
    y = (rows - box[ids, 0]).astype(np.float64)
    x = (cols - box[ids, 1]).astype(np.float64)
    safe = np.maximum(count, 1)
    mx = np.bincount(ids, weights=x, minlength=n + 1) / safe
    my = np.bincount(ids, weights=y, minlength=n + 1) / safe
    mxx = np.bincount(ids, weights=x * x, minlength=n + 1) / safe - mx * mx
    myy = np.bincount(ids, weights=y * y, minlength=n + 1) / safe - my * my
    mxy = np.bincount(ids, weights=x * y, minlength=n + 1) / safe - mx * my
    half_sum = (mxx + myy) / 2
    root = np.hypot((mxx - myy) / 2, mxy)
    l1 = np.maximum(half_sum + root, 0.0)
    l2 = np.clip(half_sum - root, 0.0, l1)
    with np.errstate(divide="ignore", invalid="ignore"):
        eccentricity = np.where(l1 > 0, np.sqrt(np.clip(1 - l2 / l1, 0.0, 1.0)), 0.0)
    orientation = np.degrees(0.5 * np.arctan2(-2 * mxy, mxx - myy))
    orientation = np.where(root > 1e-9 * half_sum, orientation, 0.0)  # equal axes (up to rounding): no direction
    orientation = np.where(orientation >= 90, orientation - 180, orientation)

    # Contours and hulls, instance by instance on its bounding box.
    chunks: list[np.ndarray] = []
    owner: list[int] = []
    hulls: list[np.ndarray] = []
    measured = np.flatnonzero(pick)
    for k in measured:
        y0, x0, y1, x1 = box[k]
        crop = (labels[y0 : y1 + 1, x0 : x1 + 1] == k).view(np.uint8)
        found, _ = cv2.findContours(crop, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        chunks.extend(found)
        owner.extend([k] * len(found))
        hulls.append(cv2.convexHull(found[0] if len(found) == 1 else np.concatenate(found)))
    perimeter = np.zeros(n + 1)
    hull_area = np.zeros(n + 1)
    if chunks:
        owners = np.asarray(owner, np.intp)
        points, starts = _stack(chunks)
        perimeter = _chain_lengths(points, owners, starts, n) + math.pi * np.bincount(owners, minlength=n + 1)
        corners, starts = _stack(hulls)
        step = corners[_following(starts)] - corners
        which = np.repeat(measured, np.diff(starts))
        twice_area = corners[:, 0] * step[:, 1] - corners[:, 1] * step[:, 0]  # shoelace terms
        grown = np.bincount(which, weights=np.abs(step).sum(axis=1), minlength=n + 1)  # Σ(|Δx| + |Δy|)
        hull_area = np.abs(np.bincount(which, weights=twice_area, minlength=n + 1)) / 2 + grown / 2 + pick

    def kept(a: np.ndarray) -> np.ndarray:
        return np.where(pick, a, 0.0)

    with np.errstate(divide="ignore", invalid="ignore"):
        circularity = np.where(perimeter > 0, np.minimum(4 * math.pi * count / perimeter**2, 1.0), 0.0)
        solidity = np.where(hull_area > 0, np.minimum(count / hull_area, 1.0), 0.0)
    return ShapeFeatures(
        area_px=kept(count).astype(np.int64),
        area_um2=kept(count * mpp * mpp),
        perimeter_um=kept(perimeter * mpp),
        circularity=kept(circularity),
        solidity=kept(solidity),
        eccentricity=kept(eccentricity),
        major_axis_um=kept(4 * np.sqrt(l1) * mpp),
        minor_axis_um=kept(4 * np.sqrt(l2) * mpp),
        orientation_deg=kept(orientation),
    )

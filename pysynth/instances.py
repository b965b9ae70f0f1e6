"""Nucleus instances from the segmenter's two output maps: seeds, foreground, watershed, clean-up (docs/method.md §5).

Seeds are connected components of the smoothed detection map above a threshold; the foreground is the smoothed
segmentation map above another; a foreground component without a seed gets one at its maximum; a
marker-controlled watershed on the inverted segmentation map splits the foreground between seeds (C++,
:func:`watershed`); holes are filled and instances below a minimum size dropped. Each instance's confidence is the
mean segmentation probability over its pixels (:func:`instance_confidence`); instances below
``InstanceConfig.min_confidence`` are dropped last.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, replace

import cv2
import numpy as np

from pysynth import _core


def _check_maps(elevation: np.ndarray, markers: np.ndarray, mask: np.ndarray | None, connectivity: int):
    elevation = np.ascontiguousarray(elevation, dtype=np.float32)
    if elevation.ndim != 2:
        raise ValueError(f"elevation must be 2-D, got {elevation.shape}")
    markers = np.asarray(markers)
    if markers.shape != elevation.shape:
        raise ValueError(f"markers must have shape {elevation.shape}, got {markers.shape}")
    if markers.size and markers.min() < 0:
        raise ValueError("markers must be non-negative")
    mask = np.ones(elevation.shape, np.uint8) if mask is None else np.ascontiguousarray(mask, dtype=np.uint8)
    if mask.shape != elevation.shape:
        raise ValueError(f"mask must have shape {elevation.shape}, got {mask.shape}")
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity}")
    if not np.isfinite(elevation).all():
        raise ValueError("elevation must be finite")
    if elevation.size >= 2**31:
        raise ValueError(f"at most 2^31 - 1 pixels per call, got {elevation.size}: tile the image")
    return elevation, markers, mask


def watershed(
    elevation: np.ndarray, markers: np.ndarray, mask: np.ndarray | None = None, *, connectivity: int = 4
) -> np.ndarray:
    """Marker-controlled watershed: flood from the markers in order of increasing elevation.

    Ties are broken by the order in which pixels were reached (first come, first served; markers in raster order,
    neighbours up, left, right, down, then diagonals); a pixel takes the label of the neighbour that reached it
    first. Without ties this equals ``skimage.segmentation.watershed``; on plateaus its heap may order ties
    otherwise. Nothing outside the mask is labelled (markers there are dropped, as
    scikit-image does).

    Args:
        elevation: ``(h, w)`` map to flood (low first).
        markers: ``(h, w)`` non-negative integer labels; 0 is unlabelled.
        mask: ``(h, w)`` where flooding may go (default everywhere).
        connectivity: 4 or 8 neighbours.

    Returns:
        int32 labels ``(h, w)``.

    Raises:
        ValueError: For mismatched shapes, negative markers, non-finite elevation or a bad connectivity.
    """
    elevation, markers, mask = _check_maps(elevation, markers, mask, connectivity)
    labels = np.ascontiguousarray(markers, dtype=np.int32) * (mask > 0)
    _core.watershed(elevation, mask, labels, connectivity)
    return labels


def watershed_reference(
    elevation: np.ndarray, markers: np.ndarray, mask: np.ndarray | None = None, *, connectivity: int = 4
) -> np.ndarray:
    """The specification of :func:`watershed`: the same priority flood with Python's ``heapq``."""
    elevation, markers, mask = _check_maps(elevation, markers, mask, connectivity)
    h, w = elevation.shape
    labels = markers.astype(np.int32) * (mask > 0)
    steps = [(-1, 0), (0, -1), (0, 1), (1, 0), (-1, -1), (-1, 1), (1, -1), (1, 1)][:connectivity]
    heap = []
    age = 0
    for i, j in zip(*np.nonzero(labels > 0), strict=True):
        heap.append((float(elevation[i, j]), age, int(i), int(j)))
        age += 1
    heapq.heapify(heap)
    while heap:
        _, _, i, j = heapq.heappop(heap)
        for di, dj in steps:
            ni, nj = i + di, j + dj
            if 0 <= ni < h and 0 <= nj < w and labels[ni, nj] == 0 and mask[ni, nj]:
                labels[ni, nj] = labels[i, j]
                heapq.heappush(heap, (float(elevation[ni, nj]), age, ni, nj))
                age += 1
    return labels


@dataclass(frozen=True)
class InstanceConfig:
    """Post-processing of the two output maps (probabilities in [0, 1]; sizes in px at the model's µm/px).

    Attributes:
        detection_sigma: Gaussian smoothing of the detection map before thresholding (px).
        segmentation_sigma: Gaussian smoothing of the segmentation map (px).
        detection_threshold: Seeds: smoothed detection above this (released code: 0.07).
        foreground_threshold: Foreground: smoothed segmentation above this (released code: 0.33).
        min_size: Instances smaller than this are dropped (released code: 20 px at 40x).
        connectivity: Watershed neighbourhood, 4 or 8.
        min_confidence: Instances whose mean segmentation probability (:func:`instance_confidence`, on the
            unsmoothed map) is below this are dropped; 0 keeps all. Chosen with the thresholds on held-out
            synthetic patches when a model is trained; model files without it load with 0.
    """

    detection_sigma: float = 1.0
    segmentation_sigma: float = 1.0
    detection_threshold: float = 0.07
    foreground_threshold: float = 0.33
    min_size: int = 20
    connectivity: int = 4
    min_confidence: float = 0.0

    def __post_init__(self) -> None:
        for name in ("detection_threshold", "foreground_threshold", "min_confidence"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"InstanceConfig.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.detection_sigma < 0 or self.segmentation_sigma < 0 or self.min_size < 0:
            raise ValueError("InstanceConfig sigmas and min_size must be non-negative")
        if self.connectivity not in (4, 8):
            raise ValueError(f"InstanceConfig.connectivity must be 4 or 8, got {self.connectivity}")


def _smooth(a: np.ndarray, sigma: float) -> np.ndarray:
    a = np.ascontiguousarray(a, dtype=np.float32)
    return cv2.GaussianBlur(a, (0, 0), sigma) if sigma > 0 else a


def instance_confidence(
    labels: np.ndarray, detection: np.ndarray, segmentation: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Per-instance confidence from the network's maps: mean segmentation and peak detection probability.

    Args:
        labels: ``(h, w)`` non-negative instance labels.
        detection: ``(h, w)`` nucleus-centre probabilities.
        segmentation: ``(h, w)`` nuclear-pixel probabilities.

    Returns:
        ``(mean_segmentation, detection_peak)``, float64 arrays indexed by label (length ``labels.max() + 1``;
        entry 0 and absent labels are 0).

    Raises:
        ValueError: If the shapes differ or are not 2-D.
    """
    if not (labels.shape == detection.shape == segmentation.shape) or labels.ndim != 2:
        raise ValueError(
            f"labels and maps must be 2-D of one shape, got {labels.shape}, {detection.shape}, {segmentation.shape}"
        )
    if _fast_labels(labels) and detection.dtype == np.float32:
        n = int(labels.max()) if labels.size else 0
        _, _, peak = _core.label_reduce(labels, np.ascontiguousarray(detection), n)
    else:
        flat = labels.ravel()
        n = int(flat.max()) + 1 if flat.size else 1
        where = np.flatnonzero(flat)
        peak = np.zeros(n, np.float64)
        np.maximum.at(peak, flat[where], detection.ravel()[where])
    return instance_means(labels, segmentation), peak


def _fast_labels(labels: np.ndarray) -> bool:
    """Whether the compiled core's label reductions take these labels as they are (C-contiguous int32)."""
    return labels.dtype == np.int32 and labels.flags.c_contiguous and labels.size > 0


def instance_means(labels: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Mean of ``values`` over each instance's pixels, float64 indexed by label (entry 0 and absent labels 0).

    Raises:
        ValueError: If the shapes differ or are not 2-D.
    """
    if labels.shape != values.shape or labels.ndim != 2:
        raise ValueError(f"labels and values must be 2-D of one shape, got {labels.shape}, {values.shape}")
    if _fast_labels(labels) and values.dtype == np.float32:
        # One pass of the compiled core: the same sums (float64, raster order) as the NumPy lines below.
        count, total, _ = _core.label_reduce(labels, np.ascontiguousarray(values), int(labels.max()))
        return total / np.maximum(count, 1)
    flat = labels.ravel()
    n = int(flat.max()) + 1 if flat.size else 1
    where = np.flatnonzero(flat)
    ids = flat[where]
    count = np.bincount(ids, minlength=n)
    return np.bincount(ids, weights=values.ravel()[where], minlength=n) / np.maximum(count, 1)


def label_moments(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per label ``0..labels.max()``: pixel count, sums of its pixels' rows and columns, first raster index.

    Entry 0 (background) and absent labels hold count 0, sums 0 and first ``labels.size``. One pass of the
    compiled core over C-contiguous int32 labels (:func:`label_moments_reference` is the NumPy equivalent).
    """
    labels = np.ascontiguousarray(labels, dtype=np.int32)
    if labels.ndim != 2:
        raise ValueError(f"labels must be 2-D, got shape {labels.shape}")
    if labels.size and labels.min() < 0:
        raise ValueError("labels must be non-negative")
    return _core.label_moments(labels, int(labels.max()) if labels.size else 0)


def label_moments_reference(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """:func:`label_moments` in NumPy (bincount over the labelled pixels)."""
    n = int(labels.max()) + 1 if labels.size else 1
    flat = labels.ravel()
    where = np.flatnonzero(flat)
    ids = flat[where]
    rows, cols = np.divmod(where, labels.shape[1])
    count = np.bincount(ids, minlength=n)
    first = np.full(n, labels.size, np.int64)
    present, at = np.unique(ids, return_index=True)
    first[present] = where[at]
    count[0], first[0] = 0, labels.size
    sum_y = np.bincount(ids, weights=rows, minlength=n)
    sum_x = np.bincount(ids, weights=cols, minlength=n)
    sum_y[0] = sum_x[0] = 0.0
    return count, sum_y, sum_x, first


def keep_instances(labels: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """The labels with ``keep[k]`` False dropped and the others renumbered 1..m in their order (int32).

    ``keep`` is indexed by label (``len(keep) > labels.max()``; ``keep[0]`` is ignored). Labels in raster order of
    their first pixel stay so.
    """
    keep = np.asarray(keep, bool).copy()
    keep[0] = False
    new = np.where(keep, np.cumsum(keep), 0).astype(np.int32)
    return new[labels]


@dataclass(frozen=True)
class Instances:
    """Instance labels with each instance's confidence (arrays indexed by label, entry 0 for the background).

    ``lymphocyte`` is the class output's mean lymphocyte probability over each instance (None for a network
    without a class output).
    """

    labels: np.ndarray
    confidence: np.ndarray
    detection_peak: np.ndarray
    lymphocyte: np.ndarray | None = None

    @property
    def count(self) -> int:
        """Number of instances (``labels.max()``)."""
        return int(self.labels.max()) if self.labels.size else 0

    def keep(self, keep: np.ndarray) -> Instances:
        """Only the instances with ``keep[k]`` True, renumbered 1..m in their order."""
        keep = np.asarray(keep, bool).copy()
        keep[0] = True
        return Instances(
            keep_instances(self.labels, keep),
            self.confidence[keep],
            self.detection_peak[keep],
            None if self.lymphocyte is None else self.lymphocyte[keep],
        )

    def with_classes(self, lymphocyte_map: np.ndarray) -> Instances:
        """These instances with each one's mean lymphocyte probability from the class output's map."""
        return replace(self, lymphocyte=instance_means(self.labels, lymphocyte_map))

    def above(self, min_confidence: float) -> Instances:
        """Only the instances whose confidence is at least ``min_confidence``."""
        if min_confidence <= 0:
            return self
        return self.keep(self.confidence >= min_confidence)


def find_instances(detection: np.ndarray, segmentation: np.ndarray, config: InstanceConfig | None = None) -> Instances:
    """Instances from the two maps with their confidences, those below ``config.min_confidence`` dropped.

    Returns:
        :class:`Instances`: labels as :func:`instances_from_maps` gives them, and per label the mean segmentation
        probability and peak detection probability over its pixels (:func:`instance_confidence`).
    """
    config = config or InstanceConfig()
    labels = _instances(detection, segmentation, config)
    mean_seg, peak = instance_confidence(labels, detection, segmentation)
    return Instances(labels, mean_seg, peak).above(config.min_confidence)


def instances_from_maps(
    detection: np.ndarray, segmentation: np.ndarray, config: InstanceConfig | None = None
) -> np.ndarray:
    """Instance labels from the detection and segmentation probability maps.

    Args:
        detection: ``(h, w)`` nucleus-centre probabilities.
        segmentation: ``(h, w)`` nuclear-pixel probabilities.
        config: Thresholds and sizes (defaults: the released code's).

    Returns:
        int32 labels ``(h, w)``, 0 background, 1..n instances numbered in raster order of their first pixel.

    Raises:
        ValueError: If the maps' shapes differ or are not 2-D.
    """
    config = config or InstanceConfig()
    if config.min_confidence > 0:
        return find_instances(detection, segmentation, config).labels
    return _instances(detection, segmentation, config)


def _instances(detection: np.ndarray, segmentation: np.ndarray, config: InstanceConfig) -> np.ndarray:
    if detection.shape != segmentation.shape or detection.ndim != 2:
        raise ValueError(
            f"detection and segmentation must be 2-D maps of one shape, got {detection.shape} and {segmentation.shape}"
        )
    det = _smooth(detection, config.detection_sigma)
    seg = _smooth(segmentation, config.segmentation_sigma)
    foreground = (seg > config.foreground_threshold).astype(np.uint8)
    cc = 4 if config.connectivity == 4 else 8
    _, seeds = cv2.connectedComponents(
        ((det > config.detection_threshold) & (foreground > 0)).astype(np.uint8), connectivity=cc, ltype=cv2.CV_32S
    )
    # Foreground components without a seed get one at their maximum (the first such pixel in raster order).
    n_fg, components = cv2.connectedComponents(foreground, connectivity=cc, ltype=cv2.CV_32S)
    seeded = np.zeros(n_fg, bool)
    seeded[0] = True
    seeded[np.unique(components[seeds > 0])] = True
    comp = components.ravel()
    where = np.flatnonzero(~seeded[comp])
    if where.size:
        values = seg.ravel()[where]
        # Sorted by component, then value, then descending position: each group's last entry is its first maximum.
        order = where[np.lexsort((-where, values, comp[where]))]
        group = comp[order]
        best = order[np.r_[group[1:] != group[:-1], True]]
        seeds.ravel()[best] = np.arange(int(seeds.max()) + 1, int(seeds.max()) + 1 + best.size, dtype=np.int32)
    labels = watershed(-seg, seeds, foreground, connectivity=config.connectivity)
    return _clean(labels, config.min_size, config.connectivity)


def _clean(labels: np.ndarray, min_size: int, connectivity: int = 4) -> np.ndarray:
    """Fill holes and merge enclosed instances (:func:`fill_enclosed`), keep largest parts, drop small ones, renumber.

    Instances below ``min_size`` px are dropped; each keeps its largest 4-connected part (only an 8-connected
    watershed can split one). A hole (background that only one instance surrounds) lies inside that instance's
    bounding box without reaching its edge, so :func:`fill_enclosed` fills it with the rest of what the outline
    encloses.
    """
    out = fill_enclosed(labels)
    # One 4-connected part each, so outlines agree with pixel counts. A 4-connected watershed grows each label from
    # a 4-connected seed through 4-neighbours, and a filled hole is 4-adjacent to its instance, so only an
    # 8-connected watershed can leave an instance in parts.
    if connectivity == 8:
        out = largest_parts(out)
    out = np.ascontiguousarray(out, dtype=np.int32)
    sizes, _, _, first = label_moments(out)
    keep = sizes >= max(min_size, 1)
    keep[0] = False
    # Renumbered 1..m in raster order of their first pixel (dropping others does not move a kept one's first).
    present = np.flatnonzero(keep)
    new = np.zeros(sizes.size, np.int32)
    new[present[np.argsort(first[present], kind="stable")]] = np.arange(1, present.size + 1, dtype=np.int32)
    return new[out]


def fill_enclosed(labels: np.ndarray) -> np.ndarray:
    """Give each instance every pixel its outline encloses: holes of background and other instances inside it.

    An outline is an exterior ring (outlines keep no holes), so what an instance encloses is drawn as part of it.
    A nucleus does not hold another: an instance inside another is a second seed within one nucleus (a dark
    chromatin clump, a nucleolus), and a hole is nuclear pixels the foreground missed. Left apart, two polygons
    would overlap, or an outline would cover more than its pixels. Enclosed means: a 4-connected part of the
    pixels that are not the instance, inside its bounding box without reaching the box's edge (so it cannot reach
    the image's edge either). Nested instances end in the outermost.
    """
    flat = labels.ravel()
    where = np.flatnonzero(flat)
    if where.size == 0:
        return labels
    ids = flat[where]
    order = np.argsort(ids, kind="stable")
    ids, where = ids[order], where[order]
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
    w = labels.shape[1]
    ys, xs = where // w, where % w
    y0, y1 = np.minimum.reduceat(ys, starts), np.maximum.reduceat(ys, starts)
    x0, x1 = np.minimum.reduceat(xs, starts), np.maximum.reduceat(xs, starts)
    out = labels
    for k, a, b, c, d in zip(ids[starts], y0, y1, x0, x1, strict=True):
        if b - a < 2 or d - c < 2:  # nothing fits inside
            continue
        box = out[a : b + 1, c : d + 1]
        other = (box != k).astype(np.uint8)
        if not other[1:-1, 1:-1].any():
            continue
        n, parts = cv2.connectedComponents(other, connectivity=4, ltype=cv2.CV_32S)
        outside = np.unique(np.concatenate([parts[0], parts[-1], parts[:, 0], parts[:, -1]]))
        inside = np.ones(n, bool)
        inside[0] = False
        inside[outside] = False
        if inside.any():
            if out is labels:
                out = labels.copy()
                box = out[a : b + 1, c : d + 1]
            box[inside[parts]] = k
    return out


def largest_parts(labels: np.ndarray) -> np.ndarray:
    """Each instance reduced to its largest 4-connected part (the others become background).

    An outline (:func:`trace_contours`) follows one 4-connected part, so an instance in several parts (pieces
    touching only diagonally, after 8-connected watershed, hole filling or resampling to a coarser grid) would get
    a polygon that disagrees with its pixel count and measurements. Ties keep the part first in raster order.
    """
    labels = np.ascontiguousarray(labels)
    h, w = labels.shape
    if labels.size == 0 or not labels.any():
        return labels
    # Pixels on the even sites of a grid twice as fine, joined through the odd sites where 4-neighbours share a
    # label: the 4-connected components of that grid are the parts of equal labels.
    grid = np.zeros((2 * h - 1, 2 * w - 1), np.uint8)
    grid[::2, ::2] = labels > 0
    grid[::2, 1::2] = (labels[:, 1:] == labels[:, :-1]) & (labels[:, 1:] > 0)
    grid[1::2, ::2] = (labels[1:, :] == labels[:-1, :]) & (labels[1:, :] > 0)
    n, parts = cv2.connectedComponents(grid, connectivity=4, ltype=cv2.CV_32S)
    parts = parts[::2, ::2]
    if n - 1 == len(np.unique(labels[labels > 0])):
        return labels  # every instance is one part already
    flat_parts, flat_labels = parts.ravel(), labels.ravel().astype(np.int64)
    where = np.flatnonzero(flat_parts)
    size = np.bincount(flat_parts[where], minlength=n)
    owner = np.zeros(n, np.int64)
    first = np.full(n, labels.size, np.int64)
    owner[flat_parts[where]] = flat_labels[where]
    np.minimum.at(first, flat_parts[where], where)
    ids = np.arange(1, n)
    # Per owner: the largest part, then the earliest.
    order = ids[np.lexsort((first[ids], -size[ids], owner[ids]))]
    best = order[np.r_[True, owner[order][1:] != owner[order][:-1]]]
    keep = np.zeros(n, bool)
    keep[best] = True
    keep[0] = True
    out = labels.copy()
    out[~keep[parts]] = 0
    return out


def trace_contours(labels: np.ndarray) -> list[np.ndarray]:
    """Outline of every instance as a polygon along pixel edges.

    Label ``k`` (1..max) gets the outer boundary of the 4-connected part that holds its first pixel in raster
    order, traced clockwise on screen (x right, y down), one vertex per corner: ``(x, y)`` in pixel-corner
    coordinates, so pixel ``(i, j)`` is the square ``[j, j+1] × [i, i+1]`` and the polygon's area equals the
    pixel count of a hole-free instance. Absent labels get an empty ``(0, 2)`` array.

    Args:
        labels: ``(h, w)`` non-negative integer instance labels.

    Returns:
        One int32 ``(n_k, 2)`` array per label ``1..labels.max()``.

    Raises:
        ValueError: If ``labels`` is not 2-D or has negative values.
    """
    labels = np.ascontiguousarray(labels, dtype=np.int32)
    if labels.ndim != 2:
        raise ValueError(f"labels must be 2-D, got {labels.shape}")
    if labels.size and labels.min() < 0:
        raise ValueError("labels must be non-negative")
    n = int(labels.max()) if labels.size else 0
    xy, offsets = _core.trace_contours(labels, n)
    return [xy[offsets[k] : offsets[k + 1]] for k in range(n)]


def trace_contours_reference(labels: np.ndarray) -> list[np.ndarray]:
    """The specification of :func:`trace_contours`: the same crack following in Python."""
    labels = np.asarray(labels)
    h, w = labels.shape
    step = [(1, 0), (0, 1), (-1, 0), (0, -1)]  # right, down, left, up
    ahead_left = [(0, -1), (0, 0), (-1, 0), (-1, -1)]
    ahead_right = [(0, 0), (-1, 0), (-1, -1), (0, -1)]
    polygons = []
    for label in range(1, int(labels.max(initial=0)) + 1):
        where = np.flatnonzero(labels.ravel() == label)
        if where.size == 0:
            polygons.append(np.zeros((0, 2), np.int32))
            continue

        def inside(x: int, y: int, label: int = label) -> bool:
            return 0 <= x < w and 0 <= y < h and labels[y, x] == label

        y0, x0 = divmod(int(where[0]), w)
        x, y, d, corners = x0, y0, 3, []
        while True:
            nxt = d
            if not inside(x + ahead_right[d][0], y + ahead_right[d][1]):
                nxt = (d + 1) % 4
            elif inside(x + ahead_left[d][0], y + ahead_left[d][1]):
                nxt = (d + 3) % 4
            if nxt != d:
                corners.append((x, y))
            d = nxt
            x, y = x + step[d][0], y + step[d][1]
            if (x, y, d) == (x0, y0, 3):
                break
        polygons.append(np.array(corners, np.int32))
    return polygons

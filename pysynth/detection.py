"""Nucleus detection scored against dot annotations: predicted centroids matched one-to-one to dots.

A dot and a centroid may be matched when they lie at most ``radius`` apart. Among the one-to-one matchings of
such pairs, :func:`match_points` takes one with the most pairs and, among those, the least total distance
(Hungarian assignment on each connected group of in-range pairs). Precision = matched / centroids, recall =
matched / dots, F1 their harmonic mean; pooled scores sum the counts over images (micro-averages).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pysynth.errors import PysynthError

#: Classes of BRCA-M2C dot files (``y x class`` rows).
DOT_CLASSES = {1: "lymphocyte", 2: "tumour", 3: "stromal"}


def match_points(pred_xy: np.ndarray, gt_xy: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """One-to-one matching of predicted to ground-truth points within ``radius``: most pairs, least total distance.

    Args:
        pred_xy: Predicted points ``(n, 2)``.
        gt_xy: Ground-truth points ``(m, 2)`` (same coordinate order and units).
        radius: Largest distance of a matched pair (inclusive).

    Returns:
        ``(pred_index, gt_index)``: int arrays of the matched pairs, sorted by ``gt_index``.
    """
    from scipy.optimize import linear_sum_assignment
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    from scipy.spatial import cKDTree

    pred_xy = np.asarray(pred_xy, np.float64).reshape(-1, 2)
    gt_xy = np.asarray(gt_xy, np.float64).reshape(-1, 2)
    n, m = len(pred_xy), len(gt_xy)
    empty = np.zeros(0, np.int64)
    if n == 0 or m == 0:
        return empty, empty
    pairs = cKDTree(pred_xy).sparse_distance_matrix(cKDTree(gt_xy), radius, output_type="ndarray")
    if pairs.size == 0:
        return empty, empty
    pi, gi, dist = pairs["i"].astype(np.int64), pairs["j"].astype(np.int64), pairs["v"].astype(np.float64)
    # Points as nodes of one graph (predictions 0..n-1, ground truth n..n+m-1), edges the in-range pairs.
    graph = coo_matrix((np.ones(pi.size), (pi, gi + n)), shape=(n + m, n + m))
    _, component = connected_components(graph, directed=False)
    edge_comp = component[pi]
    sizes = np.bincount(edge_comp, minlength=component.max() + 1)
    single = sizes[edge_comp] == 1  # the common case: a pair that touches no other pair
    out_p, out_g = [pi[single]], [gi[single]]
    rest = np.flatnonzero(~single)
    if rest.size:
        order = rest[np.argsort(edge_comp[rest], kind="stable")]
        bounds = np.flatnonzero(np.diff(edge_comp[order])) + 1
        for group in np.split(order, bounds):
            p_nodes, p_local = np.unique(pi[group], return_inverse=True)
            g_nodes, g_local = np.unique(gi[group], return_inverse=True)
            # Out-of-range pairs cost more than all in-range distances together: the assignment first avoids
            # them (most in-range pairs), then minimises the in-range total; they are dropped afterwards.
            big = 1.0 + radius * (len(group) + 1)
            cost = np.full((p_nodes.size, g_nodes.size), big)
            cost[p_local, g_local] = dist[group]
            rows, cols = linear_sum_assignment(cost)
            keep = cost[rows, cols] < big
            out_p.append(p_nodes[rows[keep]])
            out_g.append(g_nodes[cols[keep]])
    p_idx, g_idx = np.concatenate(out_p), np.concatenate(out_g)
    order = np.argsort(g_idx, kind="stable")
    return p_idx[order], g_idx[order]


def centroids(labels: np.ndarray) -> np.ndarray:
    """Centroid ``(y, x)`` of every instance of a label map, in increasing label order, ``(n, 2)`` float."""
    labels = np.asarray(labels)
    ids, dense = np.unique(labels, return_inverse=True)
    dense = dense.reshape(labels.shape)
    n = ids.size
    yy, xx = np.indices(labels.shape)
    count = np.bincount(dense.ravel(), minlength=n)
    cy = np.bincount(dense.ravel(), weights=yy.ravel(), minlength=n) / np.maximum(count, 1)
    cx = np.bincount(dense.ravel(), weights=xx.ravel(), minlength=n) / np.maximum(count, 1)
    keep = ids != 0
    return np.stack([cy[keep], cx[keep]], axis=1)


def read_dots(path: str | Path, shape: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Read a dot file of ``y x class`` rows (class 1..3, see :data:`DOT_CLASSES`).

    Args:
        path: The file; an empty file has no dots.
        shape: ``(height, width)`` of the image the dots belong to; dots outside it are refused.

    Returns:
        ``(yx, classes)``: float ``(n, 2)`` and int ``(n,)``.

    Raises:
        PysynthError: If the file cannot be read, a row is not three numbers, a class is outside 1..3 or a dot
            lies outside the image.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PysynthError(f"{path}: cannot read dot file ({getattr(exc, 'strerror', None) or exc})") from None
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.replace(",", " ").split()
        if not fields:
            continue
        try:
            values = [float(v) for v in fields]
        except ValueError:
            values = []
        if len(values) != 3 or not all(math.isfinite(v) for v in values):
            raise PysynthError(f"{path}: line {number} is not 'y x class' ({line.strip()[:40]!r})")
        rows.append(values)
    table = np.array(rows, np.float64).reshape(-1, 3)
    yx, cls = table[:, :2], table[:, 2]
    bad = ~np.isin(cls, list(DOT_CLASSES))
    if bad.any():
        raise PysynthError(f"{path}: class {cls[bad][0]:g} outside 1..3 (1 lymphocyte, 2 tumour, 3 stromal)")
    if shape is not None:
        outside = (yx < 0).any(axis=1) | (yx[:, 0] >= shape[0]) | (yx[:, 1] >= shape[1])
        if outside.any():
            y, x = yx[outside][0]
            raise PysynthError(
                f"{path}: dot (y {y:g}, x {x:g}) lies outside the {shape[1]}×{shape[0]} px image "
                f"({int(outside.sum())} such dot(s))"
            )
    return yx, cls.astype(np.int64)


def _ratio(a: float, b: float) -> float:
    return a / b if b else math.nan


@dataclass(frozen=True)
class DetectionScores:
    """Detection counts and scores of one image, or pooled over images (counts summed)."""

    images: int
    dots: int
    predicted: int
    matched: int
    dots_per_class: dict[str, int] = field(default_factory=dict)
    matched_per_class: dict[str, int] = field(default_factory=dict)

    @property
    def precision(self) -> float:
        """Matched / predicted centroids."""
        return _ratio(self.matched, self.predicted)

    @property
    def recall(self) -> float:
        """Matched / dots."""
        return _ratio(self.matched, self.dots)

    @property
    def f1(self) -> float:
        """2·matched / (predicted + dots)."""
        return _ratio(2 * self.matched, self.predicted + self.dots)

    def recall_per_class(self) -> dict[str, float]:
        """Recall of the dots of each class."""
        return {name: _ratio(self.matched_per_class[name], self.dots_per_class[name]) for name in self.dots_per_class}

    def to_dict(self) -> dict:
        """Counts and scores; NaN becomes ``None`` (JSON ``null``)."""

        def clean(v: float) -> float | None:
            return None if math.isnan(v) else v

        return {
            "images": self.images,
            "dots": self.dots,
            "predicted": self.predicted,
            "matched": self.matched,
            "precision": clean(self.precision),
            "recall": clean(self.recall),
            "f1": clean(self.f1),
            "dots_per_class": dict(self.dots_per_class),
            "matched_per_class": dict(self.matched_per_class),
            "recall_per_class": {k: clean(v) for k, v in self.recall_per_class().items()},
        }


def detection_scores(pred_yx: np.ndarray, dots_yx: np.ndarray, classes: np.ndarray, radius: float) -> DetectionScores:
    """Match predicted centroids to dots within ``radius`` (:func:`match_points`) and count per class."""
    _, g = match_points(pred_yx, dots_yx, radius)
    classes = np.asarray(classes, np.int64)
    per_dot = np.bincount(classes, minlength=4)
    per_match = np.bincount(classes[g], minlength=4)
    return DetectionScores(
        images=1,
        dots=len(classes),
        predicted=len(pred_yx),
        matched=len(g),
        dots_per_class={name: int(per_dot[k]) for k, name in DOT_CLASSES.items()},
        matched_per_class={name: int(per_match[k]) for k, name in DOT_CLASSES.items()},
    )


def pool(scores: Sequence[DetectionScores]) -> DetectionScores:
    """Counts summed over images (micro-averaged scores)."""
    if not scores:
        raise ValueError("no scores to pool")
    return DetectionScores(
        images=sum(s.images for s in scores),
        dots=sum(s.dots for s in scores),
        predicted=sum(s.predicted for s in scores),
        matched=sum(s.matched for s in scores),
        dots_per_class={k: sum(s.dots_per_class[k] for s in scores) for k in DOT_CLASSES.values()},
        matched_per_class={k: sum(s.matched_per_class[k] for s in scores) for k in DOT_CLASSES.values()},
    )

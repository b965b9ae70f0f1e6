"""Segmentation metrics on instance label maps, exactly as docs/method.md §7 defines them.

Inputs are integer label maps (0 = background, k = instance k) of one shape. Each metric is computed from the
table of pixel overlaps between ground-truth and predicted instances, built once per image.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class Scores:
    """Metrics of one image (or their means over images)."""

    dice1: float
    dice2: float
    dice_avg: float
    aji: float
    pq: float
    dq: float
    sq: float

    def to_dict(self) -> dict:
        """Plain dict of floats."""
        return asdict(self)


def _relabel(labels: np.ndarray) -> tuple[np.ndarray, int]:
    ids, inverse = np.unique(labels, return_inverse=True)
    if ids[0] != 0:  # no background pixel: shift so that 0 stays "background"
        ids = np.concatenate([[0], ids])
        inverse = inverse + 1
    return inverse.reshape(labels.shape).astype(np.int64), len(ids) - 1


def overlap_table(gt: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pixel overlaps of every (ground-truth, predicted) instance pair, and each instance's area.

    Returns:
        ``(inter, gt_area, pred_area)``: ``inter[i, j]`` is the overlap of ground truth ``i + 1`` and prediction
        ``j + 1`` (instances renumbered 1..n in increasing label order); areas in pixels.
    """
    if gt.shape != pred.shape:
        raise ValueError(f"ground truth {gt.shape} and prediction {pred.shape} differ in shape")
    g, ng = _relabel(np.asarray(gt))
    p, npred = _relabel(np.asarray(pred))
    table = np.bincount((g * (npred + 1) + p).ravel(), minlength=(ng + 1) * (npred + 1)).reshape(ng + 1, npred + 1)
    return table[1:, 1:], table[1:, :].sum(axis=1), table[:, 1:].sum(axis=0)


def best_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Best IoU with an instance of ``b`` of each instance of ``a`` (in increasing label order; 0 without overlap).

    How two label maps of the same image agree instance by instance (e.g. tiled against one-pass inference).
    """
    inter, area_a, area_b = overlap_table(a, b)
    iou = inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1)
    return iou.max(axis=1, initial=0)


def score(gt: np.ndarray, pred: np.ndarray) -> Scores:
    """Dice1, Dice2, DICE avg, AJI and PQ (with DQ and SQ) of a predicted label map against the ground truth.

    - Dice1 = 2|S ∩ T| / (|S| + |T|) over foreground pixels.
    - Dice2 (ensemble Dice): over every pair with overlap, 2·Σ|g ∩ s| / Σ(|g| + |s|).
    - AJI: each ground-truth object takes the prediction of highest IoU; C = Σ intersections, U = Σ unions +
      areas of ground-truth objects overlapping no prediction + areas of predictions never taken.
    - PQ: unique matches at IoU > 0.5; DQ = TP / (TP + FP/2 + FN/2); SQ = mean IoU of matches; PQ = DQ·SQ.

    Two empty maps score 1 everywhere; one empty map scores 0.

    Raises:
        ValueError: If the shapes differ.
    """
    inter, gt_area, pred_area = overlap_table(gt, pred)
    if gt_area.size == 0 and pred_area.size == 0:
        return Scores(1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0)
    fg_inter = float(inter.sum())
    dice1 = 2 * fg_inter / float(gt_area.sum() + pred_area.sum())
    gi, pj = np.nonzero(inter)
    dice2 = 2 * fg_inter / float((gt_area[gi] + pred_area[pj]).sum()) if gi.size else 0.0
    union = gt_area[:, None] + pred_area[None, :] - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(inter > 0, inter / np.maximum(union, 1), 0.0)
    # AJI
    c = u = 0.0
    used = np.zeros(pred_area.size, bool)
    for i in range(gt_area.size):
        if pred_area.size and iou[i].max() > 0:
            j = int(np.argmax(iou[i]))
            c += inter[i, j]
            u += union[i, j]
            used[j] = True
        else:
            u += gt_area[i]
    u += float(pred_area[~used].sum())
    aji = c / u if u > 0 else 0.0
    # PQ: IoU > 0.5 makes matches unique.
    matched = iou > 0.5
    tp = int(matched.sum())
    fp, fn = pred_area.size - tp, gt_area.size - tp
    dq = tp / (tp + 0.5 * fp + 0.5 * fn) if (tp + fp + fn) else 1.0
    sq = float(iou[matched].mean()) if tp else 0.0
    return Scores(dice1, dice2, (dice1 + dice2) / 2, aji, dq * sq, dq, sq)


def mean_scores(scores: list[Scores]) -> Scores:
    """Per-image means."""
    if not scores:
        raise ValueError("no scores to average")
    keys = Scores.__dataclass_fields__
    return Scores(**{k: float(np.mean([getattr(s, k) for s in scores])) for k in keys})


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve: the chance that a random positive scores above a random negative (ties: half).

    Computed from average ranks (Mann–Whitney U), exact with ties; NaN when either class is absent.

    Raises:
        ValueError: If the lengths differ or a score is not finite.
    """
    scores = np.asarray(scores, np.float64).ravel()
    positive = np.asarray(positive, bool).ravel()
    if scores.shape != positive.shape:
        raise ValueError(f"scores and truth differ in length: {scores.size} and {positive.size}")
    if not np.isfinite(scores).all():
        raise ValueError("scores must be finite")
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(scores.size, np.float64)
    sorted_scores = scores[order]
    # Average rank (1-based) over each run of equal scores.
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    ends = np.r_[starts[1:], scores.size]
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))

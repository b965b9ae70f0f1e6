"""Error anatomy of a predicted instance label map: which objects are false, missed, split, merged or matched.

Everything comes from one contingency table of (ground-truth, predicted) label pairs, built with ``np.bincount``
per image; no loop visits pixels object by object. The rules (``c`` = :data:`COVER` = 0.2):

- **false object**: a predicted object whose overlap with ground-truth foreground is < c of its own area;
- **missed nucleus**: a ground-truth object covered by predicted foreground for < c of its area;
- a prediction *holds a substantial part* of a ground-truth object when their overlap is >= c of the
  ground-truth object's area; a **split** is a ground-truth object of which >= 2 predictions each hold a
  substantial part, a **merge** a prediction that holds a substantial part of >= 2 ground-truth objects (the same
  table read by rows and by columns). Pieces under c of the nucleus are not counted, so a nucleus cut into 6+
  tiny seeds is not a split by this rule;
- **matched**: the one-to-one pairs at IoU > 0.5, as PQ counts them. Predictions that are neither matched nor
  false (split pieces, merges, poor overlaps) are the "other" predictions;
- pixel precision / recall: shared foreground pixels over predicted / ground-truth foreground pixels.

Areas are in pixels; the hematoxylin optical density of an object is the mean over its pixels of
``optical_density(rgb) @ HED_FROM_RGB[:, 0]`` (Ruifrok & Johnston deconvolution, natural-log OD). Rates with an
empty denominator (no prediction, no ground truth) are NaN. Per-image and pooled summaries come from the same
function, :func:`summarise`, so pooled numbers are micro-averages (pixel and object counts summed over images).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

#: Share of an object's area below which it counts as not covered (false objects, missed nuclei), and at or
#: above which a piece of a ground-truth object counts as substantial (splits, merges).
COVER = 0.2

#: Overlay colours (RGB): matched predictions, false objects, missed ground-truth nuclei, other predictions.
MATCHED_COLOUR = (0, 255, 0)
FALSE_COLOUR = (255, 0, 0)
MISSED_COLOUR = (0, 255, 255)
OTHER_COLOUR = (255, 255, 0)
#: Opacity of the red fill of false objects.
FALSE_FILL_ALPHA = 0.4
#: Background of overlays drawn without the image.
GREY = 192


@dataclass(frozen=True)
class ObjectErrors:
    """Per-object verdicts of one image (or of several, concatenated by :func:`summarise`).

    Attributes:
        gt_ids: Labels of the ground-truth objects, increasing.
        pred_ids: Labels of the predicted objects, increasing.
        gt_area: Area of each ground-truth object (pixels).
        pred_area: Area of each predicted object (pixels).
        gt_missed: Ground-truth objects covered by predictions for < :data:`COVER` of their area.
        gt_split: Ground-truth objects of which >= 2 predictions each hold >= :data:`COVER` of their area.
        gt_matched: Ground-truth objects with a prediction at IoU > 0.5.
        pred_false: Predictions overlapping ground truth for < :data:`COVER` of their own area.
        pred_merge: Predictions holding >= :data:`COVER` of each of >= 2 ground-truth objects.
        pred_matched: Predictions with a ground-truth object at IoU > 0.5.
        overlap_pixels: Pixels that are foreground in both maps.
        gt_hema_od: Mean hematoxylin OD of each ground-truth object, or ``None`` without an image.
        pred_hema_od: Mean hematoxylin OD of each predicted object, or ``None`` without an image.
    """

    gt_ids: np.ndarray
    pred_ids: np.ndarray
    gt_area: np.ndarray
    pred_area: np.ndarray
    gt_missed: np.ndarray
    gt_split: np.ndarray
    gt_matched: np.ndarray
    pred_false: np.ndarray
    pred_merge: np.ndarray
    pred_matched: np.ndarray
    overlap_pixels: int
    gt_hema_od: np.ndarray | None = None
    pred_hema_od: np.ndarray | None = None


@dataclass(frozen=True)
class ErrorSummary:
    """Counts and rates of one image, or pooled over images (counts summed, rates of the sums).

    Medians are over objects (NaN when there are none, or without an image for the optical densities).
    """

    images: int
    gt_objects: int
    pred_objects: int
    matched: int
    false_objects: int
    missed_nuclei: int
    splits: int
    merges: int
    false_share: float
    missed_share: float
    pixel_precision: float
    pixel_recall: float
    gt_pixels: int
    pred_pixels: int
    overlap_pixels: int
    median_area_false: float
    median_area_matched: float
    median_area_missed: float
    median_hema_od_false: float
    median_hema_od_matched: float
    median_hema_od_missed: float

    def to_dict(self) -> dict:
        """Plain dict; NaN becomes ``None`` (JSON ``null``)."""
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(self).items()}


def _dense(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Labels renumbered 0..n (0 = background) and the original label of each object 1..n."""
    ids, inverse = np.unique(labels, return_inverse=True)
    inverse = inverse.reshape(labels.shape).astype(np.int64)
    if ids.size and ids[0] == 0:
        return inverse, ids[1:]
    return inverse + 1, ids  # no background pixel


def hematoxylin_od(rgb: np.ndarray) -> np.ndarray:
    """Hematoxylin optical density of every pixel of an RGB ``uint8`` image, float32 ``(h, w)``."""
    from pysynth.synth.source import HED_FROM_RGB, optical_density

    return optical_density(np.asarray(rgb, np.uint8)) @ HED_FROM_RGB[:, 0].astype(np.float32)


def object_errors(gt: np.ndarray, pred: np.ndarray, rgb: np.ndarray | None = None) -> ObjectErrors:
    """Classify every ground-truth and predicted object of one image (rules in the module docstring).

    Args:
        gt: Ground-truth instance label map, 0 = background.
        pred: Predicted instance label map of the same shape.
        rgb: The image, RGB ``uint8`` ``(h, w, 3)``, for the objects' hematoxylin optical density (optional).

    Raises:
        ValueError: If the shapes differ.
    """
    gt, pred = np.asarray(gt), np.asarray(pred)
    if gt.shape != pred.shape or gt.ndim != 2:
        raise ValueError(f"ground truth {gt.shape} and prediction {pred.shape} must be label maps of one shape")
    if rgb is not None and np.shape(rgb) != (*gt.shape, 3):
        raise ValueError(f"image {np.shape(rgb)} does not match the label maps {gt.shape}")
    g, gt_ids = _dense(gt)
    p, pred_ids = _dense(pred)
    ng, npred = gt_ids.size, pred_ids.size
    table = np.bincount((g * (npred + 1) + p).ravel(), minlength=(ng + 1) * (npred + 1)).reshape(ng + 1, npred + 1)
    inter = table[1:, 1:]
    gt_area, pred_area = table[1:].sum(axis=1), table[:, 1:].sum(axis=0)
    gt_covered, pred_covered = inter.sum(axis=1), inter.sum(axis=0)
    substantial = inter >= COVER * gt_area[:, None]  # areas are >= 1, so this implies overlap
    union = gt_area[:, None] + pred_area[None, :] - inter
    matched = 2 * inter > union  # IoU > 0.5, in integers: unique in rows and columns
    hema = [None, None]
    if rgb is not None:
        od = hematoxylin_od(rgb).ravel().astype(np.float64)
        for k, (dense, n, area) in enumerate(((g, ng, gt_area), (p, npred, pred_area))):
            hema[k] = np.bincount(dense.ravel(), weights=od, minlength=n + 1)[1:] / np.maximum(area, 1)
    return ObjectErrors(
        gt_ids=gt_ids,
        pred_ids=pred_ids,
        gt_area=gt_area,
        pred_area=pred_area,
        gt_missed=gt_covered < COVER * gt_area,
        gt_split=substantial.sum(axis=1) >= 2,
        gt_matched=matched.any(axis=1),
        pred_false=pred_covered < COVER * pred_area,
        pred_merge=substantial.sum(axis=0) >= 2,
        pred_matched=matched.any(axis=0),
        overlap_pixels=int(inter.sum()),
        gt_hema_od=hema[0],
        pred_hema_od=hema[1],
    )


def _ratio(a: float, b: float) -> float:
    return a / b if b else math.nan


def _median(values: np.ndarray | None, where: np.ndarray) -> float:
    if values is None or not where.any():
        return math.nan
    return float(np.median(values[where]))


def summarise(errors: ObjectErrors | Sequence[ObjectErrors]) -> ErrorSummary:
    """Counts, rates and medians of one image's verdicts, or pooled over several images' (micro-averages).

    Optical-density medians pool only the images that came with an RGB image.
    """
    items = [errors] if isinstance(errors, ObjectErrors) else list(errors)
    if not items:
        raise ValueError("no images to summarise")

    def cat(name: str) -> np.ndarray:
        return np.concatenate([getattr(e, name) for e in items])

    def cat_od(name: str, mask: str) -> tuple[np.ndarray | None, np.ndarray]:
        have = [e for e in items if getattr(e, name) is not None]
        if not have:
            return None, np.zeros(0, bool)
        return np.concatenate([getattr(e, name) for e in have]), np.concatenate([getattr(e, mask) for e in have])

    gt_area, pred_area = cat("gt_area"), cat("pred_area")
    pred_false, pred_matched, gt_missed = cat("pred_false"), cat("pred_matched"), cat("gt_missed")
    overlap = sum(e.overlap_pixels for e in items)
    gt_pixels, pred_pixels = int(gt_area.sum()), int(pred_area.sum())
    od_pred_false = cat_od("pred_hema_od", "pred_false")
    od_pred_matched = cat_od("pred_hema_od", "pred_matched")
    od_gt_missed = cat_od("gt_hema_od", "gt_missed")
    return ErrorSummary(
        images=len(items),
        gt_objects=int(gt_area.size),
        pred_objects=int(pred_area.size),
        matched=int(pred_matched.sum()),
        false_objects=int(pred_false.sum()),
        missed_nuclei=int(gt_missed.sum()),
        splits=int(cat("gt_split").sum()),
        merges=int(cat("pred_merge").sum()),
        false_share=_ratio(int(pred_false.sum()), pred_area.size),
        missed_share=_ratio(int(gt_missed.sum()), gt_area.size),
        pixel_precision=_ratio(overlap, pred_pixels),
        pixel_recall=_ratio(overlap, gt_pixels),
        gt_pixels=gt_pixels,
        pred_pixels=pred_pixels,
        overlap_pixels=int(overlap),
        median_area_false=_median(pred_area, pred_false),
        median_area_matched=_median(pred_area, pred_matched),
        median_area_missed=_median(gt_area, gt_missed),
        median_hema_od_false=_median(*od_pred_false),
        median_hema_od_matched=_median(*od_pred_matched),
        median_hema_od_missed=_median(*od_gt_missed),
    )


def error_overlay(
    gt: np.ndarray, pred: np.ndarray, rgb: np.ndarray | None = None, errors: ObjectErrors | None = None
) -> np.ndarray:
    """The image with each object drawn by its verdict, RGB ``uint8`` ``(h, w, 3)``.

    Matched predictions: green outline; false objects: red, filled at :data:`FALSE_FILL_ALPHA` and outlined;
    missed ground-truth nuclei: cyan outline; other predictions (split pieces, merges, poor overlaps): yellow
    outline. Outlines are the objects' inner boundary pixels (``outline_mask``).

    Args:
        gt: Ground-truth instance label map.
        pred: Predicted instance label map of the same shape.
        rgb: The image (RGB ``uint8``); a uniform grey background without it.
        errors: :func:`object_errors` of these maps, if already computed.
    """
    from pysynth.synth.store import outline_mask

    gt, pred = np.asarray(gt), np.asarray(pred)
    if errors is None:
        errors = object_errors(gt, pred)
    if rgb is None:
        out = np.full((*gt.shape, 3), GREY, np.uint8)
    else:
        if np.shape(rgb) != (*gt.shape, 3):
            raise ValueError(f"image {np.shape(rgb)} does not match the label maps {gt.shape}")
        out = np.array(rgb, np.uint8, copy=True)
    pred_edge, gt_edge = outline_mask(pred), outline_mask(gt)
    false_px = np.isin(pred, errors.pred_ids[errors.pred_false])
    matched_px = np.isin(pred, errors.pred_ids[errors.pred_matched])
    other_px = (pred > 0) & ~false_px & ~matched_px
    missed_px = np.isin(gt, errors.gt_ids[errors.gt_missed])
    fill = out[false_px].astype(np.float32) * (1 - FALSE_FILL_ALPHA)
    out[false_px] = np.round(fill + FALSE_FILL_ALPHA * np.array(FALSE_COLOUR, np.float32)).astype(np.uint8)
    out[other_px & pred_edge] = OTHER_COLOUR
    out[matched_px & pred_edge] = MATCHED_COLOUR
    out[missed_px & gt_edge] = MISSED_COLOUR
    out[false_px & pred_edge] = FALSE_COLOUR
    return out

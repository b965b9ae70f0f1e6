"""Training targets and pixel weights from synthetic patches (docs/method.md §5)."""

from __future__ import annotations

import cv2
import numpy as np
import torch
from torch.nn import functional as F

#: Label of pixels whose truth is unknown (unsure parts of pseudo-labels): zero loss weight, never a nucleus.
#: 2^24 − 1 stays exact through every float conversion that label warps may make.
IGNORE_LABEL = 2**24 - 1


def make_targets(labels: np.ndarray, centres: np.ndarray, *, dilate: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Detection and segmentation targets of one patch.

    The detection target marks each nucleus' centre pixel dilated to a ``(2·dilate+1)²`` square (3×3 by
    default, as the released code did); the segmentation target is every nuclear pixel.

    Args:
        labels: ``(H, W)`` instance labels.
        centres: ``(n, 2)`` centres ``(x, y)`` in pixels (NaN rows are skipped).
        dilate: Half-width of the square around each centre.

    Returns:
        ``(detection, segmentation)``, float32 ``(H, W)`` each, values 0 or 1.
    """
    h, w = labels.shape
    detection = np.zeros((h, w), np.float32)
    centres = np.asarray(centres, np.float64).reshape(-1, 2)
    centres = centres[np.isfinite(centres).all(axis=1)]
    xs = np.floor(centres[:, 0]).astype(np.int64)
    ys = np.floor(centres[:, 1]).astype(np.int64)
    for dy in range(-dilate, dilate + 1):
        for dx in range(-dilate, dilate + 1):
            y, x = ys + dy, xs + dx
            keep = (y >= 0) & (y < h) & (x >= 0) & (x < w)
            detection[y[keep], x[keep]] = 1.0
    return detection, (labels > 0).astype(np.float32)


def core_targets(labels: np.ndarray, fraction: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Detection and segmentation targets where detection marks each nucleus' core.

    The core of a nucleus is the set of its pixels whose distance to the nucleus' boundary (background or another
    nucleus) is at least ``fraction`` of the largest such distance in it: an inner blob of roughly the nucleus'
    shape. Unlike a dilated centre point it grows with the nucleus, is never a one-pixel-wide target, and keeps
    touching nuclei apart, because a pixel next to a neighbouring nucleus is never core.

    Args:
        labels: ``(H, W)`` instance labels.
        fraction: In (0, 1]: how deep inside a pixel must be to count as core.

    Returns:
        ``(detection, segmentation)``, float32 ``(H, W)`` each, values 0 or 1.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    labels = np.ascontiguousarray(labels, dtype=np.int32)
    inner = labels > 0
    # A pixel touching a different label (4-neighbourhood) is boundary, so touching nuclei get separate cores.
    inner[1:] &= labels[1:] == labels[:-1]
    inner[:-1] &= labels[:-1] == labels[1:]
    inner[:, 1:] &= labels[:, 1:] == labels[:, :-1]
    inner[:, :-1] &= labels[:, :-1] == labels[:, 1:]
    distance = cv2.distanceTransform(inner.astype(np.uint8), cv2.DIST_L2, 3)
    # Pixels outside the image count as inside: a nucleus cut by the edge keeps its core near the edge.
    peak = np.zeros(int(labels.max()) + 1, np.float32)
    np.maximum.at(peak, labels.ravel(), distance.ravel())
    detection = (labels > 0) & (distance >= fraction * peak[labels]) & (peak[labels] > 0)
    return detection.astype(np.float32), (labels > 0).astype(np.float32)


def border_weights(shape_hw: tuple[int, int], border: int, low: float = 0.01) -> np.ndarray:
    """Pixel weights: ``low`` within ``border`` px of the patch edge, 1 inside (the released code: 50 px, 0.01).

    Nuclei cut by the patch edge are ambiguous; down-weighting the border keeps them from teaching anything.
    """
    h, w = shape_hw
    if border < 0 or not 0 <= low <= 1:
        raise ValueError(f"border must be >= 0 and low in [0, 1], got {border}, {low}")
    weights = np.full((h, w), low, np.float32)
    if 2 * border < h and 2 * border < w:
        weights[border : h - border, border : w - border] = 1.0
    return weights


def class_targets(labels: np.ndarray, classes: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Lymphocyte target and class mask of a patch: ``(lymphocyte, known)``, float32 ``(H, W)`` each.

    ``lymphocyte`` is 1 on the pixels of nuclei of class 1; ``known`` is 1 on nuclear pixels whose nucleus has a
    class (0 or 1; not 255, unknown), so the class loss covers nuclei only. Without ``classes`` (real crops,
    pseudo-labels) nothing is known.
    """
    from pysynth.synth.lymphocytes import LYMPHOCYTE, UNKNOWN, label_classes

    if classes is None or labels.max() == 0:
        zero = np.zeros(labels.shape, np.float32)
        return zero, zero.copy()
    per_pixel = label_classes(classes, int(labels.max()))[labels]
    lymphocyte = (per_pixel == LYMPHOCYTE).astype(np.float32)
    known = ((labels > 0) & (per_pixel != UNKNOWN)).astype(np.float32)
    return lymphocyte, known


def two_head_loss(
    logits: torch.Tensor,
    detection: torch.Tensor,
    segmentation: torch.Tensor,
    pixel_weights: torch.Tensor,
    sample_weights: torch.Tensor | None = None,
    *,
    dice_weight: float = 0.0,
    lymphocyte: torch.Tensor | None = None,
    class_weights: torch.Tensor | None = None,
    class_weight: float = 1.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Pixel-weighted binary cross-entropy of both heads, each sample's loss scaled by its weight.

    Per sample: ``Σ_px w_px · (BCE_det + BCE_seg) / Σ_px w_px``; the batch loss is the mean over samples of
    ``sample_weight · that`` (importance weights plug in here; no gradient flows into them).

    Args:
        logits: ``(N, 2, H, W)``: channel 0 detection, channel 1 segmentation.
        detection: ``(N, H, W)`` targets in [0, 1].
        segmentation: ``(N, H, W)`` targets in [0, 1].
        pixel_weights: ``(H, W)`` or ``(N, H, W)`` non-negative weights.
        sample_weights: ``(N,)`` non-negative weights (default 1).
        dice_weight: Weight of a pixel-weighted soft Dice loss per head and sample, added to the BCE (0: BCE only).
        lymphocyte: ``(N, H, W)`` class target of channel 2 (with a three-channel ``logits``).
        class_weights: ``(N, H, W)`` its pixel weights (nuclear pixels of a known class, times the pixel weights).
        class_weight: Weight of the class term: the BCE of channel 2 averaged over all class-weighted pixels of the
            batch (each sample's pixels scaled by its sample weight), so it is a per-nucleus-pixel mean.

    Returns:
        ``(loss, parts)``: the scalar loss and the unweighted mean BCE of each head, for logging.

    Shape:
        - logits: ``(N, 2, H, W)`` (or ``(N, 3, H, W)`` with class targets); targets ``(N, H, W)``; output: scalar.
    """
    if logits.ndim != 4 or logits.shape[1] not in (2, 3):
        raise ValueError(f"logits must be (N, 2, H, W) or (N, 3, H, W), got {tuple(logits.shape)}")
    if (lymphocyte is None) != (class_weights is None) or (lymphocyte is not None and logits.shape[1] != 3):
        raise ValueError("class targets need both lymphocyte and class_weights, and three-channel logits")
    n = logits.shape[0]
    weights = pixel_weights.expand(n, *logits.shape[-2:]) if pixel_weights.ndim == 2 else pixel_weights
    bce_det = F.binary_cross_entropy_with_logits(logits[:, 0], detection, reduction="none")
    bce_seg = F.binary_cross_entropy_with_logits(logits[:, 1], segmentation, reduction="none")
    per_sample = ((bce_det + bce_seg) * weights).sum(dim=(1, 2)) / weights.sum(dim=(1, 2)).clamp_min(1e-12)
    if dice_weight > 0:
        per_sample = per_sample + dice_weight * (
            soft_dice_loss(logits[:, 0], detection, weights) + soft_dice_loss(logits[:, 1], segmentation, weights)
        )
    if sample_weights is not None:
        per_sample = per_sample * sample_weights.detach()
    parts = {"bce_detection": float(bce_det.detach().mean()), "bce_segmentation": float(bce_seg.detach().mean())}
    loss = per_sample.mean()
    if lymphocyte is not None and class_weights is not None:
        bce_cls = F.binary_cross_entropy_with_logits(logits[:, 2], lymphocyte, reduction="none")
        cw = class_weights if sample_weights is None else class_weights * sample_weights.detach()[:, None, None]
        total = cw.sum()
        term = (bce_cls * cw).sum() / total.clamp_min(1.0)
        loss = loss + class_weight * term
        parts["bce_lymphocyte"] = float(term.detach())
    return loss, parts


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Per-sample ``1 - soft Dice`` of one head, pixel-weighted; 0 for a sample with an empty target and output.

    Shape:
        - logits, target, weights: ``(N, H, W)``; output: ``(N,)``.
    """
    p = torch.sigmoid(logits) * weights
    t = target * weights
    inter = (p * t).sum(dim=(1, 2))
    total = p.sum(dim=(1, 2)) + t.sum(dim=(1, 2))
    return 1.0 - (2.0 * inter + 1.0) / (total + 1.0)

"""Targets, border weights and the two-head loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from pysynth.train.targets import border_weights, make_targets, two_head_loss


def test_targets_mark_dilated_centres_and_nuclear_pixels() -> None:
    labels = np.zeros((10, 12), np.int32)
    labels[2:5, 2:6] = 1
    labels[6:9, 9:12] = 2
    centres = np.array([[4.0, 3.5], [11.9, 9.5], [np.nan, np.nan]])
    det, seg = make_targets(labels, centres)
    assert seg.sum() == 12 + 9
    assert det[2:5, 3:6].all()
    assert det.sum() == 9 + 4  # the second centre (x 11, y 9) sits in the corner: 2 x 2 of its square remain
    assert det[0, 0] == 0


def test_border_weights() -> None:
    w = border_weights((10, 12), border=2)
    assert w[2:8, 2:10].min() == 1
    assert w[:2].max() == pytest.approx(0.01)
    assert w[:, -2:].max() == pytest.approx(0.01)
    assert border_weights((4, 4), border=2).max() == pytest.approx(0.01)  # all border
    with pytest.raises(ValueError, match="border"):
        border_weights((4, 4), border=-1)


def test_loss_matches_a_hand_computation_and_weights() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 2, 6, 5, dtype=torch.float64, requires_grad=True)
    det = (torch.rand(2, 6, 5, dtype=torch.float64) > 0.7).double()
    seg = (torch.rand(2, 6, 5, dtype=torch.float64) > 0.5).double()
    px = torch.from_numpy(border_weights((6, 5), border=1)).double()
    loss, parts = two_head_loss(logits, det, seg, px)
    manual = 0.0
    for i in range(2):
        b = F.binary_cross_entropy_with_logits(
            logits[i, 0], det[i], reduction="none"
        ) + F.binary_cross_entropy_with_logits(logits[i, 1], seg[i], reduction="none")
        manual += float((b * px).sum().detach() / px.sum()) / 2
    assert float(loss.detach()) == pytest.approx(manual)
    assert parts["bce_detection"] > 0
    weighted, _ = two_head_loss(logits, det, seg, px, torch.tensor([2.0, 0.0], dtype=torch.float64))
    first, _ = two_head_loss(logits[:1], det[:1], seg[:1], px)
    assert float(weighted.detach()) == pytest.approx(float(first.detach()))  # (2·l0 + 0·l1) / 2
    assert torch.autograd.gradcheck(lambda z: two_head_loss(z, det, seg, px)[0], (logits,))


def test_core_targets_separate_touching_nuclei() -> None:
    from pysynth.train.targets import core_targets

    labels = np.zeros((30, 40), np.int32)
    labels[5:20, 3:19] = 1
    labels[5:20, 19:35] = 2  # touches nucleus 1 along a whole column
    labels[24:27, 10:13] = 3  # small
    det, seg = core_targets(labels, 0.5)
    assert seg.sum() == (labels > 0).sum()
    assert (det <= seg).all()
    for k in (1, 2, 3):
        assert det[labels == k].any(), f"nucleus {k} has no core"
    # The cores of the touching pair do not touch: seeds from them keep the nuclei apart.
    import cv2

    n, _ = cv2.connectedComponents(det.astype(np.uint8), connectivity=8)
    assert n - 1 == 3
    assert not det[:, 18:20].any()
    with pytest.raises(ValueError, match="fraction"):
        core_targets(labels, 0.0)


def test_dice_term() -> None:
    from pysynth.train.targets import soft_dice_loss

    target = torch.zeros(2, 8, 8)
    target[0, 2:5, 2:5] = 1
    weights = torch.ones(2, 8, 8)
    perfect = torch.where(target > 0, 30.0, -30.0)
    assert soft_dice_loss(perfect, target, weights).max() < 1e-3  # the empty second sample counts as perfect too
    wrong = -perfect
    assert soft_dice_loss(wrong, target, weights)[0] > 0.9
    logits = torch.zeros(2, 2, 8, 8, requires_grad=True)
    plain, _ = two_head_loss(logits, target, target, weights)
    with_dice, _ = two_head_loss(logits, target, target, weights, dice_weight=0.5)
    assert float(with_dice.detach()) > float(plain.detach())

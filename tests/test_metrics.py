"""Metrics on hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest

from pysynth.metrics import mean_scores, score


def _maps() -> tuple[np.ndarray, np.ndarray]:
    gt = np.zeros((4, 6), np.int32)
    gt[0:2, 0:2] = 1  # 4 px
    gt[2:4, 3:6] = 2  # 6 px
    pred = np.zeros((4, 6), np.int32)
    pred[0:2, 0:3] = 7  # 6 px: overlaps gt 1 by 4 (IoU 4/6)
    pred[3, 3:6] = 9  # 3 px: overlaps gt 2 by 3 (IoU 3/6)
    pred[0, 5] = 4  # 1 px: false positive
    return gt, pred


def test_hand_computed_case() -> None:
    gt, pred = _maps()
    s = score(gt, pred)
    # Dice1: |S∩T| = 7, |S| = 10, |T| = 10.
    assert s.dice1 == pytest.approx(2 * 7 / 20)
    # Dice2: pairs (1,7) and (2,9): 2·(4 + 3) / ((4 + 6) + (6 + 3)).
    assert s.dice2 == pytest.approx(14 / 19)
    assert s.dice_avg == pytest.approx((0.7 + 14 / 19) / 2)
    # AJI: C = 4 + 3, U = 6 + 6 + unused prediction 4 (1 px) = 13.
    assert s.aji == pytest.approx(7 / 13)
    # PQ: only (1,7) has IoU > 0.5: TP 1, FP 2, FN 1; SQ = 4/6.
    assert s.dq == pytest.approx(1 / (1 + 1 + 0.5))
    assert s.sq == pytest.approx(4 / 6)
    assert s.pq == pytest.approx(s.dq * s.sq)


def test_perfect_empty_and_disjoint() -> None:
    gt, _ = _maps()
    relabelled = np.where(gt > 0, gt + 10, 0)  # label values do not matter
    assert score(gt, relabelled).to_dict() == pytest.approx(dict.fromkeys(score(gt, gt).to_dict(), 1.0))
    empty = np.zeros_like(gt)
    assert score(empty, empty).aji == 1.0
    s = score(gt, empty)
    assert s.dice1 == 0
    assert s.aji == 0
    assert s.pq == 0
    shifted = np.roll(gt, 3, axis=1)
    assert score(gt, shifted).aji < score(gt, gt).aji


def test_aji_uses_each_prediction_once_in_the_union() -> None:
    gt = np.zeros((2, 4), np.int32)
    gt[:, 0:2] = 1
    gt[:, 2:4] = 2
    pred = np.ones((2, 4), np.int32)  # one prediction merges both
    s = score(gt, pred)
    # Both take prediction 1: C = 4 + 4, U = 8 + 8 (each union counted), no unused predictions.
    assert s.aji == pytest.approx(8 / 16)
    assert s.pq == 0  # IoU 0.5 is not > 0.5


def test_shape_mismatch_and_means() -> None:
    gt, pred = _maps()
    with pytest.raises(ValueError, match="differ in shape"):
        score(gt, pred[:3])
    both = mean_scores([score(gt, gt), score(gt, pred)])
    assert both.dice1 == pytest.approx((1 + 0.7) / 2)


def _write(path, labels: np.ndarray) -> None:
    import cv2

    cv2.imwrite(str(path), labels.astype(np.uint16))


def test_evaluate_command(run_cli, tmp_path) -> None:
    import json

    gt, pred = _maps()
    (tmp_path / "gt").mkdir()
    (tmp_path / "pred").mkdir()
    _write(tmp_path / "gt" / "a.png", gt)
    _write(tmp_path / "pred" / "a_labels.png", pred)
    _write(tmp_path / "gt" / "b.png", gt)
    _write(tmp_path / "pred" / "b_labels.png", gt)
    result = run_cli("evaluate", "--pred", tmp_path / "pred", "--gt", tmp_path / "gt", "--json", tmp_path / "s.json")
    assert result.code == 0, result.err
    assert "mean of 2" in result.out
    record = json.loads((tmp_path / "s.json").read_text())
    assert record["images"]["a"]["aji"] == pytest.approx(7 / 13)
    assert record["mean"]["dice1"] == pytest.approx((0.7 + 1) / 2)


def test_evaluate_bad_input(run_cli, tmp_path) -> None:
    gt, pred = _maps()
    for d in ("gt", "pred"):
        (tmp_path / d).mkdir()
    _write(tmp_path / "gt" / "a.png", gt)
    _write(tmp_path / "gt" / "c.png", gt)
    _write(tmp_path / "pred" / "a_labels.png", pred[:3])
    mismatch = run_cli("evaluate", "--pred", tmp_path / "pred", "--gt", tmp_path / "gt")
    assert mismatch.code == 1
    assert "no prediction for c" in mismatch.error_lines()[0]
    (tmp_path / "gt" / "c.png").unlink()
    _write(tmp_path / "pred" / "b_labels.png", pred)  # a prediction without ground truth is not scored
    shape = run_cli("evaluate", "--pred", tmp_path / "pred", "--gt", tmp_path / "gt")
    assert shape.code == 1
    assert "1 prediction(s) without ground truth" in shape.err
    assert "differs from the ground truth" in shape.error_lines()[0]
    nowhere = run_cli("evaluate", "--pred", tmp_path / "nope", "--gt", tmp_path / "gt")
    assert nowhere.code == 2


def test_best_iou_of_each_instance() -> None:
    from pysynth.metrics import best_iou

    a = np.zeros((10, 10), np.int32)
    a[0:4, 0:4] = 1  # 16 px
    a[6:10, 6:10] = 7  # no partner in b
    b = np.zeros((10, 10), np.int32)
    b[0:4, 0:2] = 3  # 8 px inside a's first instance
    b[0:4, 2:4] = 5  # the other 8 px
    np.testing.assert_allclose(best_iou(a, b), [0.5, 0.0])
    np.testing.assert_allclose(best_iou(b, a), [0.5, 0.5])

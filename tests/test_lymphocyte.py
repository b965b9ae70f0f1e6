"""The lymphocyte call of segment and infer (pysynth.lymphocyte): the class output's log-odds plus the rule."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from pysynth.lymphocyte import call, call_scores, rule_scores


def test_rule_is_minus_z_area_plus_z_hematoxylin_plus_z_circularity() -> None:
    area = np.array([10.0, 20.0, 30.0])
    hema = np.array([0.3, 0.2, 0.1])
    circ = np.array([0.9, 0.9, 0.9])  # no spread: contributes 0
    z = np.array([-1.0, 0.0, 1.0]) * math.sqrt(1.5)  # population sd of (10, 20, 30) is sqrt(200/3)
    assert rule_scores(area, hema, circ) == pytest.approx(-z - z)
    assert rule_scores(area * 0.0625, hema, circ) == pytest.approx(rule_scores(area, hema, circ))  # units do not matter
    assert rule_scores(np.zeros(0), np.zeros(0), np.zeros(0)).size == 0
    # Equal values whose mean comes out off by float rounding do not spread.
    equal = np.full(15, 0.2)
    assert equal.std() > 0  # the rounding this guards against
    assert (rule_scores(area.repeat(5), equal, equal) == rule_scores(area.repeat(5), equal * 0, equal * 0)).all()


def test_call_scores_are_log_odds_against_the_threshold_plus_the_rule() -> None:
    assert call_scores(np.array([0.5, 0.75]), np.array([0.0, -1.0])) == pytest.approx([0.0, math.log(3.0) - 1.0])
    assert call_scores(np.array([0.3]), np.array([0.0]), 0.3)[0] == pytest.approx(0.0)
    assert np.isfinite(call_scores(np.array([0.0, 1.0]), np.zeros(2))).all()


def test_a_small_dark_round_nucleus_is_called_below_the_threshold_and_a_large_pale_one_not_above_it() -> None:
    # Eight ordinary nuclei, one small/dark/round the model doubts (0.4), one large/pale/irregular it likes (0.6).
    area = np.array([400.0] * 8 + [120.0, 900.0])
    hema = np.array([0.15] * 8 + [0.35, 0.05])
    circ = np.array([0.8] * 8 + [0.95, 0.6])
    p = np.array([0.1] * 8 + [0.4, 0.6])
    got = call(p, area, hema, circ)
    assert got.tolist() == [False] * 8 + [True, False]
    assert (p >= 0.5).tolist() == [False] * 9 + [True]  # the probability alone calls them the other way round


def test_infer_calls_are_made_over_the_whole_slide(tmp_path: Path) -> None:
    from pysynth.infer.plan import Region
    from pysynth.infer.write import lymphocyte_calls

    rng = np.random.default_rng(0)
    regions = [Region(3, 0, 0, 10, 10), Region(7, 10, 0, 10, 10)]
    columns = {"lymphocyte": [], "area_px": [], "hematoxylin": [], "circularity": []}
    # The first region's nuclei are all small, the second's all large: only slide-wide z-scores see that.
    for region, n, sizes in zip(regions, (6, 9), ((50, 150), (400, 600)), strict=True):
        nuclei = [
            {"lymphocyte": 0.4, "area_px": int(rng.integers(*sizes)), "hematoxylin": 0.2, "circularity": 0.9}
            for _ in range(n)
        ]  # fmt: skip
        for nuc in nuclei:
            for k in columns:
                columns[k].append(nuc[k])
        (tmp_path / f"{region.index:06d}.json").write_text(json.dumps({"nuclei": nuclei}))
    got = lymphocyte_calls(regions, tmp_path, 0.4)
    expected = call(*(np.array(columns[k], float) for k in columns), 0.4)
    assert sorted(got) == [3, 7]
    assert np.concatenate([got[3], got[7]]).tolist() == expected.tolist()
    # The z-scores are the slide's: a region alone would call differently.
    alone = call(*(np.array(columns[k][:6], float) for k in columns), 0.4)
    assert got[3].all()  # at the threshold, all smaller than the slide's average nucleus
    assert not got[7].any()
    assert 0 < alone.sum() < 6  # alone, only those smaller than the region's average
    # Parts without the class output's probability: no calls.
    (tmp_path / "000007.json").write_text(json.dumps({"nuclei": [{"area_px": 3}]}))
    assert lymphocyte_calls(regions, tmp_path, 0.4) == {}


def test_segment_calls_are_indexed_by_label_over_the_image() -> None:
    from pysynth.segment import image_lymphocyte_calls
    from pysynth.shape import shape_features
    from pysynth.table import stain_stats

    labels = np.zeros((40, 60), np.int32)
    labels[2:8, 2:8] = 1  # small square
    labels[10:30, 5:35] = 2  # large rectangle
    labels[32:38, 40:46] = 4  # label 3 absent
    labels[12:20, 40:48] = 5
    rgb = np.full((40, 60, 3), 230, np.uint8)
    rgb[labels > 0] = (120, 80, 160)
    rgb[labels == 1] = (60, 30, 110)
    probability = np.array([0.0, 0.45, 0.55, 0.9, 0.2, 0.3])
    stains = stain_stats(labels, rgb, 5)
    got = image_lymphocyte_calls(labels, probability, stains, None, 0.5)
    present = np.array([1, 2, 4, 5])
    area = np.bincount(labels.ravel(), minlength=6)[present]
    circ = shape_features(labels, 1.0).circularity[present]
    expected = call(probability[present], area, stains["hematoxylin_od_mean"][present], circ, 0.5)
    assert got.shape == (6,)
    assert not got[0]
    assert not got[3]  # absent label, whatever its probability
    assert got[present].tolist() == expected.tolist()
    assert got[1]  # the small dark one, below the threshold
    assert not got[2]  # the large one, above it

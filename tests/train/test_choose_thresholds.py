"""Post-processing chosen on held-out synthetic patches: the minimum confidence is searched with the thresholds."""

from __future__ import annotations

import itertools
from dataclasses import replace

import cv2
import numpy as np
import pytest

from pysynth.instances import InstanceConfig, find_instances
from pysynth.metrics import Scores, mean_scores, score
from pysynth.train.loop import MIN_AREA_GRID_UM2, MIN_CONFIDENCE_GRID, choose_thresholds, min_size_grid


def _patches(n: int = 4, size: int = 72, seed: int = 0) -> tuple[np.ndarray, list[np.ndarray]]:
    """Maps with confident true nuclei and faint false objects (mean segmentation probability about 0.55)."""
    rng = np.random.default_rng(seed)
    maps, labels = [], []
    for _ in range(n):
        lab = np.zeros((size, size), np.int32)
        det = np.zeros((size, size), np.float32)
        seg = np.zeros((size, size), np.float32)
        centres = [(x, y) for y in range(12, size - 8, 24) for x in range(12, size - 8, 24)]
        order = rng.permutation(len(centres))
        for i, k in enumerate(order):
            x, y = centres[k]
            x, y = x + int(rng.integers(-2, 3)), y + int(rng.integers(-2, 3))
            if i % 3 == 2:  # a false object: foreground at every tried threshold, but faint
                cv2.circle(seg, (x, y), 8, 0.62, -1)
            else:
                cv2.circle(lab, (x, y), 8, i + 1, -1)
                cv2.circle(seg, (x, y), 8, 1.0, -1)
            cv2.circle(det, (x, y), 3, 1.0, -1)
        seg = cv2.GaussianBlur(seg, (0, 0), 0.7)
        maps.append(np.stack([det, seg]))
        labels.append(lab)
    return np.stack(maps), labels


def _grid_scores(maps: np.ndarray, labels: list[np.ndarray], base: InstanceConfig) -> dict[InstanceConfig, Scores]:
    """Mean scores of every setting of choose_thresholds' grid, each found from scratch with its own settings.

    The grid as choose_thresholds documents it; each setting's instances come from find_instances with its minimum
    confidence applied there, not by filtering one setting's instances as choose_thresholds does.
    """
    out = {}
    for sigma, min_size, det_t, fg_t, min_confidence in itertools.product(
        (1.0, 2.0),
        (base.min_size, 2 * base.min_size),
        (0.3, 0.4, 0.5, 0.6, 0.7),
        (0.3, 0.4, 0.5, 0.6),
        MIN_CONFIDENCE_GRID,
    ):
        cfg = replace(
            base,
            detection_sigma=sigma,
            min_size=min_size,
            detection_threshold=det_t,
            foreground_threshold=fg_t,
            min_confidence=min_confidence,
        )
        found = [find_instances(m[0], m[1], cfg).labels for m in maps]
        out[cfg] = mean_scores([score(lab, f) for lab, f in zip(labels, found, strict=True)])
    return out


def _per_patch_aji(maps: np.ndarray, labels: list[np.ndarray], cfg: InstanceConfig) -> np.ndarray:
    return np.array(
        [score(lab, find_instances(m[0], m[1], cfg).labels).aji for m, lab in zip(maps, labels, strict=True)]
    )


def _one_se_choice(maps, labels, scores: dict[InstanceConfig, Scores]) -> tuple[InstanceConfig, set[InstanceConfig]]:
    """The one-standard-error rule written out: the reference, the settings as good as it, the most selective."""
    reference = max(scores, key=lambda c: (scores[c].aji, scores[c].pq))
    ref = _per_patch_aji(maps, labels, reference)
    as_good = set()
    for cfg in scores:
        short = ref - _per_patch_aji(maps, labels, cfg)
        if short.mean() <= short.std(ddof=1) / np.sqrt(short.size):
            as_good.add(cfg)
    chosen = max(as_good, key=lambda c: (c.min_confidence, c.min_size, scores[c].aji, scores[c].pq))
    return chosen, as_good


def test_choose_thresholds_picks_the_most_selective_setting_as_good_as_the_best() -> None:
    maps, labels = _patches()
    base = InstanceConfig(min_size=10)
    best, table = choose_thresholds(maps, labels, base)
    scores = _grid_scores(maps, labels, base)
    assert len(table) == len(scores) == 80 * len(MIN_CONFIDENCE_GRID)
    chosen, as_good = _one_se_choice(maps, labels, scores)
    top = max((s.aji, s.pq) for s in scores.values())
    assert (scores[chosen].aji, scores[chosen].pq) == (scores[best].aji, scores[best].pq)
    assert (best.min_confidence, best.min_size) == (chosen.min_confidence, chosen.min_size)
    assert best.min_confidence > 0  # dropping the faint false objects is what gives the best AJI
    assert top[0] > max(s.aji for cfg, s in scores.items() if cfg.min_confidence == 0)
    # The table reports every setting with its true scores, the chosen one first, and which were as good.
    for row in table:
        cfg = InstanceConfig(**{k: row[k] for k in InstanceConfig.__dataclass_fields__})
        assert row["aji"] == pytest.approx(scores[cfg].aji, abs=1e-12)
        assert row["pq"] == pytest.approx(scores[cfg].pq, abs=1e-12)
        assert row["as_good"] == (cfg in as_good)
    assert best == InstanceConfig(**{k: table[0][k] for k in InstanceConfig.__dataclass_fields__})
    assert [r["aji"] for r in table[1:]] == sorted((r["aji"] for r in table[1:]), reverse=True)


def _faint_true_nuclei(n: int = 6, size: int = 72, seed: int = 1) -> tuple[np.ndarray, list[np.ndarray]]:
    """Maps in which a third of the true nuclei are faint (mean segmentation probability about 0.62)."""
    maps, labels = _patches(n, size, seed)
    out = []
    for m, lab in zip(maps, labels, strict=True):
        det, seg = m[0].copy(), np.zeros_like(m[1])
        for k, i in enumerate(np.unique(lab[lab > 0])):
            seg[lab == i] = 0.62 if k % 3 == 0 else 1.0
        out.append(np.stack([det, cv2.GaussianBlur(seg, (0, 0), 0.7)]))
    return np.stack(out), labels


def test_a_minimum_confidence_that_drops_true_nuclei_is_not_chosen() -> None:
    # Faint true nuclei: every minimum confidence above their probability costs AJI well beyond its standard error.
    maps, labels = _faint_true_nuclei()
    best, table = choose_thresholds(maps, labels, InstanceConfig(min_size=10))
    assert best.min_confidence <= 0.6
    dropping = [r for r in table if r["min_confidence"] >= 0.7]
    assert dropping
    assert not any(r["as_good"] for r in dropping)
    assert all(r["aji_short"] > r["aji_se"] for r in dropping)


def test_a_minimum_confidence_that_costs_nothing_is_chosen() -> None:
    # Every object confident: no minimum confidence drops anything here, so all are as good as 0 and the most
    # selective is kept (on real tissue it is what drops the unsure objects these patches cannot show).
    maps, labels = _patches()
    maps[:, 1] = np.where(maps[:, 1] > 0.5, 1.0, maps[:, 1])  # the false objects are now confident too
    best, table = choose_thresholds(maps, labels, InstanceConfig(min_size=10), min_confidences=(0.0, 0.5))
    assert best.min_confidence == 0.5
    same = [r for r in table if r["aji"] == table[0]["aji"] and r["pq"] == table[0]["pq"]]
    assert {r["min_confidence"] for r in same} == {0.0, 0.5}


def test_min_size_grid_is_the_base_twice_it_and_the_areas_at_the_model_resolution() -> None:
    assert min_size_grid(20, 0.25) == (20, 40, 64, 128, 192, 256)  # 4, 8, 12, 16 µm² at 0.25 µm/px
    assert min_size_grid(5, 0.5) == (5, 10, 16, 32, 48, 64)
    assert min_size_grid(40, 0.25, (1.0, 2.5, 8.0)) == (40, 80, 128)  # below the base: left out; repeats: once
    assert tuple(sorted(MIN_AREA_GRID_UM2)) == MIN_AREA_GRID_UM2


def _sized_patches(small_radius: int, n: int = 4, size: int = 72, seed: int = 2):
    """Confident true nuclei of radius 8 (about 200 px), every third of radius ``small_radius`` instead."""
    rng = np.random.default_rng(seed)
    maps, labels = [], []
    for _ in range(n):
        lab = np.zeros((size, size), np.int32)
        det = np.zeros((size, size), np.float32)
        centres = [(x, y) for y in range(12, size - 8, 24) for x in range(12, size - 8, 24)]
        for i, k in enumerate(rng.permutation(len(centres))):
            x, y = centres[k]
            cv2.circle(lab, (x, y), small_radius if i % 3 == 2 else 8, i + 1, -1)
            cv2.circle(det, (x, y), 2, 1.0, -1)
        seg = cv2.GaussianBlur((lab > 0).astype(np.float32), (0, 0), 0.7)
        maps.append(np.stack([det, seg]))
        labels.append(lab)
    return np.stack(maps), labels


def test_a_minimum_size_that_costs_nothing_is_chosen_and_one_that_drops_nuclei_is_not() -> None:
    # All nuclei about 200 px: 150 px drops none of them, so it is as good and the most selective size; 400 px
    # drops every nucleus and is never as good.
    maps, labels = _sized_patches(small_radius=8)
    best, table = choose_thresholds(maps, labels, InstanceConfig(min_size=10), (0.0,), min_sizes=(10, 150, 400))
    assert best.min_size == 150
    assert {r["min_size"] for r in table} == {10, 150, 400}
    assert not any(r["as_good"] for r in table if r["min_size"] == 400)
    # A third of the true nuclei are small (radius 4, about 50 px): 150 px would drop them, so the base is kept.
    maps, labels = _sized_patches(small_radius=4)
    best, table = choose_thresholds(maps, labels, InstanceConfig(min_size=10), (0.0,), min_sizes=(10, 150, 400))
    assert best.min_size == 10
    assert all(r["aji_short"] > r["aji_se"] for r in table if r["min_size"] == 150)

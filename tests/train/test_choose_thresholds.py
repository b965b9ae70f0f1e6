"""Post-processing chosen on held-out synthetic patches: the minimum confidence is searched with the thresholds."""

from __future__ import annotations

import cv2
import numpy as np

from pysynth.instances import InstanceConfig
from pysynth.train.loop import MIN_CONFIDENCE_GRID, choose_thresholds


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


def test_choose_thresholds_searches_the_minimum_confidence() -> None:
    maps, labels = _patches()
    best, table = choose_thresholds(maps, labels, InstanceConfig(min_size=10))
    assert best.min_confidence in MIN_CONFIDENCE_GRID
    assert best.min_confidence > 0  # dropping the faint false objects is what gives the best AJI
    assert {row["min_confidence"] for row in table} == set(MIN_CONFIDENCE_GRID)
    assert len(table) == 80 * len(MIN_CONFIDENCE_GRID)
    assert table[0]["aji"] > max(row["aji"] for row in table if row["min_confidence"] == 0)
    assert best == InstanceConfig(**{k: table[0][k] for k in InstanceConfig.__dataclass_fields__})


def test_without_faint_objects_nothing_is_dropped() -> None:
    # Ties go to the first-tried minimum confidence, 0: a model whose objects are all confident keeps them all.
    maps, labels = _patches()
    maps[:, 1] = np.where(maps[:, 1] > 0.5, 1.0, maps[:, 1])  # the false objects are now confident too
    best, _ = choose_thresholds(maps, labels, InstanceConfig(min_size=10), min_confidences=(0.0, 0.5))
    assert best.min_confidence == 0.0

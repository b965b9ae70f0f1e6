"""The nucleus placement and painting kernels against their NumPy twins."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pysynth.synth.paint import paint_nuclei, paint_nuclei_reference
from pysynth.synth.place import place_polygons, place_polygons_reference


def _candidates(rng: np.random.Generator, k: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    polys = []
    for _ in range(k):
        n = int(rng.integers(3, 18))
        angles = np.sort(rng.uniform(0, 2 * np.pi, n))
        radii = rng.uniform(2, 14, n)
        centre = rng.uniform(-5, size + 5, 2)
        polys.append(centre + np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1))
    offsets = np.concatenate([[0], np.cumsum([len(p) for p in polys])])
    return np.concatenate(polys), offsets


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), overlap=st.sampled_from([0.0, 0.15, 0.5, 1.0]), size=st.integers(5, 64))
def test_place_matches_reference(seed: int, overlap: float, size: int) -> None:
    xy, offsets = _candidates(np.random.default_rng(seed), 25, size)
    labels, centres = place_polygons(xy, offsets, (size, size + 3), max_overlap=overlap)
    ref_labels, ref_centres = place_polygons_reference(xy, offsets, (size, size + 3), max_overlap=overlap)
    np.testing.assert_array_equal(labels, ref_labels)
    np.testing.assert_allclose(centres, ref_centres, atol=1e-4)


def test_place_respects_the_overlap_limit_and_max_accept() -> None:
    xy, offsets = _candidates(np.random.default_rng(3), 200, 80)
    labels, centres = place_polygons(xy, offsets, (80, 80), max_overlap=0.0, max_accept=15)
    assert labels.max() == len(centres) <= 15
    # With no overlap allowed, every accepted polygon is whole: its label's area equals its own raster area.
    for k in range(1, labels.max() + 1):
        assert (labels == k).sum() >= 8


def test_place_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="offsets"):
        place_polygons(np.zeros((4, 2)), np.array([0, 3]), (10, 10))
    with pytest.raises(ValueError, match="max_overlap"):
        place_polygons(np.zeros((4, 2)), np.array([0, 4]), (10, 10), max_overlap=2.0)
    with pytest.raises(ValueError, match="finite"):
        place_polygons(np.full((4, 2), np.nan), np.array([0, 4]), (10, 10))


def _paint_inputs(rng: np.random.Generator, h: int, w: int) -> tuple[list, dict]:
    n = 6
    labels = rng.integers(0, n + 1, (h, w)).astype(np.int32)
    labels[rng.random((h, w)) < 0.3] = 0
    big = rng.standard_normal((h + 7, w + 9)).astype(np.float32)
    args = [
        rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
        labels,
        rng.integers(0, n + 1, (h, w)).astype(np.uint16),
        rng.integers(0, 3, (h, w)).astype(np.uint8),
        rng.integers(0, 256, (h, w)).astype(np.uint8),
        rng.integers(0, 256, (h, w)).astype(np.uint8),
        rng.uniform(0, 1, (h, w)).astype(np.float32),
        rng.uniform(0.1, 2.5, n + 1).astype(np.float32),
        rng.random(n + 1) < 0.5,
        big[3 : 3 + h, 5 : 5 + w],  # a crop: rows spaced apart (non-contiguous)
        rng.standard_normal((h, w)).astype(np.float32),
        rng.uniform(0.0, 1.0, (h, w)).astype(np.float32),  # the gain field: a smooth bank crop in [0, 1]
        rng.standard_normal((h, w)).astype(np.float32),
    ]
    # Every parameter drawn, over the ranges the recipe uses (gain_range 0.67-1.33, rim 0-0.6, ...).
    lo = rng.uniform(0.4, 1.0)
    kw = {
        "stain": rng.uniform(0.2, 0.8, 3).astype(np.float32),
        "gain_lo": lo,
        "gain_span": rng.uniform(0.0, 1.0),
        "contrast": rng.uniform(0.1, 0.45),
        "thin_threshold": rng.normal(0, 0.5),
        "clear_factor": rng.uniform(0.2, 0.5),
        "rim_gain": 1.0 + rng.uniform(0, 0.6),
        "nuclear_jitter": rng.uniform(0.96, 1.04, 3).astype(np.float32),
        "global_jitter": rng.uniform(0.96, 1.04, 3).astype(np.float32),
        "extra": rng.uniform(0, 0.5, (h, w)).astype(np.float32),
    }
    return args, kw


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), h=st.integers(1, 40), w=st.integers(1, 40))
def test_paint_matches_reference(seed: int, h: int, w: int) -> None:
    args, kw = _paint_inputs(np.random.default_rng(seed), h, w)
    fast = paint_nuclei(*args, **kw)
    slow = paint_nuclei_reference(*args, **kw)
    diff = np.abs(fast.astype(int) - slow.astype(int))
    assert diff.max() <= 1  # float32 rounding at a quantisation boundary, at most one level
    assert (diff > 0).mean() <= 0.01


def test_paint_without_nuclei_returns_the_background() -> None:
    rng = np.random.default_rng(0)
    args, kw = _paint_inputs(rng, 20, 30)
    args[1] = np.zeros((20, 30), np.int32)
    args[2] = np.zeros((20, 30), np.uint16)
    kw.update(extra=None, global_jitter=None)
    np.testing.assert_array_equal(paint_nuclei(*args, **kw), args[0])


def test_paint_rejects_bad_labels() -> None:
    args, kw = _paint_inputs(np.random.default_rng(1), 8, 8)
    args[1] = np.full((8, 8), 99, np.int32)
    with pytest.raises(ValueError, match="labels must lie"):
        paint_nuclei(*args, **kw)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**64 - 1), k=st.integers(0, 40), smooth=st.integers(0, 2), warp=st.booleans())
def test_draw_nuclei_matches_reference(seed: int, k: int, smooth: int, warp: bool) -> None:
    import cv2

    from pysynth.synth.place import draw_nuclei, draw_nuclei_reference

    rng = np.random.default_rng(seed % 2**32)
    tissue = rng.random((60, 64)) < 0.7
    homography = None
    if warp:
        src = np.array([[0, 0], [64, 0], [64, 60], [0, 60]], np.float32)
        homography = cv2.getPerspectiveTransform(src, src + rng.uniform(-9, 9, (4, 2)).astype(np.float32))
    kw = {"smooth_rounds": smooth, "max_overlap": 0.15, "max_accept": 12, "size_factor": 0.8}
    labels, centres = draw_nuclei(seed, k, tissue, homography, **kw)
    ref_labels, ref_centres = draw_nuclei_reference(seed, k, tissue, homography, **kw)
    # Vertices agree to the last bits (libm cos/sin); a pixel centre exactly on an edge could differ.
    assert (labels != ref_labels).mean() <= 0.001
    assert labels.max() == ref_labels.max() <= 12
    np.testing.assert_allclose(centres, ref_centres, atol=0.05)


def test_draw_nuclei_follows_tissue_and_size() -> None:
    from pysynth.synth.place import draw_nuclei

    nowhere = np.zeros((80, 80), bool)
    assert draw_nuclei(1, 100, nowhere)[0].max() == 0
    left = np.zeros((80, 80), bool)
    left[:, :30] = True
    labels, centres = draw_nuclei(1, 200, left, radius=(5.0, 6.0), smooth_rounds=2)
    assert len(centres) > 5
    assert (centres[:, 0] < 30 + 8).all()  # centres in tissue, shapes reach at most a radius beyond
    areas = np.bincount(labels.ravel())[1:]
    assert np.median(areas) == pytest.approx(np.pi * 5.5**2, rel=0.35)


def test_kernels_release_the_gil(assert_releases_gil) -> None:
    from pysynth.synth.place import draw_nuclei

    rng = np.random.default_rng(0)
    big = np.ones((2000, 2000), bool)
    assert_releases_gil(lambda: draw_nuclei(3, 20000, big, radius=(8.0, 13.0)))
    args, kw = _paint_inputs(rng, 1500, 1500)
    assert_releases_gil(lambda: paint_nuclei(*args, **kw, check_labels=False))

from __future__ import annotations

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pysynth.synth.inpaint import inpaint, inpaint_reference


def blob_mask(rng: np.random.Generator, shape_hw: tuple[int, int], n: int, max_radius: int = 12) -> np.ndarray:
    mask = np.zeros(shape_hw, np.uint8)
    for _ in range(n):
        centre = (int(rng.integers(0, shape_hw[1])), int(rng.integers(0, shape_hw[0])))
        cv2.circle(mask, centre, int(rng.integers(1, max_radius)), 1, -1)
    return mask


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    h=st.integers(1, 70),
    w=st.integers(1, 70),
    texture=st.sampled_from([0.0, 0.5, 1.0]),
    levels=st.integers(0, 3),
)
def test_matches_reference(seed: int, h: int, w: int, texture: float, levels: int) -> None:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    mask = blob_mask(rng, (h, w), int(rng.integers(0, 6)))
    if mask.all():
        mask[0, 0] = 0
    kwargs = {"texture": texture, "texture_levels": levels, "seed": seed}
    out = inpaint(image, mask.astype(bool), **kwargs)
    ref = inpaint_reference(image, mask, **kwargs)
    assert np.abs(out.astype(int) - ref).max() <= 1
    np.testing.assert_array_equal(out[mask == 0], image[mask == 0])


def test_real_tissue_fill_is_plausible(monuseg_tile: np.ndarray) -> None:
    """On real tissue: the fill has the surroundings' colour and texture, neither flat nor noisy."""
    image = monuseg_tile[:256, :256].copy()
    rng = np.random.default_rng(1)
    mask = blob_mask(rng, (256, 256), 25, 10).astype(bool)
    smooth = inpaint(image, mask, texture=0)
    textured = inpaint(image, mask, seed=3)
    np.testing.assert_array_equal(textured[~mask], image[~mask])
    ring = cv2.dilate(mask.astype(np.uint8), np.ones((7, 7), np.uint8)).astype(bool) & ~mask
    # Mean colour of the fill close to that of the ring around the holes.
    assert np.abs(textured[mask].mean(0) - image[ring].mean(0)).max() < 25

    def detail(img: np.ndarray) -> float:
        grey = img.mean(axis=2)
        return float(
            np.abs(grey - cv2.blur(grey, (3, 3)))[cv2.erode(mask.astype(np.uint8), np.ones((3, 3))) > 0].mean()
        )

    known = np.abs(image.mean(2) - cv2.blur(image.mean(2), (3, 3)))[~mask].mean()
    assert detail(smooth) < 0.5 * known  # push-pull alone: flat blobs
    assert 0.4 * known < detail(textured) < 2.0 * known  # texture transplant restores tissue-like detail


def test_seeded_and_trivial_masks() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    mask = blob_mask(rng, (40, 50), 4)
    np.testing.assert_array_equal(inpaint(image, mask, seed=5), inpaint(image, mask, seed=5))
    empty = inpaint(image, np.zeros((40, 50), bool))
    np.testing.assert_array_equal(empty, image)
    assert empty is not image
    one_known = np.ones((40, 50), bool)
    one_known[3, 4] = False
    assert (inpaint(image, one_known) == image[3, 4]).all()


def test_non_contiguous() -> None:
    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)
    mask = blob_mask(rng, (60, 80), 5) * 255
    view, mview = image[::2, ::-1], mask[::2, ::-1]
    assert np.abs(inpaint(view, mview, seed=1).astype(int) - inpaint_reference(view, mview, seed=1)).max() <= 1


@pytest.mark.parametrize(
    ("image", "mask", "kwargs", "match"),
    [
        (np.zeros((8, 8, 3), np.float32), np.zeros((8, 8), bool), {}, "image must be"),
        (np.zeros((8, 8), np.uint8), np.zeros((8, 8), bool), {}, "image must be"),
        (np.zeros((8, 8, 3), np.uint8), np.zeros((8, 9), bool), {}, "mask must have"),
        (np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), np.float32), {}, "bool or uint8"),
        (np.zeros((8, 8, 3), np.uint8), np.ones((8, 8), bool), {}, "whole image"),
        (np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), bool), {"texture": -1.0}, "texture must be"),
        (np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), bool), {"texture_levels": 1.5}, "texture_levels"),
    ],
)
def test_rejects_bad_input(image, mask, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        inpaint(image, mask, **kwargs)


def test_releases_gil(assert_releases_gil) -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (2000, 2000, 3), dtype=np.uint8)
    mask = blob_mask(rng, (2000, 2000), 2000, 15)
    assert_releases_gil(lambda: inpaint(image, mask, seed=0))

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pysynth.synth.composite import composite_nuclei, composite_nuclei_reference


def random_inputs(seed: int, h: int, w: int):
    rng = np.random.default_rng(seed)
    fg = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    bg = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    mask = np.clip(rng.normal(0.3, 0.6, (h, w)), 0, 1).astype(np.float32)
    sharpness = rng.random((h, w)).astype(np.float32)
    return fg, bg, mask, sharpness


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    h=st.integers(1, 40),
    w=st.integers(1, 40),
    with_sharpness=st.booleans(),
    sigmas=st.sampled_from([(0.5, 1.5), (0.0, 2.0), (1.0, 0.0), (0.3, 4.0)]),
)
def test_matches_reference(seed: int, h: int, w: int, with_sharpness: bool, sigmas: tuple[float, float]) -> None:
    fg, bg, mask, sharpness = random_inputs(seed, h, w)
    kwargs = {"sigma_sharp": sigmas[0], "sigma_soft": sigmas[1]}
    s = sharpness if with_sharpness else None
    out = composite_nuclei(fg, bg, mask, s, **kwargs)
    ref = composite_nuclei_reference(fg, bg, mask, s, **kwargs)
    assert np.abs(out.astype(int) - ref).max() <= 1  # float32 vs float64 only at exact halves


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), h=st.integers(1, 30), w=st.integers(1, 30), value=st.sampled_from([0, 1]))
def test_constant_mask_gives_one_image_exactly(seed: int, h: int, w: int, value: int) -> None:
    fg, bg, _, sharpness = random_inputs(seed, h, w)
    mask = np.full((h, w), value, np.float32)
    out = composite_nuclei(fg, bg, mask, sharpness, sigma_sharp=0.7, sigma_soft=3.0)
    np.testing.assert_array_equal(out, fg if value else bg)


def test_sharpness_controls_the_boundary() -> None:
    fg = np.zeros((40, 40, 3), np.uint8)
    bg = np.full((40, 40, 3), 200, np.uint8)
    mask = np.zeros((40, 40), np.float32)
    mask[:, 20:] = 1
    sharp = composite_nuclei(fg, bg, mask, np.ones_like(mask))[20, :, 0].astype(int)
    soft = composite_nuclei(fg, bg, mask, np.zeros_like(mask))[20, :, 0].astype(int)
    np.testing.assert_array_equal(sharp, composite_nuclei(fg, bg, mask)[20, :, 0])  # None means sharp
    ramp = lambda row: int(((row > 5) & (row < 195)).sum())  # noqa: E731
    assert ramp(sharp) < ramp(soft)
    assert ramp(soft) >= 4


def test_bool_mask_and_non_contiguous() -> None:
    fg, bg, mask, sharpness = random_inputs(1, 30, 40)
    args = (fg[:, ::-1], bg[::2].repeat(2, axis=0), mask > 0.5, np.asfortranarray(sharpness))
    assert np.abs(composite_nuclei(*args).astype(int) - composite_nuclei_reference(*args)).max() <= 1


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"foreground": np.zeros((8, 8, 3), np.float32)}, "foreground must be"),
        ({"background": np.zeros((8, 9, 3), np.uint8)}, "shapes differ"),
        ({"mask": np.zeros((8, 8), np.uint8)}, "bool or float"),
        ({"mask": np.zeros((9, 8), np.float32)}, "mask must have shape"),
        ({"sharpness": np.zeros((8, 8), np.int32)}, "sharpness must be"),
        ({"sigma_soft": -1.0}, "sigma_soft must be"),
        ({"sigma_sharp": 100.0}, "sigma_sharp must be"),
    ],
)
def test_rejects_bad_input(change: dict, match: str) -> None:
    args = {
        "foreground": np.zeros((8, 8, 3), np.uint8),
        "background": np.zeros((8, 8, 3), np.uint8),
        "mask": np.zeros((8, 8), np.float32),
        "sharpness": None,
    }
    args.update(change)
    with pytest.raises(ValueError, match=match):
        composite_nuclei(**args)


def test_releases_gil(assert_releases_gil) -> None:
    fg, bg, mask, sharpness = random_inputs(0, 2500, 2500)
    assert_releases_gil(lambda: composite_nuclei(fg, bg, mask, sharpness, sigma_soft=3.0))

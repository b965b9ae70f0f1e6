from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from skimage.color import hed2rgb, rgb2hed

from pysynth.synth.deconv import (
    HED_FROM_RGB,
    RGB_FROM_HED,
    hed_to_rgb,
    hed_to_rgb_reference,
    rgb_to_hed,
    rgb_to_hed_reference,
)

EVERY_COLOUR_CHANNEL = np.stack(np.meshgrid(np.arange(256), [0, 77, 255], [3, 128, 254], indexing="ij"), -1)


def test_stain_matrix_is_scikit_images() -> None:
    from skimage.color import hed_from_rgb, rgb_from_hed

    np.testing.assert_array_equal(RGB_FROM_HED, rgb_from_hed)
    np.testing.assert_allclose(HED_FROM_RGB, hed_from_rgb, rtol=1e-12, atol=1e-15)
    with pytest.raises(ValueError, match="read-only"):
        RGB_FROM_HED[0, 0] = 1


def test_rgb_to_hed_matches_skimage_and_reference() -> None:
    rgb = EVERY_COLOUR_CHANNEL.astype(np.uint8)
    rgb = np.concatenate([rgb, rgb[..., ::-1], rgb[..., [1, 0, 2]]])
    hed = rgb_to_hed(rgb)
    assert hed.dtype == np.float32
    assert hed.shape == rgb.shape
    np.testing.assert_allclose(hed, rgb2hed(rgb), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(hed, rgb_to_hed_reference(rgb), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(rgb_to_hed_reference(rgb), rgb2hed(rgb), rtol=1e-12, atol=1e-15)


@settings(max_examples=50, deadline=None)
@given(
    arrays(
        np.float32,
        st.tuples(st.integers(1, 9), st.integers(1, 9), st.just(3)),
        elements=st.floats(-1, 4, width=32),
    )
)
def test_hed_to_rgb_matches_reference_and_skimage(hed: np.ndarray) -> None:
    rgb = hed_to_rgb(hed)
    ref = hed_to_rgb_reference(hed)
    assert rgb.dtype == np.uint8
    # float32 arithmetic vs float64: at most 1 grey level, only where the value is within a hair of .5.
    assert np.abs(rgb.astype(int) - ref).max() <= 1
    np.testing.assert_allclose(rgb / 255.0, hed2rgb(hed), atol=0.5 / 255 + 1e-4)


def test_round_trip_on_real_tissue(monuseg_tile: np.ndarray) -> None:
    tile = monuseg_tile[:300, :300]
    hed = rgb_to_hed(tile)
    grey = tile.mean(axis=2)
    nuclei, stroma = grey < np.percentile(grey, 5), grey > np.percentile(grey, 50)
    assert hed[..., 0][nuclei].mean() > 2 * hed[..., 0][stroma].mean()  # dark nuclei carry the hematoxylin
    # Densities clipped at 0 lose some colours; most pixels of real tissue come back within 1 grey level.
    diff = np.abs(hed_to_rgb(hed).astype(int) - tile)
    assert np.mean(diff <= 1) > 0.9


def test_custom_matrix_and_non_contiguous() -> None:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    view = np.asfortranarray(rgb)[::2, 1::3]
    matrix = HED_FROM_RGB @ np.diag([1.0, 2.0, 0.5])
    np.testing.assert_allclose(
        rgb_to_hed(view, hed_from_rgb=matrix),
        rgb_to_hed_reference(view, hed_from_rgb=matrix),
        rtol=1e-5,
        atol=1e-6,
    )
    hed = rgb_to_hed_reference(rgb).transpose(1, 0, 2)[::3]
    assert np.abs(hed_to_rgb(hed).astype(int) - hed_to_rgb_reference(hed)).max() <= 1


@pytest.mark.parametrize(
    ("fn", "arg", "kwargs", "match"),
    [
        (rgb_to_hed, np.zeros((4, 4, 3), np.float32), {}, "rgb must be a uint8"),
        (rgb_to_hed, np.zeros((4, 4, 4), np.uint8), {}, r"shape \(\.\.\., 3\)"),
        (rgb_to_hed, np.zeros((4, 4, 3), np.uint8), {"hed_from_rgb": np.eye(2)}, "3 x 3"),
        (hed_to_rgb, np.zeros((4, 4, 2), np.float32), {}, r"shape \(\.\.\., 3\)"),
        (hed_to_rgb, np.zeros((4, 4, 3), np.complex64), {}, "real"),
        (hed_to_rgb, np.zeros((4, 3), np.float32), {"rgb_from_hed": np.full((3, 3), np.nan)}, "finite"),
    ],
)
def test_rejects_bad_input(fn, arg, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        fn(arg, **kwargs)


def test_releases_gil(assert_releases_gil) -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (3000, 3000, 3), dtype=np.uint8)
    assert_releases_gil(lambda: rgb_to_hed(rgb))

"""Tissue masks on real tissue, and exact region fractions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pysynth.io import ArrayReader, TissueMask, compute_tissue_mask, open_slide, tissue_mask_from_rgb


def test_bundled_slide_tissue_fraction(sample_slide: Path) -> None:
    with open_slide(sample_slide) as slide:
        tissue = compute_tissue_mask(slide)
    # Checked by eye on the outline drawn over the thumbnail (pysynth sample --preview): the tissue strip
    # covers a little under 40% of this crop; the glass on the left and the debris specks are excluded.
    assert 0.30 < tissue.fraction < 0.45
    h0, w0 = 2967, 2220
    assert tissue.scale == pytest.approx(max(h0 / tissue.mask.shape[0], w0 / tissue.mask.shape[1]))
    # Left margin (glass) is background; the centre of the strip is tissue.
    assert tissue.region_fraction(0, 0, 300, 300) < 0.02
    assert tissue.region_fraction(1100, 2400, 300, 300) > 0.95
    assert tissue.area_um2() == pytest.approx(tissue.fraction * h0 * w0 * 0.499**2, rel=0.02)


def test_all_white_and_all_tissue() -> None:
    white = ArrayReader(np.full((400, 400, 3), 255, np.uint8), mpp=0.25)
    assert not compute_tissue_mask(white).mask.any()
    # Glass with faint noise is still glass.
    noise = np.random.default_rng(0).integers(235, 256, (400, 400, 3), dtype=np.uint8)
    assert not compute_tissue_mask(ArrayReader(noise, mpp=0.25)).mask.any()


def test_real_tiles_are_all_tissue(shared_data: Path) -> None:
    from pysynth.io import load_rgb

    for path in sorted((shared_data / "monuseg-train" / "images").glob("*.png"))[:6]:
        mask = tissue_mask_from_rgb(load_rgb(path)[::4, ::4], mpp=1.0)
        assert mask.mean() > 0.9, path.name


def test_tissue_and_glass_halves(tissue_rgb: np.ndarray) -> None:
    image = np.full((300, 600, 3), 245, np.uint8)
    image[:, 300:] = tissue_rgb[:300, :300]  # right half real tissue from the bundled slide
    image[:, 300:][(tissue_rgb[:300, :300] > 230).all(axis=2)] = 200  # no glass inside the tissue half
    mask = tissue_mask_from_rgb(image, mpp=1.0)
    assert mask[:, :290].mean() < 0.01
    assert mask[:, 310:].mean() > 0.95


@st.composite
def masks_and_rects(draw: st.DrawFn) -> tuple[np.ndarray, float, tuple[float, float, float, float]]:
    h, w = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    bits = draw(st.lists(st.booleans(), min_size=h * w, max_size=h * w))
    scale = draw(st.sampled_from([1.0, 2.0, 3.5]))
    x = draw(st.floats(-3, w * scale))
    y = draw(st.floats(-3, h * scale))
    rw = draw(st.floats(0.5, w * scale))
    rh = draw(st.floats(0.5, h * scale))
    return np.array(bits, bool).reshape(h, w), scale, (x, y, rw, rh)


@settings(max_examples=200, deadline=None)
@given(masks_and_rects())
def test_region_fraction_is_exact(args: tuple) -> None:
    mask, scale, (x, y, w, h) = args
    tissue = TissueMask(mask, scale=scale, mpp=1.0)
    # Brute force: overlap area of the rectangle with each tissue pixel's square.
    area = 0.0
    for i, j in zip(*np.nonzero(mask), strict=True):
        ox = max(0.0, min(x + w, (j + 1) * scale) - max(x, j * scale))
        oy = max(0.0, min(y + h, (i + 1) * scale) - max(y, i * scale))
        area += ox * oy
    assert float(tissue.region_fraction(x, y, w, h)) == pytest.approx(area / (w * h), abs=1e-9)


def test_tissue_mask_validates() -> None:
    with pytest.raises(ValueError, match="bool"):
        TissueMask(np.zeros((3, 3), np.uint8), scale=1.0, mpp=1.0)

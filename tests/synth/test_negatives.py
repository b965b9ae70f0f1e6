"""Unlabelled hard negatives (red cells, fibres, pigment): their colours, placement clear of nuclei, determinism."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from pysynth.synth.config import SynthConfig
from pysynth.synth.negatives import PIGMENT, RED_CELL, negative_bank, paint_negatives
from pysynth.synth.source import optical_density

STAIN = np.array([0.65, 0.70, 0.29], np.float32) / np.linalg.norm([0.65, 0.70, 0.29])


def _canvas(size: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """A flat pale-pink patch with three square labelled nuclei."""
    image = np.full((size, size, 3), (230, 200, 215), np.uint8)
    labels = np.zeros((size, size), np.uint16)
    for k, (y, x) in enumerate([(30, 30), (100, 120), (150, 40)], start=1):
        labels[y : y + 20, x : x + 20] = k
    return image, labels


def _added(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    return optical_density(after) - optical_density(before)


def test_off_by_default_and_rates_validated() -> None:
    config = SynthConfig()
    assert (config.red_cell_rate, config.fibre_rate, config.pigment_rate) == (0.0, 0.0, 0.0)
    image, labels = _canvas()
    assert paint_negatives(np.random.default_rng(0), image, labels, STAIN, config) is image
    with pytest.raises(ValueError, match="fibre_rate"):
        SynthConfig(fibre_rate=-1.0)


@pytest.mark.parametrize(("kind", "colour"), [("red_cell_rate", RED_CELL), ("pigment_rate", PIGMENT)])
def test_each_kind_is_painted_in_its_own_colour_clear_of_nuclei(kind: str, colour: np.ndarray) -> None:
    image, labels = _canvas()
    config = replace(SynthConfig(size=200), **{kind: 40.0})
    out = paint_negatives(np.random.default_rng(1), image, labels, STAIN, config)
    delta = _added(image, out)
    changed = np.abs(delta).sum(axis=2) > 0.05
    assert changed.mean() > 0.02  # something was painted
    np.testing.assert_array_equal(out[labels > 0], image[labels > 0])  # nuclei untouched, labels not needed
    # The added optical density points along the kind's colour, not along the nuclear stain.
    mean = delta[changed].mean(axis=0)
    mean /= np.linalg.norm(mean)
    assert float(mean @ colour) > 0.97
    assert float(mean @ colour) > float(mean @ STAIN) + 0.05


def test_fibres_are_thin_and_long() -> None:
    for sprite in negative_bank(0.25)["fibre"][:10]:
        mask = sprite > 0.3
        ys, xs = np.nonzero(mask)
        extent = max(np.ptp(ys), np.ptp(xs))
        assert extent >= 10.0 / 0.25 * 0.8  # at least about 10 µm long
        assert mask.sum() < 0.5 * extent * extent  # a strand, not a blob


def test_deterministic_and_resolution_aware() -> None:
    image, labels = _canvas()
    config = SynthConfig(size=200, red_cell_rate=5.0, fibre_rate=5.0, pigment_rate=5.0)
    a = paint_negatives(np.random.default_rng(7), image, labels, STAIN, config)
    b = paint_negatives(np.random.default_rng(7), image, labels, STAIN, config)
    np.testing.assert_array_equal(a, b)
    # Red cells are 6-8 µm across at any resolution: half the pixels at 0.5 µm/px.
    fine = max(s.shape[0] for s in negative_bank(0.25)["red_cell"])
    coarse = max(s.shape[0] for s in negative_bank(0.5)["red_cell"])
    assert coarse == pytest.approx(fine / 2, abs=2)


def test_patches_carry_negatives_without_new_labels(sample_slide) -> None:
    from pysynth.io import open_slide, read_region
    from pysynth.synth.recipe import synthesize_patch
    from pysynth.synth.source import prepare_source

    with open_slide(sample_slide) as slide:
        tile = read_region(slide, 1000, 2100, (600, 600), 0.25)
    plain = SynthConfig(size=160)
    source = prepare_source(tile, plain, "bundled")
    with_negatives = replace(plain, red_cell_rate=20.0, fibre_rate=20.0, pigment_rate=20.0)
    a = synthesize_patch(source, np.random.default_rng(3), plain)
    b = synthesize_patch(source, np.random.default_rng(3), with_negatives)
    np.testing.assert_array_equal(a.labels, b.labels)  # the same nuclei, no label for a negative
    assert (a.image != b.image).any(axis=2).mean() > 0.01
    np.testing.assert_array_equal(a.image[a.labels > 0], b.image[b.labels > 0])

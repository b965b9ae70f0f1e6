"""Synthetic lymphocytes: their share, size in µm, roundness, darkness, classes, and the class targets."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from pysynth.shape import shape_features
from pysynth.synth.config import SynthConfig
from pysynth.synth.lymphocytes import LYMPHOCYTE, OTHER, UNKNOWN, lymphocyte_count
from pysynth.synth.recipe import synthesize_patch
from pysynth.synth.source import optical_density, prepare_source
from pysynth.train.targets import class_targets


@pytest.fixture(scope="module")
def source(sample_slide: Path):
    from pysynth.io import open_slide, read_region

    with open_slide(sample_slide) as slide:
        tile = read_region(slide, 1000, 2100, (600, 600), 0.25)
    return prepare_source(tile, SynthConfig(size=200), "bundled")


def _patches(source, config: SynthConfig, n: int = 24):
    return [synthesize_patch(source, np.random.default_rng(1000 + i), config) for i in range(n)]


def test_no_lymphocytes_when_off(source) -> None:
    assert SynthConfig().lymphocyte_fraction == 0.25  # on by default: datasets carry lymphocytes
    config = SynthConfig(size=200, lymphocyte_fraction=0.0)
    assert lymphocyte_count(np.random.default_rng(0), 50, config) == 0
    for patch in _patches(source, config, 6):
        assert patch.classes.dtype == np.uint8
        assert len(patch.classes) == len(patch.centres)
        assert (patch.classes == OTHER).all()
    with pytest.raises(ValueError, match="lymphocyte_fraction"):
        SynthConfig(lymphocyte_fraction=1.5)


def test_lymphocytes_are_small_round_dark_and_labelled(source) -> None:
    config = SynthConfig(size=200, lymphocyte_fraction=0.5)
    lym_area, other_area, lym_circ, other_circ, lym_od, other_od = [], [], [], [], [], []
    share = []
    for patch in _patches(source, config):
        labels = patch.labels.astype(np.int32)
        n = int(labels.max())
        assert len(patch.classes) == len(patch.centres) == n
        if n == 0:
            continue
        share.append(float((patch.classes == LYMPHOCYTE).mean()))
        features = shape_features(labels, config.mpp)
        od = optical_density(patch.image).sum(axis=2)
        counts = np.bincount(labels.ravel(), minlength=n + 1)
        mean_od = np.bincount(labels.ravel(), weights=od.ravel(), minlength=n + 1) / np.maximum(counts, 1)
        # Whole nuclei only (away from the patch edge): cut ones are neither round nor of their full size.
        ys, xs = np.nonzero(labels)
        touches = np.zeros(n + 1, bool)
        edge = (ys < 2) | (xs < 2) | (ys > 197) | (xs > 197)
        touches[labels[ys[edge], xs[edge]]] = True
        for k in range(1, n + 1):
            if touches[k] or counts[k] < 30:
                continue
            is_lym = patch.classes[k - 1] == LYMPHOCYTE
            (lym_area if is_lym else other_area).append(counts[k] * config.mpp**2)
            (lym_circ if is_lym else other_circ).append(features.circularity[k])
            (lym_od if is_lym else other_od).append(mean_od[k])
    assert 0.15 < np.mean(share) < 0.85  # the configured mean share, Beta-spread per patch
    assert len(lym_area) > 20
    assert len(other_area) > 20
    # About 6.5 µm across: 33 µm² (a mild oblique cut makes some smaller).
    assert 20.0 < np.median(lym_area) < 45.0
    assert np.median(lym_circ) > np.median(other_circ)
    assert np.median(lym_od) > np.median(other_od)
    # The other nuclei keep their whole size range, small ones included: size alone is not the class.
    assert np.percentile(other_area, 10) < np.median(lym_area)


def test_transplanted_nuclei_have_no_class(source) -> None:
    # A synthetic patch with transplanted real nuclei marks them unknown: no class loss on them.
    from pysynth.synth.guide import NucleusBank

    mask = np.zeros((20, 20), bool)
    mask[4:16, 4:16] = True
    bank = NucleusBank(np.array([[20, 20, 0]], np.int64), np.full(20 * 20 * 3, 0.3, np.float16), mask.ravel().copy())
    banked = replace(source, bank=bank)
    config = replace(SynthConfig(size=200, lymphocyte_fraction=0.3), guide="plain", transplant_fraction=0.5)
    seen = False
    for patch in _patches(banked, config, 8):
        assert len(patch.classes) == len(patch.centres) == int(patch.labels.max())
        seen |= bool((patch.classes == UNKNOWN).any())
    assert seen


def test_class_targets_cover_known_nuclei_only() -> None:
    labels = np.zeros((10, 10), np.int32)
    labels[1:4, 1:4] = 1  # other
    labels[5:8, 5:8] = 2  # lymphocyte
    labels[0, 8:] = 3  # unknown (transplanted)
    lymphocyte, known = class_targets(labels, np.array([OTHER, LYMPHOCYTE, UNKNOWN], np.uint8))
    assert lymphocyte.sum() == 9
    assert (lymphocyte[labels == 2] == 1).all()
    assert known.sum() == 18
    assert (known[labels == 3] == 0).all()
    assert (known[labels == 0] == 0).all()
    lymphocyte, known = class_targets(labels, None)  # pseudo-labelled crops: nothing known
    assert lymphocyte.sum() == 0
    assert known.sum() == 0

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


def _disc_tile() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Instances at 0.25 µm/px: six reference nuclei (7 µm, densities 0.3–0.8), then the nuclei under test."""
    import cv2

    labels = np.zeros((240, 360), np.int32)
    darkness = np.zeros(labels.shape, np.float32)
    shapes = [((30 + 55 * k, 30), (14, 14), 0.3 + 0.1 * k) for k in range(6)]  # 7 µm, mid density
    shapes += [
        ((40, 120), (11, 11), 1.0),  # 5.5 µm, round, dark: lymphocyte
        ((120, 120), (11, 11), 0.2),  # 5.5 µm, round, pale: unknown
        ((200, 120), (16, 6), 1.0),  # small and dark but elongated: unknown
        ((280, 130), (20, 20), 1.0),  # 10 µm: wider than any section of a 6 µm sphere: other
        ((60, 200), (15, 15), 1.0),  # 7.5 µm: between the bounds: unknown
        ((160, 200), (4, 4), 1.0),  # 2 µm: too small to tell: unknown
    ]
    for label, (centre, axes, density) in enumerate(shapes, start=1):
        mask = np.zeros(labels.shape, np.uint8)
        cv2.ellipse(mask, centre, axes, 0, 0, 360, 1, -1)
        labels[mask > 0] = label
        darkness[mask > 0] = density
    sure = np.zeros(len(shapes) + 1, bool)
    sure[1:7] = True
    return labels, darkness, sure


def test_real_nuclei_are_classed_by_size_shape_and_density() -> None:
    from pysynth.synth.lymphocytes import real_nucleus_classes

    labels, darkness, sure = _disc_tile()
    codes = real_nucleus_classes(labels, darkness, sure, SynthConfig())
    assert codes.dtype == np.uint8
    assert codes.shape == (13,)
    assert codes[0] == UNKNOWN
    assert codes[7] == LYMPHOCYTE
    assert codes[8] == UNKNOWN  # pale
    assert codes[9] == UNKNOWN  # not round
    assert codes[10] == OTHER  # too wide
    assert codes[11] == UNKNOWN
    assert codes[12] == UNKNOWN
    # The 7 µm references are within the lymphocyte sizes (≤ 7.2 µm) and round: the darkest two (0.7, 0.8; the
    # 0.75 quantile is 0.675) are lymphocytes, the others too pale.
    assert codes[1:7].tolist() == [UNKNOWN] * 4 + [LYMPHOCYTE] * 2
    # The bounds are in µm: at 0.5 µm/px the same pixels are twice as wide, and every disc but the 2 µm one
    # (then 4 µm, round and dark) is wider than any lymphocyte section.
    coarse = real_nucleus_classes(labels, darkness, sure, SynthConfig(mpp=0.5))
    assert coarse[10] == OTHER
    assert coarse[7] == OTHER
    assert coarse[12] == LYMPHOCYTE
    # A larger prior moves the bounds with it.
    big = real_nucleus_classes(labels, darkness, sure, SynthConfig(lymphocyte_diameter=(11.0, 1.0)))
    assert big[10] == LYMPHOCYTE


def test_real_nuclei_need_a_reference_density() -> None:
    from pysynth.synth.lymphocytes import real_nucleus_classes

    labels, darkness, sure = _disc_tile()
    sure[5:] = False  # four sure nuclei: no reference
    assert (real_nucleus_classes(labels, darkness, sure, SynthConfig()) == UNKNOWN).all()
    empty = real_nucleus_classes(np.zeros((50, 50), np.int32), np.zeros((50, 50), np.float32), sure[:1], SynthConfig())
    assert empty.tolist() == [UNKNOWN]


def test_transplanted_nuclei_carry_their_banked_class(source, tmp_path: Path) -> None:
    # prepare_source with a guide's instances and transplant_classes banks each real nucleus with its class; the
    # prepared tile keeps them on disk, and the synthetic patches give the transplants those classes.
    from pysynth.synth.generate import _prepare_one, load_sources
    from pysynth.synth.guide import GuideMaps

    labels, darkness, sure = _disc_tile()
    tile = np.ascontiguousarray(np.broadcast_to(np.array([235, 215, 230], np.uint8), (*labels.shape, 3)))
    od = (darkness[..., None] * np.array([0.65, 0.70, 0.29], np.float32)).astype(np.float32)
    rgb = np.clip(tile * np.exp(-od), 0, 255).astype(np.uint8)
    guide = GuideMaps(
        segmentation=(labels > 0).astype(np.float32),
        labels=labels,
        confidence=np.where(sure, 0.95, 0.9).astype(np.float32),
    )
    config = replace(
        SynthConfig(size=200, lymphocyte_fraction=0.0), guide="plain", transplant_fraction=0.5, transplant_classes=True
    )
    prepared = prepare_source(rgb, config, "discs", guide)
    assert prepared.bank is not None
    assert prepared.bank.classes is not None
    assert len(prepared.bank.classes) == len(prepared.bank)
    assert LYMPHOCYTE in prepared.bank.classes.tolist()
    assert OTHER in prepared.bank.classes.tolist()
    folder = tmp_path / "ds" / "sources"
    folder.mkdir(parents=True)
    _prepare_one(("discs", rgb, config.to_dict(), str(folder / "00000.npz"), guide))
    (folder / "sources.json").write_text('{"names": ["discs"]}')
    (loaded,) = load_sources(tmp_path / "ds")
    assert loaded.bank.classes.tolist() == prepared.bank.classes.tolist()
    # Without transplant_classes the same tile's bank has no classes, and its transplants stay unknown.
    plain = prepare_source(rgb, replace(config, transplant_classes=False), "discs", guide)
    assert plain.bank is not None
    assert plain.bank.classes is None
    # Transplants into the bundled tile's patches take the banked class of the nucleus pasted.
    banked = replace(source, bank=loaded.bank)
    kinds = set()
    for patch in _patches(banked, config, 8):
        assert len(patch.classes) == len(patch.centres) == int(patch.labels.max())
        kinds |= set(patch.classes.tolist())
    assert LYMPHOCYTE in kinds  # only transplants can be lymphocytes: lymphocyte_fraction is 0
    assert kinds <= set(loaded.bank.classes.tolist()) | {OTHER}

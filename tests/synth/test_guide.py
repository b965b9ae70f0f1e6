"""Guided synthesis: a model decides what is inpainted, sure nuclei set the darkness floor and fill the bank of
real nuclei that patches carry; empty patches are exactly the configured share."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest

from pysynth.instances import instance_confidence
from pysynth.synth.config import SynthConfig
from pysynth.synth.guide import GuideMaps, NucleusBank, bounding_boxes, guide_maps, nucleus_bank
from pysynth.synth.recipe import synthesize_patch, transplant_nuclei
from pysynth.synth.source import optical_density, prepare_source


def _disc_tile() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A pink tile with 9 dark purple discs (nuclei) and 9 pale purple discs (cytoplasm-like); their label maps."""
    rng = np.random.default_rng(3)
    rgb = np.empty((300, 300, 3), np.uint8)
    rgb[:] = (236, 200, 218)
    rgb = np.clip(rgb + rng.normal(0, 3, rgb.shape), 0, 255).astype(np.uint8)
    dark = np.zeros((300, 300), np.int32)
    pale = np.zeros((300, 300), np.int32)
    for k in range(9):
        y, x = 40 + 100 * (k // 3), 30 + 100 * (k % 3)
        cv2.circle(dark, (x, y), 11, k + 1, -1)
        cv2.circle(pale, (x + 45, y + 35), 13, k + 1, -1)
    rgb[pale > 0] = (200, 160, 205)
    rgb[dark > 0] = (70, 40, 120)
    return rgb, dark, pale


def _guide_of(labels: np.ndarray, confidence: float = 0.95) -> GuideMaps:
    seg = np.where(labels > 0, 0.97, 0.02).astype(np.float32)
    conf = np.full(int(labels.max()) + 1, confidence, np.float32)
    conf[0] = 0
    return GuideMaps(seg, labels.astype(np.int32), conf)


def test_config_needs_a_guide_for_transplants() -> None:
    with pytest.raises(ValueError, match="guide"):
        SynthConfig(transplant_fraction=0.2)
    with pytest.raises(ValueError, match="guide_tta"):
        SynthConfig(guide="default", guide_tta=3)
    config = SynthConfig(guide="default", transplant_fraction=0.3, darkness_floor=0.1)
    assert SynthConfig.from_dict(config.to_dict()) == config


def test_guided_background_keeps_what_the_guide_does_not_call_a_nucleus() -> None:
    rgb, dark, pale = _disc_tile()
    config = SynthConfig(size=128)
    plain = prepare_source(rgb, config)
    guided = prepare_source(rgb, config, guide=_guide_of(dark))
    inner_pale = cv2.erode((pale > 0).astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
    # The plain super-segmentation takes the pale purple discs for nuclear material and paints them away ...
    assert plain.super_mask[inner_pale].mean() > 0.9
    # ... the guided one leaves them in the background, pixel for pixel, as negatives; the nuclei still go.
    assert not guided.super_mask[inner_pale].any()
    assert np.array_equal(guided.background[inner_pale], rgb[inner_pale])
    assert guided.super_mask[dark > 0].all()
    od_dark = optical_density(guided.background)[dark > 0].sum(axis=1).mean()
    assert od_dark < 0.5 * optical_density(rgb)[dark > 0].sum(axis=1).mean()


def test_darkness_floor_comes_from_the_sure_real_nuclei() -> None:
    rgb, dark, _ = _disc_tile()
    # Nuclei of graded darkness: the guide is sure of all of them.
    for k in range(1, 10):
        rgb[dark == k] = (70 + 12 * k, 40 + 12 * k, 120 + 8 * k)
    guide = _guide_of(dark)
    config = SynthConfig(size=128, darkness_floor=0.3)
    src = prepare_source(rgb, config, guide=guide)
    od, od_bg = optical_density(rgb), optical_density(src.background)
    along = (od - od_bg) @ src.stain
    real = np.array([along[dark == k].mean() for k in range(1, 10)])
    assert src.darkness_min == pytest.approx(np.quantile(real, 0.3), rel=1e-5)
    assert src.darkness.min() >= src.darkness_min
    # Every labelled nucleus of a patch is painted at least that dark, jitter included.
    patch_config = SynthConfig(size=128, darkness_floor=0.3, empty_fraction=0.0, darkness_jitter=0.5)
    off = prepare_source(rgb, SynthConfig(size=128), guide=guide)
    assert off.darkness_min == 0.0
    for seed in range(5):
        a = synthesize_patch(src, np.random.default_rng(seed), patch_config)
        b = synthesize_patch(replace(src, darkness_min=0.0), np.random.default_rng(seed), patch_config)
        assert np.array_equal(a.labels, b.labels)  # the floor changes only how dark, never where
        inside = a.labels > 0
        if inside.any():
            assert optical_density(a.image)[inside].sum() >= optical_density(b.image)[inside].sum() - 1e-3


def test_nucleus_bank_takes_sure_isolated_whole_nuclei() -> None:
    labels = np.zeros((120, 160), np.int32)
    cv2.circle(labels, (30, 30), 8, 1, -1)  # sure, isolated: banked
    cv2.circle(labels, (80, 30), 8, 2, -1)  # unsure: not banked
    cv2.circle(labels, (2, 90), 8, 3, -1)  # touches the edge: not banked
    cv2.circle(labels, (100, 90), 8, 4, -1)  # neighbour 5 within reach: neither banked
    cv2.circle(labels, (119, 90), 8, 5, -1)
    cv2.circle(labels, (140, 40), 3, 6, -1)  # too small
    confidence = np.array([0, 0.95, 0.5, 0.95, 0.95, 0.95, 0.95], np.float32)
    guide = GuideMaps(np.zeros(labels.shape, np.float32), labels, confidence)
    od_bg = np.full((*labels.shape, 3), 0.2, np.float32)
    od = od_bg + (labels == 1)[..., None] * np.array([0.5, 0.7, 0.3], np.float32)
    bank = nucleus_bank(od, od_bg, guide, confident=0.8)
    assert len(bank) == 1
    delta, mask = bank.get(0)
    assert mask.sum() == (labels == 1).sum()
    assert np.allclose(delta[mask], [0.5, 0.7, 0.3], atol=1e-3)
    assert np.allclose(delta[~mask], 0.0, atol=1e-3)
    top, left, bottom, right = bounding_boxes(labels, 6)
    ys, xs = np.nonzero(labels == 4)
    assert (top[4], left[4], bottom[4], right[4]) == (ys.min(), xs.min(), ys.max() + 1, xs.max() + 1)


def test_transplanted_nuclei_carry_their_own_density_and_mask(rng: np.random.Generator) -> None:
    disc = np.zeros((25, 25), bool)
    cv2.circle(disc.view(np.uint8), (12, 12), 8, 1, -1)
    delta = np.zeros((25, 25, 3), np.float32)
    delta[disc] = (0.6, 0.8, 0.3)
    bank = NucleusBank(np.array([[25, 25, 0]]), delta.astype(np.float16).ravel(), disc.ravel())
    image = np.full((128, 128, 3), 210, np.uint8)
    labels = np.zeros((128, 128), np.uint16)
    cv2.circle(labels, (64, 64), 10, 1, -1)
    centres = np.array([[64.5, 64.5]], np.float32)
    tissue = np.ones((128, 128), bool)
    out, new_labels, new_centres, used = transplant_nuclei(rng, image, labels, centres, tissue, bank, 6)
    ids = np.unique(new_labels)
    assert len(ids) - 2 == len(new_centres) - 1 >= 4  # the old nucleus and at least 4 new ones
    assert used == [0] * (len(new_centres) - 1)  # the bank's one nucleus, once per paste
    assert np.array_equal(new_labels == 1, labels == 1)
    od_before, od_after = optical_density(image), optical_density(out)
    for k in ids[2:]:
        mask = new_labels == k
        assert mask.sum() == disc.sum()
        core = cv2.erode(mask.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
        added = (od_after - od_before)[core].mean(axis=0)
        assert np.allclose(added, (0.6, 0.8, 0.3), atol=0.05)
        ys, xs = np.nonzero(mask)
        assert np.allclose(new_centres[k - 1], (xs.mean() + 0.5, ys.mean() + 0.5), atol=1e-3)
    # nuclei keep 2 px apart, and far from them the patch is unchanged
    grown = cv2.dilate((new_labels > 0).astype(np.uint8), np.ones((9, 9), np.uint8)) > 0
    assert np.array_equal(out[~grown], image[~grown])
    for k in ids[1:]:
        ring = cv2.dilate((new_labels == k).astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
        assert set(np.unique(new_labels[ring])) <= {0, int(k)}


def test_empty_patches_are_the_configured_share(monuseg_tile: np.ndarray) -> None:
    config = SynthConfig(size=240, count_per_400=(55.0, 25.0), empty_fraction=0.1)
    src = prepare_source(monuseg_tile[:600, :600], config)
    sparse = replace(src, density=config.reference_density * 0.4)  # the low end of density adaptation
    empty = [synthesize_patch(sparse, np.random.default_rng(i), config).labels.max() == 0 for i in range(400)]
    # 10% wanted: 40 of 400 expected, sd 6 (clipping the count at 0 made 103 of these 400 empty)
    assert 20 <= sum(empty) <= 60


@pytest.mark.slow
def test_shipped_model_guides_a_real_tile(monuseg_tile: np.ndarray) -> None:
    tile = np.ascontiguousarray(monuseg_tile[:400, :400])
    guide = guide_maps("default", tile, 0.25, tta=2)
    assert guide.labels.shape == tile.shape[:2]
    assert guide.labels.max() > 20
    mean_seg, _ = instance_confidence(guide.labels, np.zeros_like(guide.segmentation), guide.segmentation)
    assert np.allclose(guide.confidence, mean_seg, atol=1e-6)
    config = SynthConfig(size=128, guide="default", darkness_floor=0.1, transplant_fraction=0.5)
    src = prepare_source(tile, config, guide=guide)
    assert src.bank is not None
    assert len(src.bank) >= 5
    assert src.darkness_min > 0
    patches = [synthesize_patch(src, np.random.default_rng(i), replace(config, empty_fraction=0.0)) for i in range(6)]
    assert sum(int(p.labels.max()) for p in patches) == sum(len(p.centres) for p in patches) > 0


def test_guide_must_be_a_model(tmp_path: Path) -> None:
    from pysynth.errors import PysynthError

    with pytest.raises(PysynthError, match="not a model folder"):
        guide_maps(str(tmp_path), np.zeros((64, 64, 3), np.uint8), 0.25)

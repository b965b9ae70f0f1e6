"""The synthesis recipe on real tissue: preparation of a tile, patches, determinism, density adaptation."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from pysynth.synth.config import SynthConfig
from pysynth.synth.recipe import synthesize_patch
from pysynth.synth.source import HED_FROM_RGB, optical_density, prepare_source, segment_nuclear_material


@pytest.fixture(scope="module")
def real_tile(sample_slide: Path) -> np.ndarray:
    """A 600×600 tissue region of the bundled 20x slide, read at 40x (0.25 µm/px)."""
    from pysynth.io import open_slide, read_region

    with open_slide(sample_slide) as slide:
        return read_region(slide, 1000, 2100, (600, 600), 0.25)


@pytest.fixture(scope="module")
def source(real_tile: np.ndarray):
    return prepare_source(real_tile, SynthConfig(size=128), "bundled")


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="max_overlap"):
        SynthConfig(max_overlap=1.5)
    with pytest.raises(ValueError, match="vertices"):
        SynthConfig(vertices=(17, 10))
    with pytest.raises(ValueError, match="unknown synthesis parameter"):
        SynthConfig.from_dict({"sizee": 3})
    config = SynthConfig(size=96, radius=(7.0, 9.0))
    assert SynthConfig.from_dict(config.to_dict()) == config


def test_super_segmentation_contains_the_nuclear_material(real_tile: np.ndarray) -> None:
    otsu, super_mask, sub_mask, density, _ = segment_nuclear_material(real_tile, SynthConfig())
    assert 0.02 < density < 0.6
    assert (otsu & ~super_mask).sum() <= 0.01 * otsu.sum()  # super ⊇ Otsu (up to the 2x2 opening)
    assert (sub_mask & ~otsu).sum() == 0  # sub ⊆ Otsu
    assert super_mask.sum() > 1.08 * otsu.sum()


def test_prepared_background_has_no_nuclei(real_tile: np.ndarray, source) -> None:
    hema = lambda rgb: optical_density(rgb) @ HED_FROM_RGB[:, 0].astype(np.float32)  # noqa: E731
    inside = source.super_mask
    # The inpainted background is much lighter in hematoxylin where the nuclei were, and unchanged elsewhere.
    assert hema(source.background)[inside].mean() < 0.6 * hema(real_tile)[inside].mean()
    np.testing.assert_array_equal(source.background[~inside], real_tile[~inside])
    assert np.linalg.norm(source.stain) == pytest.approx(1.0, abs=1e-5)
    assert (np.diff(source.darkness) >= 0).all()
    assert source.darkness[0] > 0
    assert source.texture.std() == pytest.approx(1.0, abs=0.01)


def test_patch_contract(source) -> None:
    config = SynthConfig(size=128)
    for seed in range(12):
        patch = synthesize_patch(source, np.random.default_rng(seed), config)
        assert patch.image.shape == (128, 128, 3)
        assert patch.image.dtype == np.uint8
        assert patch.labels.shape == (128, 128)
        assert patch.labels.dtype == np.uint16
        n = int(patch.labels.max())
        assert patch.centres.shape == (n, 2)
        present = np.unique(patch.labels)
        assert set(present[present > 0]) == set(range(1, n + 1))  # consecutive labels, none empty
        for k in range(1, n + 1):
            ys, xs = np.nonzero(patch.labels == k)
            np.testing.assert_allclose(patch.centres[k - 1], [xs.mean() + 0.5, ys.mean() + 0.5], atol=1e-3)
        rx, ry = patch.reference_xy
        assert 0 <= rx <= 600 - 128
        assert 0 <= ry <= 600 - 128
        # Nuclei are darker in hematoxylin than the background around them.
        if n:
            hema = optical_density(patch.image) @ HED_FROM_RGB[:, 0].astype(np.float32)
            assert hema[patch.labels > 0].mean() > hema[patch.labels == 0].mean()


def test_same_seed_same_patch(source) -> None:
    config = SynthConfig(size=128)
    a = synthesize_patch(source, np.random.default_rng(5), config)
    b = synthesize_patch(source, np.random.default_rng(5), config)
    c = synthesize_patch(source, np.random.default_rng(6), config)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert not np.array_equal(a.image, c.image)


def test_nuclei_only_in_tissue_and_density_adapts(source) -> None:
    config = SynthConfig(size=128, empty_fraction=0.0)
    no_tissue = replace(source, tissue=np.zeros_like(source.tissue))
    assert synthesize_patch(no_tissue, np.random.default_rng(0), config).labels.max() == 0

    def mean_count(src) -> float:
        return np.mean([synthesize_patch(src, np.random.default_rng(i), config).labels.max() for i in range(40)])

    sparse = replace(source, density=config.reference_density * 0.4)
    dense = replace(source, density=config.reference_density * 2.5)
    assert mean_count(dense) > 2 * mean_count(sparse)


def test_empty_fraction_and_sizes(source) -> None:
    config = SynthConfig(size=200, empty_fraction=0.0, count_per_400=(50.0, 0.0), adapt_density=False)
    patches = [synthesize_patch(source, np.random.default_rng(i), config) for i in range(10)]
    counts = [int(p.labels.max()) for p in patches]
    assert min(counts) >= 5  # ~12 wanted per 200² patch; tissue and overlap limits drop some
    areas = np.concatenate([np.bincount(p.labels.ravel())[1:] for p in patches])
    # Published size prior: R = U(8.5, 13) px x N(1.33, 0.32): median area of a few hundred px at 40x.
    assert 150 < np.median(areas) < 1500

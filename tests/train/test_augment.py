"""Augmentation: labels move with pixels, stain jitter is colour deconvolution, randomness is the caller's."""

from __future__ import annotations

import numpy as np
import pytest

from pysynth.train.augment import AugmentConfig, augment, stain_jitter

GEOMETRY_ONLY = AugmentConfig(stain_scale=0, stain_shift=0, blur_p=0, noise_p=0, stretch_p=1.0)


def _scene(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    labels = np.zeros((120, 100), np.int32)
    image = np.full((120, 100, 3), 230, np.uint8)
    for k in range(1, 9):
        y, x = rng.integers(10, 100), rng.integers(10, 80)
        labels[y - 6 : y + 6, x - 5 : x + 5] = k
    image[labels > 0] = (60, 40, 120)
    return image, labels


def test_stain_jitter_identity_and_direction(tissue_rgb: np.ndarray) -> None:
    same = stain_jitter(tissue_rgb, np.ones(2), np.zeros(2))
    assert np.abs(same.astype(int) - tissue_rgb).max() <= 2
    darker_h = stain_jitter(tissue_rgb, np.array([1.5, 1.0]), np.zeros(2))
    # More hematoxylin: darker overall, most of all in red (hematoxylin absorbs red strongly).
    assert darker_h.mean() < tissue_rgb.mean()
    drop = tissue_rgb.astype(float).mean(axis=(0, 1)) - darker_h.astype(float).mean(axis=(0, 1))
    assert drop[0] > drop[2]


@pytest.mark.parametrize("seed", range(6))
def test_geometry_keeps_labels_on_their_pixels(seed: int) -> None:
    rng = np.random.default_rng(seed)
    image, labels = _scene(rng)
    out, lab, valid = augment(image, labels, np.random.default_rng(seed + 100), GEOMETRY_ONLY, 96)
    assert out.shape == (96, 96, 3)
    assert lab.shape == (96, 96)
    assert valid.shape == (96, 96)
    inside = (lab > 0) & (valid > 0)
    assert inside.any()
    # Nuclear pixels stay dark and background pixels light (interpolation only blurs the boundary).
    assert out[inside][:, 0].mean() < 90
    assert out[(lab == 0) & (valid > 0)][:, 0].mean() > 180
    assert set(np.unique(lab)) <= set(np.unique(labels))


def test_padding_is_marked_invalid() -> None:
    image, labels = _scene(np.random.default_rng(0))
    cfg = AugmentConfig(
        scale=(0.5, 0.5), flips=False, rot90=False, stain_scale=0, stain_shift=0, blur_p=0, noise_p=0, stretch_p=0
    )
    _out, lab, valid = augment(image, labels, np.random.default_rng(0), cfg, 96)
    assert valid[:60, :50].all()
    assert not valid[70:].any()
    assert not valid[:, 60:].any()
    assert not lab[valid == 0].any()


def test_same_generator_same_result_and_config_checks() -> None:
    image, labels = _scene(np.random.default_rng(1))
    a = augment(image, labels, np.random.default_rng(7), AugmentConfig(), 64)
    b = augment(image, labels, np.random.default_rng(7), AugmentConfig(), 64)
    c = augment(image, labels, np.random.default_rng(8), AugmentConfig(), 64)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not np.array_equal(a[0], c[0])
    with pytest.raises(ValueError, match="scale"):
        AugmentConfig(scale=(1.2, 0.8))
    with pytest.raises(ValueError, match="unknown"):
        AugmentConfig.from_dict({"hue": 0.1})


def test_stretch_elongates_round_nuclei_and_keeps_their_area() -> None:
    labels = np.zeros((160, 160), np.int32)
    yy, xx = np.mgrid[:160, :160]
    labels[(yy - 80) ** 2 + (xx - 80) ** 2 <= 15**2] = 1
    image = np.where(labels[..., None] > 0, 60, 230).astype(np.uint8).repeat(3, axis=2)
    cfg = AugmentConfig(
        scale=(1.0, 1.0), flips=False, rot90=False, stain_scale=0, stain_shift=0, blur_p=0, noise_p=0,
        stretch_p=1.0, stretch=3.0,
    )  # fmt: skip
    ratios = []
    for seed in range(8):
        _, lab, _ = augment(image, labels, np.random.default_rng(seed), cfg, 160)
        ys, xs = np.nonzero(lab == 1)
        assert abs(len(ys) - (labels == 1).sum()) < 0.08 * (labels == 1).sum()  # area kept
        eig = np.linalg.eigvalsh(np.cov(np.stack([xs, ys]).astype(float)))
        ratios.append(np.sqrt(eig[1] / eig[0]))
    assert max(ratios) > 1.3  # some draws elongate clearly
    assert min(ratios) < max(ratios)
    assert all(r < 3.2 for r in ratios)  # never beyond the configured ratio

"""Patches stored coarser than synthesis (``SynthConfig.output_mpp``): made where the parameters are calibrated,
area-averaged down, labels by block majority; and a model trained on them that works at that resolution."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from pysynth.synth.config import SynthConfig
from pysynth.synth.recipe import block_majority, downsample_patch, synthesize_patch
from pysynth.synth.store import item_rng


def _slow_majority(labels: np.ndarray, f: int) -> np.ndarray:
    """Block by block: the most frequent label; ties to a nucleus on even (row + column), else to the other."""
    h, w = labels.shape[0] // f, labels.shape[1] // f
    out = np.zeros((h, w), labels.dtype)
    for i in range(h):
        for j in range(w):
            values, counts = np.unique(labels[i * f : (i + 1) * f, j * f : (j + 1) * f], return_counts=True)
            tied = values[counts == counts.max()]
            if len(tied) == 1:
                out[i, j] = tied[0]
                continue
            nuclei = [v for v in tied if v != 0]
            others = [v for v in tied if v == 0]
            block = labels[i * f : (i + 1) * f, j * f : (j + 1) * f].ravel().tolist()
            first = min(nuclei, key=block.index) if nuclei else None
            if (i + j) % 2 == 0:
                out[i, j] = first if first is not None else tied[0]
            else:
                out[i, j] = others[0] if others else min(tied.tolist(), key=block.index)
    return out


@pytest.mark.parametrize("factor", [2, 3])
def test_block_majority_matches_a_block_by_block_count(rng, factor):
    for _ in range(5):
        labels = rng.integers(0, 4, (6 * factor + 1, 5 * factor)).astype(np.uint16)
        np.testing.assert_array_equal(block_majority(labels, factor), _slow_majority(labels, factor))


def test_block_majority_keeps_areas_on_average(rng):
    # Discs of random radii and positions: the coarse area (x4) is within 1% of the fine one in total.
    fine = np.zeros((800, 800), np.uint16)
    for k in range(1, 200):
        cx, cy, r = rng.uniform(10, 790), rng.uniform(10, 790), rng.uniform(3, 12)
        cv2.circle(fine, (int(cx * 16), int(cy * 16)), int(r * 16), int(k), -1, shift=4)
    coarse = block_majority(fine, 2)
    assert abs((coarse > 0).sum() * 4 / (fine > 0).sum() - 1) < 0.01


def test_config_output_mpp_is_an_integer_multiple_and_left_out_when_unset():
    cfg = SynthConfig(size=100, output_mpp=0.5)
    assert (cfg.factor, cfg.synth_size, cfg.model_mpp) == (2, 200, 0.5)
    assert cfg.to_dict()["output_mpp"] == 0.5
    assert SynthConfig.from_dict(cfg.to_dict()) == cfg
    plain = SynthConfig()
    assert (plain.factor, plain.synth_size, plain.model_mpp) == (1, plain.size, plain.mpp)
    assert "output_mpp" not in plain.to_dict()  # earlier configurations keep their identity
    for bad in (0.3, 0.1, 0.6):
        with pytest.raises(ValueError, match="output_mpp"):
            SynthConfig(output_mpp=bad)


def test_patch_is_the_fine_patch_downsampled(tissue_rgb):
    from pysynth.synth.source import prepare_source

    big = cv2.resize(tissue_rgb, None, fx=2, fy=2, interpolation=cv2.INTER_CUBIC)  # ~0.25 µm/px
    fine_cfg = SynthConfig(size=160, lymphocyte_fraction=0.3)
    coarse_cfg = SynthConfig(size=80, output_mpp=0.5, lymphocyte_fraction=0.3)
    source = prepare_source(big, fine_cfg, "t", None)
    seen = 0
    for i in range(6):
        fine = synthesize_patch(source, item_rng(3, i), fine_cfg)
        patch = synthesize_patch(source, item_rng(3, i), coarse_cfg)
        assert patch.image.shape == (80, 80, 3)
        assert patch.labels.shape == (80, 80)
        np.testing.assert_array_equal(patch.image, cv2.resize(fine.image, (80, 80), interpolation=cv2.INTER_AREA))
        n = int(patch.labels.max())
        assert sorted(np.unique(patch.labels[patch.labels > 0]).tolist()) == list(range(1, n + 1))
        assert len(patch.centres) == len(patch.classes) == n
        # Each coarse nucleus is the block majority of one fine nucleus, with that nucleus' class.
        coarse = block_majority(fine.labels, 2)
        for k in range(1, n + 1):
            olds = np.unique(coarse[patch.labels == k])
            assert len(olds) == 1
            assert patch.classes[k - 1] == fine.classes[int(olds[0]) - 1]
            ys, xs = np.nonzero(patch.labels == k)
            np.testing.assert_allclose(patch.centres[k - 1], [xs.mean() + 0.5, ys.mean() + 0.5], atol=1e-4)
        seen += n
    assert seen > 20
    assert downsample_patch(fine, 1) is fine


def test_training_with_output_mpp_gives_a_model_at_that_resolution(run_cli, tmp_path: Path, tissue_rgb, tiny_train):
    real = tmp_path / "real.png"
    cv2.imwrite(str(real), cv2.cvtColor(tissue_rgb, cv2.COLOR_RGB2BGR))
    config = {**tiny_train, "synth": {**tiny_train["synth"], "output_mpp": 0.5}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    model = tmp_path / "m"
    args = ["train", "--real", str(real), "--input-mpp", "0.5", "--out", str(model), "--steps", "3"]
    result = run_cli(*args, "--config", str(tmp_path / "c.yaml"))
    assert result.code == 0, result.err
    meta = json.loads((model / "model.json").read_text())
    assert meta["mpp"] == 0.5
    seg = run_cli("segment", str(real), "--model", str(model), "--input-mpp", "0.5", "--out", str(tmp_path / "s"))
    assert seg.code == 0, seg.err
    labels = cv2.imread(str(tmp_path / "s" / "real_labels.png"), cv2.IMREAD_UNCHANGED)
    assert labels.shape == tissue_rgb.shape[:2]  # on the image's own grid, no resampling at 0.5 µm/px
    gan = run_cli(
        *args[:-4], "--out", str(tmp_path / "g"), "--steps", "2", "--config", str(tmp_path / "c.yaml"), "--gan"
    )
    assert gan.code != 0
    assert "Traceback" not in gan.err
    assert "output_mpp" in gan.error_lines()[0]

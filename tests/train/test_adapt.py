"""Adaptation: pseudo-labels keep only what the teacher is sure of, the loss ignores the rest, rounds resume."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from pysynth.instances import InstanceConfig
from pysynth.train.adapt import AdaptConfig, MixedSource, pseudo_labels
from pysynth.train.config import TrainConfig
from pysynth.train.loop import VAL_OFFSET, item_targets
from pysynth.train.targets import IGNORE_LABEL


def _maps() -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Detection and segmentation maps of four discs: sure, unsure, doubted, and a middling haze."""
    det = np.zeros((160, 160), np.float32)
    seg = np.full((160, 160), 0.02, np.float32)
    discs = {}
    for name, (x, y), p in (("sure", (30, 30), 0.95), ("unsure", (90, 30), 0.65), ("doubted", (30, 100), 0.3)):
        mask = np.zeros((160, 160), np.uint8)
        cv2.circle(mask, (x, y), 10, 1, -1)
        seg[mask > 0] = p
        cv2.circle(det, (x, y), 3, 1.0, -1)
        discs[name] = mask > 0
    haze = np.zeros((160, 160), np.uint8)
    cv2.rectangle(haze, (100, 100), (140, 140), 1, -1)
    seg[haze > 0] = 0.18  # below the foreground threshold, above the background threshold
    discs["haze"] = haze > 0
    return det, seg, discs


def test_pseudo_labels_keep_what_the_teacher_is_sure_of() -> None:
    det, seg, discs = _maps()
    instances = InstanceConfig(detection_threshold=0.5, foreground_threshold=0.25, min_size=10)
    config = AdaptConfig(sure=0.8, negative_below=0.5, background_below=0.15, ring=2)
    labels, stats = pseudo_labels(det, seg, instances, config)
    sure = labels[discs["sure"]]
    assert len(np.unique(sure)) == 1
    assert 0 < sure[0] < IGNORE_LABEL  # one labelled nucleus
    inner = cv2.erode(discs["unsure"].astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
    assert (labels[inner] == IGNORE_LABEL).all()  # unsure: ignored ...
    ring = cv2.dilate(discs["unsure"].astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
    assert (labels[ring] == IGNORE_LABEL).mean() > 0.95  # ... with a ring around it
    doubted = cv2.erode(discs["doubted"].astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
    assert (labels[doubted] == 0).all()  # the teacher's own doubt: background
    assert (labels[discs["haze"]] == IGNORE_LABEL).all()  # middling pixels: ignored
    far = np.zeros_like(labels, bool)
    far[70:90, 120:160] = True
    assert (labels[far] == 0).all()
    assert stats["sure"] == 1
    assert stats["negatives"] == 1
    assert stats["objects"] == 3
    assert 0 < stats["labelled"] < 1
    # the model's own minimum confidence does not hide objects from the pseudo-labels: the same labels
    strict = InstanceConfig(detection_threshold=0.5, foreground_threshold=0.25, min_size=10, min_confidence=0.9)
    assert np.array_equal(pseudo_labels(det, seg, strict, config)[0], labels)
    # without negatives the doubted object is ignored instead
    labels2, _ = pseudo_labels(det, seg, instances, AdaptConfig(negative_below=0.0))
    assert (labels2[doubted] == IGNORE_LABEL).all()
    assert stats["dye"] == 0  # no image given: no dye test


def test_pseudo_labels_make_marking_dye_background_however_sure_the_teacher_is() -> None:
    det, seg, discs = _maps()
    instances = InstanceConfig(detection_threshold=0.5, foreground_threshold=0.25, min_size=10)
    config = AdaptConfig(sure=0.8, negative_below=0.5, background_below=0.15, ring=2)
    rgb = np.full((160, 160, 3), 235, np.uint8)
    rgb[discs["sure"]] = (60, 40, 130)  # a hematoxylin-purple nucleus: kept
    labels, stats = pseudo_labels(det, seg, instances, config, rgb)
    assert stats["sure"] == 1
    assert stats["dye"] == 0
    rgb[discs["sure"]] = (40, 120, 125)  # the same object in teal ink: background, not a nucleus
    labels, stats = pseudo_labels(det, seg, instances, config, rgb)
    inner = cv2.erode(discs["sure"].astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
    assert (labels[inner] == 0).all()
    assert stats["sure"] == 0
    assert stats["dye"] == 1
    assert stats["negatives"] == 2  # the doubted disc and the dye


def test_ignored_pixels_have_no_loss_weight() -> None:
    labels = np.zeros((64, 64), np.int32)
    cv2.circle(labels, (20, 20), 8, 1, -1)
    labels[40:60, 40:60] = IGNORE_LABEL
    config = TrainConfig(border=0)
    det, seg, weights = item_targets(labels, np.float32(1.0), config)
    assert (weights[40:60, 40:60] == 0).all()
    assert (seg[40:60, 40:60] == 0).all()
    assert (det[40:60, 40:60] == 0).all()
    assert (weights[labels == 1] == 1).all()
    assert seg[20, 20] == 1


def test_mixed_source_keeps_validation_synthetic() -> None:
    source = MixedSource(lambda i: ({"kind": "synthetic"}, {}), lambda i: ({"kind": "real"}, {}), 0.5, 0, VAL_OFFSET)
    kinds = [source(i)[0]["kind"] for i in range(400)]
    assert 150 < kinds.count("real") < 250
    assert all(source(VAL_OFFSET + k)[0]["kind"] == "synthetic" for k in range(50))
    assert kinds == [source(i)[0]["kind"] for i in range(400)]  # a function of (seed, i)


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="tta"):
        AdaptConfig(tta=3)
    with pytest.raises(ValueError, match="negative_below"):
        AdaptConfig(sure=0.5, negative_below=0.7)
    with pytest.raises(ValueError, match="unknown adaptation"):
        AdaptConfig.from_dict({"roundz": 2})


@pytest.fixture(scope="module")
def real_folder(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> Path:
    folder = tmp_path_factory.mktemp("real")
    for path in sorted((shared_data / "monuseg-train" / "images").glob("*.png"))[:2]:
        cv2.imwrite(str(folder / path.name), cv2.imread(str(path))[:320, :320])
    return folder


def _tiny_config(tmp_path: Path, rounds: int = 2, min_ratio: float = 0.5) -> Path:
    path = tmp_path / "adapt.yaml"
    path.write_text(
        "batch: 2\nval_patches: 4\ncheckpoint_every: 2\n"
        f"adapt:\n  rounds: {rounds}\n  steps: 2\n  tta: 2\n  min_ratio: {min_ratio}\n"
    )
    return path


@pytest.mark.slow
def test_adapt_end_to_end_and_resume(run_cli, tmp_path: Path, real_folder: Path) -> None:
    out = tmp_path / "adapted"
    args = ["adapt", "--real", str(real_folder), "--input-mpp", "0.25", "--out", str(out)]
    result = run_cli(*args, "--config", str(_tiny_config(tmp_path)))
    assert result.code == 0, result.err
    assert "round 2:" in result.out
    rounds = json.loads((out / "rounds.json").read_text())
    assert [r["round"] for r in rounds] == [1, 2]
    assert rounds[1]["teacher"].endswith("r1/train")
    meta = json.loads((out / "model.json").read_text())
    assert meta["format"] == "pysynth-segmenter"
    assert len(meta["adapt"]["rounds"]) == 2
    weights = (out / "model.pt").read_bytes()
    assert weights == (out / "rounds" / "r2" / "train" / "model.pt").read_bytes()
    with np.load(out / "rounds" / "r1" / "pseudo" / "00000.npz") as z:
        assert (z["labels"] == IGNORE_LABEL).any()
        assert (z["labels"] == 0).any()
        assert z["labels"][z["labels"] != IGNORE_LABEL].max() > 0
    # the adapted folder is a model: segment takes it
    seg = run_cli("segment", str(real_folder), "--model", str(out), "--input-mpp", "0.25", "--out", str(tmp_path / "s"))
    assert seg.code == 0, seg.err
    # a rerun finds every round done: nothing is retrained, the result is the same
    stamp = (out / "rounds" / "r1" / "train" / "model.pt").stat().st_mtime_ns
    again = run_cli(*args, "--config", str(_tiny_config(tmp_path)))
    assert again.code == 0, again.err
    assert (out / "rounds" / "r1" / "train" / "model.pt").stat().st_mtime_ns == stamp
    assert (out / "model.pt").read_bytes() == weights
    # other settings are refused in one line, and nothing is lost
    other = run_cli(*args, "--config", str(_tiny_config(tmp_path, rounds=3)), "--seed", "1")
    assert other.code == 1
    assert len(other.error_lines()) == 1
    assert "other settings" in other.err
    assert (out / "model.pt").read_bytes() == weights


def test_collapsing_pseudo_labels_stop_the_rounds(
    run_cli, tmp_path: Path, real_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pysynth.train import adapt as adapt_module

    calls = []
    real_label_tiles = adapt_module.label_tiles

    def collapsing(*args, **kwargs):
        stats = real_label_tiles(*args, **kwargs)
        calls.append(1)
        if len(calls) == 2:  # round 2 finds a tenth of the sure nuclei
            stats = {**stats, "sure_per_tissue_mpx": stats["sure_per_tissue_mpx"] / 10}
        return stats

    monkeypatch.setattr(adapt_module, "label_tiles", collapsing)
    out = tmp_path / "collapsed"
    result = run_cli(
        "adapt", "--real", str(real_folder), "--input-mpp", "0.25", "--out", str(out),
        "--config", str(_tiny_config(tmp_path)),
    )  # fmt: skip
    assert result.code == 1
    assert len(result.error_lines()) == 1
    assert "collapsed" in result.err
    assert "round 1" in result.err
    assert (out / "rounds" / "r1" / "train" / "model.json").is_file()  # round 1's model is kept
    assert not (out / "rounds" / "r2" / "train").exists()


def test_bad_input(run_cli, tmp_path: Path) -> None:
    white = tmp_path / "white"
    white.mkdir()
    cv2.imwrite(str(white / "glass.png"), np.full((300, 300, 3), 250, np.uint8))
    out = tmp_path / "out"
    no_tissue = run_cli(
        "adapt", "--real", str(white), "--input-mpp", "0.25", "--out", str(out),
        "--config", str(_tiny_config(tmp_path)),
    )  # fmt: skip
    assert no_tissue.code == 1
    assert len(no_tissue.error_lines()) == 1
    assert "no usable real tissue" in no_tissue.err
    fake = tmp_path / "fake-model"
    fake.mkdir()
    (fake / "model.json").write_text(json.dumps({"format": "something-else"}))
    (fake / "model.pt").write_bytes(b"\0" * 64)
    not_model = run_cli("adapt", "--real", str(white), "--model", str(fake), "--out", str(tmp_path / "o2"))
    assert not_model.code == 1
    assert len(not_model.error_lines()) == 1
    assert "not a pysynth segmenter" in not_model.err
    assert not (tmp_path / "o2").exists()
    bad = tmp_path / "bad.yaml"
    bad.write_text("adapt:\n  tta: 5\n")
    bad_value = run_cli("adapt", "--real", str(white), "--config", str(bad), "--out", str(tmp_path / "o3"))
    assert bad_value.code == 2
    assert "tta" in bad_value.err


def test_overwrite_leaves_no_earlier_result_beside_the_new_settings(run_cli, tmp_path: Path) -> None:
    white = tmp_path / "white"
    white.mkdir()
    cv2.imwrite(str(white / "glass.png"), np.full((300, 300, 3), 250, np.uint8))
    out = tmp_path / "out"
    (out / "rounds" / "r1").mkdir(parents=True)
    (out / "adapt.yaml").write_text("format: pysynth-adapt\nmodel: another\n")
    for name in ("model.pt", "model.json", "rounds.json"):
        (out / name).write_text("from an earlier adaptation")
    args = ["adapt", "--real", str(white), "--input-mpp", "0.25", "--out", str(out)]
    refused = run_cli(*args, "--config", str(_tiny_config(tmp_path)))
    assert refused.code == 1
    assert "other settings" in refused.err
    assert (out / "model.pt").read_text() == "from an earlier adaptation"  # refused: nothing touched
    redo = run_cli(*args, "--config", str(_tiny_config(tmp_path)), "--overwrite")
    assert redo.code == 1
    assert "no usable real tissue" in redo.err
    # the earlier results are gone, not left to stand for the new settings
    assert not any((out / name).exists() for name in ("model.pt", "model.json", "rounds.json", "rounds"))

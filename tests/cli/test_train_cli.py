"""`pysynth train` from the command line: a tiny run end to end, and its usage errors."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import yaml


def test_tiny_run_then_segment_with_it(run_cli, tmp_path: Path, tissue_rgb: np.ndarray, tiny_train: dict) -> None:
    real = tmp_path / "real.png"
    cv2.imwrite(str(real), cv2.cvtColor(tissue_rgb, cv2.COLOR_RGB2BGR))
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(tiny_train))
    model = tmp_path / "model"
    result = run_cli(
        "train", "--real", str(real), "--input-mpp", "0.5", "--out", str(model), "--steps", "3",
        "--config", str(tmp_path / "tiny.yaml"),
    )  # fmt: skip
    assert result.code == 0, result.err
    assert "trained 3 steps" in result.out
    saved = yaml.safe_load((model / "config.yaml").read_text())
    assert saved["steps"] == 3
    assert saved["model"]["width"] == 4
    assert saved["lr"] == 3e-3
    seg = run_cli("segment", str(real), "--model", str(model), "--input-mpp", "0.5", "--out", str(tmp_path / "s"))
    assert seg.code == 0, seg.err
    assert (tmp_path / "s" / "real_labels.png").is_file()
    again = run_cli(
        "train", "--real", str(real), "--input-mpp", "0.5", "--out", str(model), "--steps", "4",
        "--config", str(tmp_path / "tiny.yaml"),
    )  # fmt: skip
    assert again.code == 1
    assert "other settings (steps)" in again.err


def test_usage_errors(run_cli, tmp_path: Path, sample_slide: Path) -> None:
    out = str(tmp_path / "m")
    neither = run_cli("train", "--out", out)
    assert neither.code == 2
    assert "--real" in neither.err
    both = run_cli("train", "--real", str(sample_slide), "--synthetic", str(tmp_path), "--out", out)
    assert both.code == 2
    missing = run_cli("train", "--real", str(tmp_path / "absent"), "--out", out)
    assert missing.code == 2
    assert "no such file" in missing.err
    (tmp_path / "bad.yaml").write_text("stepz: 3\n")
    bad_key = run_cli("train", "--real", str(sample_slide), "--out", out, "--config", str(tmp_path / "bad.yaml"))
    assert bad_key.code == 2
    assert "stepz" in bad_key.err
    (tmp_path / "bad2.yaml").write_text("crop: 100\n")
    bad_value = run_cli("train", "--real", str(sample_slide), "--out", out, "--config", str(tmp_path / "bad2.yaml"))
    assert bad_value.code == 2
    assert "crop" in bad_value.err
    not_data = run_cli("train", "--synthetic", str(tmp_path), "--out", out, "--steps", "1")
    assert not_data.code == 1
    assert "not a pysynth dataset" in not_data.err
    for result in (neither, both, missing, bad_key, bad_value, not_data):
        assert "Traceback" not in result.err
        assert len(result.error_lines()) == 1


def test_gan_run_from_the_command_line(run_cli, tmp_path: Path, tissue_rgb: np.ndarray, tiny_train: dict) -> None:
    real = tmp_path / "real.png"
    cv2.imwrite(str(real), cv2.cvtColor(tissue_rgb, cv2.COLOR_RGB2BGR))
    joint = {
        "gan": {"style_dim": 8, "style_channels": 4, "refiner_channels": 4, "refiner_blocks": 1,
                "disc_channels": 4, "disc_max_channels": 8, "disc_layers": 3},
        "seg_warmup": 1, "d_warmup": 1, "g_every": 1, "d_every": 2, "history": 4, "preview": 2,
    }  # fmt: skip
    (tmp_path / "gan.yaml").write_text(yaml.safe_dump({**tiny_train, "val_patches": 3, "joint": joint}))
    model = tmp_path / "model"
    args = ["train", "--real", str(real), "--input-mpp", "0.5", "--out", str(model), "--steps", "4"]
    result = run_cli(*args, "--config", str(tmp_path / "gan.yaml"), "--gan", "--no-hard")
    assert result.code == 0, result.err
    assert "trained 4 steps" in result.out
    for name in ("model.pt", "refiner.pt", "discriminator.pt", "refined_grid.png", "weight_histogram.png"):
        assert (model / name).is_file(), name
    assert yaml.safe_load((model / "joint.yaml").read_text())["hard"] is False
    plain = run_cli("train", "--real", str(real), "--out", str(tmp_path / "p"), "--no-importance")
    assert plain.code == 2
    assert "go with --gan" in plain.err
    section = run_cli(
        "train", "--real", str(real), "--out", str(tmp_path / "p"), "--config", str(tmp_path / "gan.yaml")
    )
    assert section.code == 2
    assert "add --gan" in section.err

"""Correct results under every allowed setting: config files are not overridden by flag defaults, and one slide
that fails for any reason fails alone."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import yaml


def _png(path: Path, rgb: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR))
    return path


def test_train_keeps_the_seed_of_its_config_unless_a_flag_says_otherwise(run_cli, tmp_path, tissue_rgb, tiny_train):
    tiny = {**tiny_train, "seed": 7}
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(tiny))
    real = _png(tmp_path / "real.png", tissue_rgb[:400, :400])
    common = ("--real", real, "--input-mpp", "0.5", "--config", config, "--steps", "1")
    assert run_cli("train", *common, "--out", tmp_path / "a").code == 0
    assert yaml.safe_load((tmp_path / "a" / "config.yaml").read_text())["seed"] == 7
    assert run_cli("train", *common, "--seed", "3", "--out", tmp_path / "b").code == 0
    assert yaml.safe_load((tmp_path / "b" / "config.yaml").read_text())["seed"] == 3


def test_synthesize_keeps_the_size_of_its_config(run_cli, tmp_path, tissue_rgb) -> None:
    real = _png(tmp_path / "real.png", tissue_rgb[:300, :300])
    (tmp_path / "c.json").write_text(json.dumps({"size": 96}))
    args = ("--source", real, "--n", "2", "--input-mpp", "0.25", "--config", tmp_path / "c.json")
    r = run_cli("synthesize", *args, "--out", tmp_path / "a")
    assert r.code == 0, r.err
    assert "patches of 96 px" in r.out
    r = run_cli("synthesize", *args, "--size", "80", "--out", tmp_path / "b")
    assert "patches of 80 px" in r.out
    r = run_cli("synthesize", "--source", real, "--n", "2", "--input-mpp", "0.25", "--out", tmp_path / "c")
    assert "patches of 200 px" in r.out  # neither: the documented default


def test_a_slide_failing_for_any_reason_fails_alone(run_cli, tmp_path, tissue_rgb, monkeypatch) -> None:
    import pysynth.infer as infer_module

    good = _png(tmp_path / "in" / "good.png", tissue_rgb[:256, :256])
    bad = _png(tmp_path / "in" / "bad.png", tissue_rgb[256:512, :256])
    real = infer_module.infer_slide

    def flaky(reader, model, info, slide_dir, **kw):
        if slide_dir.name == "bad":
            raise cv2.error("OpenCV(5.0) error: (-215:Assertion failed) !ssize.empty() in function 'resize'")
        return real(reader, model, info, slide_dir, **kw)

    monkeypatch.setattr(infer_module.run, "infer_slide", flaky)
    r = run_cli("infer", bad, good, "--input-mpp", "0.5", "--out", tmp_path / "out")
    assert r.code == 1
    assert any("bad.png: cv2.error: OpenCV(5.0) error" in line for line in r.error_lines()), r.err
    assert "Traceback" not in r.err
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert {s["name"]: s["status"] for s in run["slides"]} == {"good": "done", "bad": "failed"}


def test_an_unreadable_summary_is_reported_as_such_and_kept(run_cli, tmp_path, tissue_rgb) -> None:
    image = _png(tmp_path / "in" / "X.png", tissue_rgb[:256, :256])
    out = tmp_path / "out"
    assert run_cli("infer", image, "--input-mpp", "0.5", "--out", out).code == 0
    (out / "X" / "summary.json").write_text("{not json")
    r = run_cli("infer", image, "--input-mpp", "0.5", "--out", out)
    assert r.code == 1
    assert "summary.json: unreadable" in r.err
    assert "other settings" not in r.err
    assert (out / "X" / "summary.json").read_text() == "{not json"
    assert (out / "X" / "nuclei.geojson").exists()
    assert run_cli("infer", image, "--input-mpp", "0.5", "--out", out, "--overwrite").code == 0
    assert json.loads((out / "X" / "summary.json").read_text())["nuclei"] > 0


def test_unfinished_regions_are_not_dropped_silently(tmp_path, tissue_rgb, caplog) -> None:
    from pysynth.infer import PARTS, InferConfig, infer_slide, inference_model
    from pysynth.io import ArrayReader
    from pysynth.models.io import default_model_dir

    model, info = inference_model(str(default_model_dir()))
    reader = ArrayReader(np.ascontiguousarray(tissue_rgb[:300, :300]), 0.25)
    parts = tmp_path / "s" / PARTS
    parts.mkdir(parents=True)
    (parts / "settings.json").write_text("{broken")
    (parts / "000000.json").write_text('{"region": {}, "nuclei": []}')
    with caplog.at_level("WARNING", logger="pysynth"):
        infer_slide(reader, model, info, tmp_path / "s", config=InferConfig(), model_id="m")
    assert any(
        "redoing the 1 finished region(s)" in r.getMessage() and "unreadable" in r.getMessage() for r in caplog.records
    )
    assert (tmp_path / "s" / "summary.json").exists()

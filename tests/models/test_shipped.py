"""The models shipped inside the package, selected by name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pysynth.models.io import SHIPPED, default_model_dir, load_model, model_digest, resolve_model_dir


def test_shipped_models_resolve_by_name_and_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert resolve_model_dir(None) == default_model_dir()
    assert resolve_model_dir("default") == default_model_dir()
    digests = set()
    for name in SHIPPED:
        folder = resolve_model_dir(name)
        assert folder.parent == default_model_dir().parent
        _, info = load_model(folder)
        assert info.mpp == pytest.approx(0.5 if name == "native20x" else 0.25)
        assert (folder / "MODEL_CARD.md").is_file()
        digests.add(model_digest(folder))
    assert len(digests) == len(SHIPPED)  # different weights
    # the default was trained on synthesis guided by `plain`, as its recorded configuration says
    meta = json.loads((default_model_dir() / "model.json").read_text())
    assert meta["train"]["synth"]["guide"] == "plain"
    # `lymphocytes` has the class output, learnt with transplanted real nuclei classed label-free
    _, info = load_model(resolve_model_dir("lymphocytes"))
    assert info.has_classes
    lymph = json.loads((resolve_model_dir("lymphocytes") / "model.json").read_text())
    assert lymph["train"]["synth"]["transplant_classes"] is True
    assert meta["train"]["synth"].get("transplant_classes", False) is False
    # a folder of the user's wins over a shipped name; an unknown name is just a path
    (tmp_path / "plain").mkdir()
    assert resolve_model_dir("plain") == Path("plain")
    assert resolve_model_dir("nonesuch") == Path("nonesuch")


def test_segment_takes_a_shipped_model_by_name(run_cli, tmp_path: Path, tissue_rgb) -> None:
    import cv2

    image = tmp_path / "tile.png"
    cv2.imwrite(str(image), cv2.cvtColor(tissue_rgb[:256, :256], cv2.COLOR_RGB2BGR))
    outs = {}
    for name in SHIPPED:
        result = run_cli("segment", image, "--model", name, "--input-mpp", "0.5", "--out", tmp_path / name)
        assert result.code == 0, result.err
        outs[name] = (tmp_path / name / "tile_labels.png").read_bytes()
    assert outs["default"] != outs["plain"]
    assert outs["native20x"] != outs["default"]
    assert outs["lymphocytes"] != outs["default"]

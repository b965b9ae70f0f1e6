"""The version comparison bench: it runs another checkout's own code, and refuses what it cannot run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pysynth.bench import infer_versions


def _fake_checkout(root: Path, core: bool = True) -> Path:
    """A checkout whose bench child reports which pysynth it imported and what it was asked."""
    (root / "pysynth").mkdir(parents=True)
    (root / "bench").mkdir()
    (root / "pysynth" / "__init__.py").write_text("MARK = 'other'\n")
    if core:
        (root / "pysynth" / "_core.cpython-311-x86_64-linux-gnu.so").write_bytes(b"")
    (root / "bench" / "__init__.py").write_text("")
    (root / "bench" / "infer.py").write_text(
        "import json, sys\nimport pysynth\nimport pysynth.bench\n"
        "print('noise first')\n"
        "print(json.dumps({'mark': pysynth.MARK, 'pysynth': pysynth.__file__, 'bench': pysynth.bench.__file__,"
        " 'argv': sys.argv[1:], 'seconds': 1.5}))\n"
    )
    return root


def test_the_other_checkout_runs_its_own_code(tmp_path: Path) -> None:
    other = _fake_checkout(tmp_path / "other")
    infer_versions.check_checkout(other)
    got = infer_versions.run_child(tmp_path / "slide.tiff", tmp_path / "out", other)
    assert got["mark"] == "other"
    assert Path(got["pysynth"]).resolve() == (other / "pysynth" / "__init__.py").resolve()
    assert Path(got["bench"]).resolve() == (other / "bench" / "__init__.py").resolve()
    assert got["argv"] == [str(tmp_path / "slide.tiff"), str(tmp_path / "out")]


def test_this_checkout_runs_from_the_environment(tmp_path: Path) -> None:
    command, env, cwd = infer_versions.child_command(tmp_path / "s.tiff", tmp_path / "o", None)
    assert command[1:4] == ["-m", "pysynth.bench.infer", str(tmp_path / "s.tiff")]
    assert cwd is None
    command, env, cwd = infer_versions.child_command(tmp_path / "s.tiff", tmp_path / "o", tmp_path)
    assert "-S" in command
    assert cwd == tmp_path
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(tmp_path)
    # --keep-dye is for this checkout only (a checkout from before the dye filter knows no such option).
    command, _, _ = infer_versions.child_command(tmp_path / "s.tiff", tmp_path / "o", None, keep_dye=True)
    assert command[-1] == "--keep-dye"
    command, _, _ = infer_versions.child_command(tmp_path / "s.tiff", tmp_path / "o", tmp_path, keep_dye=True)
    assert "--keep-dye" not in command


def test_what_cannot_run_is_refused_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(infer_versions.VersionError, match="not a pysynth source checkout"):
        infer_versions.check_checkout(tmp_path)
    unbuilt = _fake_checkout(tmp_path / "unbuilt", core=False)
    with pytest.raises(SystemExit) as exit_info:
        infer_versions.main([str(unbuilt)])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("error: ")
    assert "compiled core is not built" in err[0]
    with pytest.raises(SystemExit):
        infer_versions.main([str(unbuilt), "--rounds", "0"])


def test_a_failing_child_says_who_failed(tmp_path: Path) -> None:
    other = _fake_checkout(tmp_path / "other")
    (other / "bench" / "infer.py").write_text("raise SystemExit('broken on purpose')\n")
    with pytest.raises(infer_versions.VersionError, match=r"failed \(exit 1\): broken on purpose"):
        infer_versions.run_child(tmp_path / "s.tiff", tmp_path / "o", other)


def test_joins_section_times_both_paths_and_restores_the_model() -> None:
    import numpy as np
    import torch

    from pysynth.bench.network_layout import joins
    from pysynth.models.unet import UNet, UNetConfig, fold_batchnorm

    model = fold_batchnorm(UNet(UNetConfig(width=4, depth=2, max_width=8))).to(memory_format=torch.channels_last)
    window = np.random.default_rng(0).integers(0, 256, (64, 48, 3), dtype=np.uint8)
    got = joins(model, window, rounds=2)
    assert model.fused  # restored
    assert got["pytorch_s"] > 0
    assert got["core_s"] > 0
    assert got["paired_ratio"] > 0
    assert got["max_logit_difference"] < 1e-4


def test_stage_seconds_come_from_each_versions_summary(tmp_path: Path) -> None:
    from pysynth.infer import SUMMARY

    a, b, c, d = (tmp_path / n for n in "abcd")
    for folder in (a, b, c, d):
        folder.mkdir()
    (a / SUMMARY).write_text('{"timings": {"network": 10.0, "post": 4.0, "read": 3.0}}')
    (b / SUMMARY).write_text('{"timings": {"network": 14.0, "post": 2.0, "report": 0.9, "note": "x"}}')
    (c / SUMMARY).write_text("not json")
    assert infer_versions.stage_seconds(a) == {"network": 10.0, "post": 4.0, "read": 3.0}
    assert infer_versions.stage_seconds(b) == {"network": 14.0, "post": 2.0, "report": 0.9}
    assert infer_versions.stage_seconds(c) == {}  # unreadable
    assert infer_versions.stage_seconds(d) == {}  # no summary
    runs = [infer_versions.stage_seconds(f) for f in (a, b)]
    # Medians over the runs that recorded each stage: a stage only one version has keeps its one value.
    assert infer_versions.median_stages(runs) == {"network": 12.0, "post": 3.0, "read": 3.0, "report": 0.9}

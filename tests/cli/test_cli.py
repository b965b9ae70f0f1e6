"""The command line as a user runs it: version, help, and every bad input of ``pysynth sample``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from pysynth import __version__


def test_version_and_module_entry_point() -> None:
    out = subprocess.run([sys.executable, "-m", "pysynth", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith(f"pysynth {__version__}")
    assert "C++ core: gcc" in out.stdout or "C++ core: clang" in out.stdout
    exe = Path(sys.executable).with_name("pysynth")
    if exe.exists():  # the console script of an installed package
        out = subprocess.run([str(exe), "sample", "--help"], capture_output=True, text=True, check=True)
        assert "--n-per-slide" in out.stdout


def test_installed_layout_imports() -> None:
    import pysynth.bench.harness
    import pysynth.cli
    import pysynth.kernels
    from pysynth import _core

    assert pysynth.cli.main is not None
    assert pysynth.kernels.triton_available() in (True, False)
    assert pysynth.bench.harness.measure is not None
    assert _core.build_info()["cxx_standard"] >= 17


def test_demo_command_on_the_bundled_slide(run_cli, sample_slide: Path, tmp_path: Path) -> None:
    result = run_cli("sample", sample_slide, "--out", tmp_path, "--n-per-slide", 5, "--size", 200, "--preview")
    assert result.code == 0, result.err
    assert "5 patches from 1 of 1 source(s)" in result.out
    assert len(list(tmp_path.glob("CMU-1-Small-Region_*.png"))) == 5
    sheet = cv2.imread(str(tmp_path / "contact_sheet.png"))
    overview = cv2.imread(str(tmp_path / "overview" / "CMU-1-Small-Region.png"))
    assert sheet is not None
    assert sheet.shape[0] > 100
    assert overview is not None
    assert overview.shape[0] > 500
    # Running it again resumes: nothing redone, same answer.
    again = run_cli("sample", sample_slide, "--out", tmp_path, "--n-per-slide", 5, "--size", 200)
    assert again.code == 0
    assert "already done" in again.err


@pytest.fixture
def bad_inputs(tmp_path: Path, sample_slide: Path) -> dict[str, Path]:
    files = {}
    files["fake"] = tmp_path / "renamed.svs"
    files["fake"].write_text("this is a text file, not a slide\n")
    data = sample_slide.read_bytes()
    files["truncated"] = tmp_path / "truncated.svs"
    files["truncated"].write_bytes(data[: len(data) // 3])
    files["white"] = tmp_path / "white.png"
    cv2.imwrite(str(files["white"]), np.full((600, 600, 3), 255, np.uint8))
    files["small"] = tmp_path / "small.png"
    cv2.imwrite(str(files["small"]), np.full((100, 100, 3), (160, 90, 170), np.uint8))
    files["empty_dir"] = tmp_path / "no_slides"
    files["empty_dir"].mkdir()
    (files["empty_dir"] / "readme.txt").write_text("nothing here")
    return files


@pytest.mark.parametrize(
    ("key", "extra", "code", "message"),
    [
        ("missing", [], 2, "no such file or folder"),
        ("empty_dir", [], 2, "folder holds no slides or images"),
        ("glob", [], 2, "pattern matches no slides or images"),
        ("fake", [], 1, "not a slide"),
        ("truncated", [], 1, "truncated or damaged"),
        ("white", ["--input-mpp", "0.25"], 1, "no tissue found"),
        ("white", [], 1, "pass --input-mpp"),
        ("small", ["--input-mpp", "0.25"], 1, "more than its 100 × 100 px"),
        ("slide_big", ["--size", "5000"], 1, "more than its 2220 × 2967 px"),
        ("slide", ["--n-per-slide", "0"], 2, "'--n-per-slide': 0 is not in the range"),
        ("slide", ["--n-per-slide", "-4"], 2, "'--n-per-slide': -4 is not in the range"),
        ("slide", ["--min-tissue", "2"], 2, "'--min-tissue'"),
    ],
)
def test_bad_input_gets_one_clear_line(
    run_cli,
    bad_inputs: dict[str, Path],
    sample_slide: Path,
    tmp_path: Path,
    key: str,
    extra: list[str],
    code: int,
    message: str,
) -> None:
    target = {
        "missing": tmp_path / "nope.svs",
        "glob": tmp_path / "*.ndpi",
        "slide": sample_slide,
        "slide_big": sample_slide,
    }.get(key) or bad_inputs[key]
    result = run_cli("sample", target, "--out", tmp_path / "out", "--n-per-slide", 3, *extra)
    assert result.code == code, result.err
    errors = result.error_lines()
    assert len(errors) == 1, result.err
    assert message in errors[0]
    if code == 1:
        assert Path(target).name in errors[0]  # names the file
    assert "Traceback" not in result.err


def test_good_slides_still_processed_among_bad(
    run_cli, bad_inputs: dict[str, Path], sample_slide: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    result = run_cli(
        "sample",
        bad_inputs["fake"],
        sample_slide,
        bad_inputs["white"],
        "--input-mpp",
        "0.25",
        "--out",
        out,
        "--n-per-slide",
        4,
        "--size",
        128,
    )
    assert result.code == 1
    assert "4 patches from 1 of 3 source(s)" in result.out
    assert "failed: 2 source(s)" in result.err
    errors = result.error_lines()
    assert len(errors) == 2
    assert "renamed.svs" in errors[0]
    assert "white.png" in errors[1]
    assert len(list(out.glob("CMU-1-Small-Region_*.png"))) == 4


def test_output_folder_problems(run_cli, sample_slide: Path, tmp_path: Path) -> None:
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    inside_a_file = run_cli("sample", sample_slide, "--out", a_file / "sub", "--n-per-slide", 1)
    assert inside_a_file.code == 1
    assert inside_a_file.error_lines() == [f"error: {a_file / 'sub'}: cannot create output folder (Not a directory)"]
    is_a_file = run_cli("sample", sample_slide, "--out", a_file, "--n-per-slide", 1)
    assert is_a_file.code == 2
    assert "is a file" in is_a_file.error_lines()[0]


@pytest.mark.skipif(os.geteuid() == 0 if hasattr(os, "geteuid") else True, reason="root writes anywhere")
def test_read_only_output_folder(run_cli, sample_slide: Path, tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        result = run_cli("sample", sample_slide, "--out", locked, "--n-per-slide", 1)
    finally:
        locked.chmod(0o700)
    assert result.code == 1
    assert "output folder is not writable" in result.error_lines()[0]


def test_full_disk_leaves_nothing_half_written(sample_slide: Path, tmp_path: Path, monkeypatch) -> None:
    """A write that fails (ENOSPC) ends the source with an error, and no partial PNG is left behind."""
    import errno

    import pysynth.fsutil
    from pysynth.sample import SampleConfig, sample

    real_replace = Path.replace
    calls = {"n": 0}

    def failing_replace(self: Path, target: Path) -> Path:
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(self, target)

    monkeypatch.setattr(pysynth.fsutil.Path, "replace", failing_replace)
    report = sample([sample_slide], ["slide"], tmp_path, SampleConfig(n_per_slide=5, size=64))
    assert report.failures
    assert "No space left on device" in report.failures[0].error
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".") and p.suffix == ".part"]
    assert leftovers == []
    assert sorted(p.name for p in tmp_path.glob("*.png")) == [
        "slide_0000.png",
        "slide_0001.png",
    ]  # two patches, then the failure (the run record is written when a source is finished)


def test_real_full_disk(run_cli, sample_slide: Path, small_disk) -> None:
    small_disk = small_disk("160k")
    result = run_cli("sample", sample_slide, "--out", small_disk / "out", "--n-per-slide", 40, "--size", 200)
    assert result.code == 1
    assert "No space left on device" in result.err
    assert "Traceback" not in result.err
    written = list((small_disk / "out").glob("*.png"))
    assert written, "some patches fit before the disk filled"
    for png in written:  # every file under its final name is whole
        assert cv2.imread(str(png)) is not None
    assert not [p for p in (small_disk / "out").rglob("*.part")]

"""Bad input across commands: each ends as one clear line (or a warning) and the right exit status, no traceback."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest


def _png(path: Path, rgb: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = rgb if rgb.ndim == 2 else cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    assert cv2.imwrite(str(path), image)
    return path


@pytest.fixture
def tile(tmp_path: Path, tissue_rgb: np.ndarray) -> Path:
    """A 256×256 real H&E tile (to be read at --input-mpp 0.5, as the slide it comes from)."""
    return _png(tmp_path / "in" / "tile.png", tissue_rgb[:256, :256])


def _one_clear_line(result, code: int) -> str:
    assert result.code == code, result.err
    assert "Traceback" not in result.err
    errors = result.error_lines()
    assert len(errors) == 1, result.err
    return errors[0]


# --- 1. a damaged model.pt ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["random bytes", "truncated"])
@pytest.mark.parametrize("command", ["segment", "infer"])
def test_corrupt_model_weights_are_one_line(run_cli, tmp_path: Path, tile: Path, command: str, damage: str) -> None:
    from pysynth.models.io import default_model_dir

    model = tmp_path / "model"
    shutil.copytree(default_model_dir(), model)
    weights = model / "model.pt"
    data = weights.read_bytes()
    weights.write_bytes(np.random.default_rng(7).bytes(5000) if damage == "random bytes" else data[: len(data) // 2])
    result = run_cli(command, tile, "--model", model, "--out", tmp_path / "out", "--input-mpp", "0.5")
    line = _one_clear_line(result, 1)
    assert line.endswith(f"error: {weights}: not a readable pysynth model (corrupt or truncated file)")
    assert "weights_only" not in result.err  # never the advice to unpickle an untrusted file


# --- 2. nan and inf in float options --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "args", "option", "value"),
    [
        ("sample", ["{tile}", "--out", "{out}"], "--input-mpp", "nan"),
        ("segment", ["{tile}", "--out", "{out}"], "--input-mpp", "nan"),
        ("infer", ["{tile}", "--out", "{out}"], "--input-mpp", "nan"),
        ("train", ["--real", "{tile}", "--out", "{out}"], "--input-mpp", "nan"),
        ("synthesize", ["--source", "{tile}", "--n", "1", "--out", "{out}"], "--input-mpp", "nan"),
        ("adapt", ["--real", "{tile}", "--out", "{out}"], "--input-mpp", "inf"),
        ("sample", ["{tile}", "--out", "{out}"], "--min-tissue", "inf"),
        ("sample", ["{tile}", "--out", "{out}", "--input-mpp", "0.5"], "--mpp", "-inf"),
        ("segment", ["{tile}", "--out", "{out}", "--input-mpp", "0.5"], "--min-confidence", "NaN"),
        ("evaluate", ["--pred", "{dir}", "--dots", "{dir}", "--mpp", "0.5"], "--radius-um", "inf"),
    ],
)
def test_non_finite_float_options_are_usage_errors(
    run_cli, tmp_path: Path, tile: Path, command: str, args: list[str], option: str, value: str
) -> None:
    filled = [a.format(tile=tile, out=tmp_path / "out", dir=tile.parent) for a in args]
    result = run_cli(command, *filled, option, value)
    line = _one_clear_line(result, 2)
    shown = value.lower()
    assert f"error: pysynth {command}: Invalid value for '{option}': {shown} is not a finite number" in line
    assert not (tmp_path / "out").exists()  # refused before anything is done


# --- 3. black is not tissue; greyscale is not H&E -----------------------------------------------------------------


def test_black_padding_is_not_tissue(tissue_rgb: np.ndarray) -> None:
    from pysynth.io import tissue_mask_from_rgb

    small, mpp = tissue_rgb[::4, ::4], 4 * 0.499  # as compute_tissue_mask sees the bundled slide
    alone = tissue_mask_from_rgb(small, mpp)
    padded = np.zeros((small.shape[0] + 100, small.shape[1] + 100, 3), np.uint8)
    padded[50:-50, 50:-50] = small
    mask = tissue_mask_from_rgb(padded, mpp)
    inside = mask[50:-50, 50:-50]
    assert mask[:40].sum() + mask[-40:].sum() + mask[:, :40].sum() + mask[:, -40:].sum() == 0
    assert abs(inside.mean() - alone.mean()) < 0.02  # the tissue itself is as before
    assert not tissue_mask_from_rgb(np.zeros((300, 300, 3), np.uint8), 2.0).any()


def test_black_image_has_no_tissue(run_cli, tmp_path: Path, sample_slide: Path) -> None:
    from pysynth.io import compute_tissue_mask, open_slide

    black = _png(tmp_path / "black.png", np.zeros((600, 600, 3), np.uint8))
    sampled = run_cli("sample", black, "--out", tmp_path / "s", "--input-mpp", "0.25", "--n-per-slide", 2)
    assert _one_clear_line(sampled, 1) == f"  error: {black}: no tissue found (blank or background only)"
    inferred = run_cli("infer", black, "--out", tmp_path / "i", "--input-mpp", "0.25")
    assert inferred.code == 0, inferred.err
    summary = json.loads((tmp_path / "i" / "black" / "summary.json").read_text())
    assert summary["tissue_mm2"] == 0
    assert summary["regions"] == 0
    with open_slide(sample_slide) as reader:  # real tissue is as before (0.3807 before black was excluded)
        assert compute_tissue_mask(reader).fraction == pytest.approx(0.3807, abs=0.002)


def test_greyscale_images_get_a_warning(run_cli, tmp_path: Path, tissue_rgb: np.ndarray, tile: Path) -> None:
    from pysynth.io import compute_tissue_mask, open_slide

    grey = cv2.cvtColor(tissue_rgb, cv2.COLOR_RGB2GRAY)
    one = _png(tmp_path / "grey1.png", grey)
    three = _png(tmp_path / "grey3.png", np.dstack([grey, grey, grey]))
    args = ("--out", tmp_path / "s", "--input-mpp", "0.5", "--n-per-slide", 1, "--size", 128, "--preview")
    result = run_cli("sample", one, three, tile, *args)
    assert result.code == 0, result.err
    warnings = [line.strip() for line in result.err.splitlines() if "greyscale" in line]
    assert [w[w.index("warning:") :] for w in warnings] == [
        f"warning: {path}: looks greyscale, not H&E-stained; results will be unreliable" for path in (one, three)
    ]  # once each (the preview masks every source again), and not for the H&E tile
    # In worker processes (whose log is not shown) the warning comes back with the source's result.
    workers = run_cli("sample", one, three, tile, *args[2:], "--out", tmp_path / "w", "--workers", "2")
    assert workers.code == 0, workers.err
    assert sum("looks greyscale" in line for line in workers.err.splitlines()) == 2
    for path, grey in ((one, True), (three, True), (tile, False)):  # also told to callers (e.g. worker processes)
        with open_slide(path, 0.5) as reader:
            assert compute_tissue_mask(reader).greyscale is grey


# --- 4. synthesize's refusal speaks in options --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "value", "named"),
    [
        ("--n", "3", "--n (2 -> 3)"),
        ("--shard-size", "1", "--shard-size (1024 -> 1)"),
        ("--size", "80", "--size (64 -> 80)"),
    ],
)
def test_synthesize_refusal_names_options(
    run_cli, tmp_path: Path, tissue_rgb: np.ndarray, option: str, value: str, named: str
) -> None:
    real = _png(tmp_path / "real.png", tissue_rgb[:400, :400])
    args = {"--source": str(real), "--n": "2", "--size": "64", "--out": str(tmp_path / "ds"), "--input-mpp": "0.25"}
    assert run_cli("synthesize", *[x for kv in args.items() for x in kv]).code == 0
    refused = run_cli("synthesize", *[x for kv in (args | {option: value}).items() for x in kv])
    line = _one_clear_line(refused, 1)
    assert named in line
    assert "--overwrite" in line
    assert "overwrite=True" not in line
    assert "schema" not in line
    assert "attrs" not in line


def test_library_refusal_says_overwrite_in_general(tmp_path: Path) -> None:
    from pysynth.synth.schema import Field, Schema
    from pysynth.synth.store import DatasetMismatchError, write_dataset

    schema = Schema({"x": Field("uint8", (2,))})

    def make(i: int):
        return {"x": np.full(2, i, np.uint8)}, {}

    write_dataset(tmp_path, 3, make, schema=schema)
    with pytest.raises(DatasetMismatchError, match=r"other n \(3 -> 4\); use another folder, or overwrite it$"):
        write_dataset(tmp_path, 4, make, schema=schema)


# --- 5. synthesize: bad sources among good ones -------------------------------------------------------------------


def test_synthesize_bad_source_among_good_exits_1(run_cli, tmp_path: Path, tissue_rgb: np.ndarray) -> None:
    good = tmp_path / "good"
    _png(good / "a.png", tissue_rgb[:400, :400])
    blank = _png(tmp_path / "blank.png", np.full((400, 400, 3), 255, np.uint8))
    out = tmp_path / "ds"
    common = ("--n", 2, "--size", 64, "--out", out, "--input-mpp", "0.25")
    result = run_cli("synthesize", "--source", good, "--source", blank, *common)
    assert _one_clear_line(result, 1) == "  error: blank.png: no tissue"
    assert "failed: 1 source(s)" in result.err
    assert "2 synthetic patches" in result.out  # the good source was used
    assert (out / "index.json").is_file()
    missing = run_cli("synthesize", "--source", good, "--source", tmp_path / "nope", *common)
    assert _one_clear_line(missing, 2) == f"error: {tmp_path / 'nope'}: no such file or folder"  # as sample


# --- 6. evaluate --json names the file asked for --------------------------------------------------------------


def test_evaluate_json_errors_name_the_file(run_cli, tmp_path: Path) -> None:
    labels = np.zeros((64, 64), np.uint16)
    labels[10:20, 10:20] = 1
    for path in (tmp_path / "gt" / "a.png", tmp_path / "pred" / "a_labels.png"):
        path.parent.mkdir(exist_ok=True)
        cv2.imwrite(str(path), labels)
    target = tmp_path / "no_such_folder" / "scores.json"
    result = run_cli("evaluate", "--pred", tmp_path / "pred", "--gt", tmp_path / "gt", "--json", target)
    assert _one_clear_line(result, 1) == f"error: {target}: No such file or directory"
    assert ".part" not in result.err


def test_atomic_write_errors_name_the_final_file(tmp_path: Path, monkeypatch) -> None:
    import errno
    import os

    from pysynth.fsutil import atomic_write_text

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match="No space left") as caught:
        atomic_write_text(tmp_path / "a.json", "{}")
    assert caught.value.filename == str(tmp_path / "a.json")
    assert list(tmp_path.iterdir()) == []


# --- 7. bare `pysynth` ------------------------------------------------------------------------------------------


def test_bare_command_prints_help(run_cli) -> None:
    result = run_cli()
    assert result.code == 0, result.err
    assert result.err == ""
    assert result.out.startswith("Usage: pysynth [OPTIONS] COMMAND [ARGS]...")
    assert "Commands:" in result.out
    assert result.out == run_cli("--help").out


# --- 8. contact-sheet captions keep what tells them apart -------------------------------------------------------


def test_long_captions_keep_their_distinguishing_end() -> None:
    from pysynth.viz import contact_sheet, fit_caption

    names = [f"TCGA-A7-A0DB-01Z-00-DX1_168501_{i:04d}" for i in range(3)]
    fitted = [fit_caption(name, 160) for name in names]
    assert len(set(fitted)) == 3
    for name, short in zip(names, fitted, strict=True):
        assert short.startswith("TCGA-")
        assert short.endswith(name[-6:])
        assert "..." in short
        assert cv2.getTextSize(short, cv2.FONT_HERSHEY_PLAIN, 0.8, 1)[0][0] <= 160
    assert fit_caption("slide_0001", 160) == "slide_0001"  # short ones stay whole
    image = np.full((32, 32, 3), 128, np.uint8)
    sheet = contact_sheet([image, image], ["CMU-1-Small-Region-copy_0003", "CMU-1-Small-Region-copy_0004"])
    first, second = sheet[4 + 160 :, 4 : 4 + 160], sheet[4 + 160 :, 168 : 168 + 160]
    assert not np.array_equal(first, second)  # the drawn captions differ

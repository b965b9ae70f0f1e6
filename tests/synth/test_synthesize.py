"""``pysynth synthesize`` end to end: dataset, determinism across workers, resume, reading, streaming, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest


@pytest.fixture(scope="module")
def real_png(tmp_path_factory: pytest.TempPathFactory, sample_slide: Path) -> Path:
    """A 640×640 real tissue tile at 0.25 µm/px, as a plain PNG (no resolution metadata)."""
    from pysynth.io import open_slide, read_region

    with open_slide(sample_slide) as slide:
        rgb = read_region(slide, 1000, 2100, (640, 640), 0.25)
    path = tmp_path_factory.mktemp("real") / "tile.png"
    cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    return path


def _shards(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((folder / "shards").glob("*.shard"))}


def _synth(run_cli, real: Path, out: Path, *extra: object):
    return run_cli(
        "synthesize",
        "--source",
        real,
        "--input-mpp",
        "0.25",
        "--n",
        40,
        "--size",
        96,
        "--shard-size",
        16,
        "--seed",
        3,
        "--out",
        out,
        *extra,
    )


def test_dataset_is_identical_for_any_workers_and_reads_back(run_cli, real_png: Path, tmp_path: Path) -> None:
    one = _synth(run_cli, real_png, tmp_path / "one", "--workers", 1, "--preview", "--export-png", 3)
    assert one.code == 0, one.err
    exported = sorted(p.name for p in (tmp_path / "one" / "png").glob("*.png"))
    assert len(exported) == 9  # image, labels, overlay for 3 patches
    labels_png = cv2.imread(str(next((tmp_path / "one" / "png").glob("*_labels.png"))), cv2.IMREAD_UNCHANGED)
    assert labels_png.dtype == np.uint16
    assert "40 synthetic patches of 96 px" in one.out
    two = _synth(run_cli, real_png, tmp_path / "two", "--workers", 2)
    assert two.code == 0, two.err
    assert _shards(tmp_path / "one") == _shards(tmp_path / "two")
    assert len(_shards(tmp_path / "one")) == 3
    assert cv2.imread(str(tmp_path / "one" / "preview.png")) is not None

    from pysynth.synth.generate import SyntheticPatches

    ds = SyntheticPatches(tmp_path / "one")
    assert len(ds) == 40
    item = ds[37]
    assert item["image"].shape == (96, 96, 3)
    assert item["labels"].dtype == np.uint16
    assert item["reference"].shape == (96, 96, 3)
    assert item["centres"].shape == (int(item["labels"].max()), 2)
    assert item["meta"]["seed"] == 3
    assert item["meta"]["index"] == 37
    # The reference is a real crop of the source tile at the recorded position.
    real = cv2.cvtColor(cv2.imread(str(real_png)), cv2.COLOR_BGR2RGB)
    rx, ry = (int(v) for v in item["xy"][2:])
    np.testing.assert_array_equal(item["reference"], real[ry : ry + 96, rx : rx + 96])
    attrs = json.loads((tmp_path / "one" / "index.json").read_text())
    assert "config" in json.dumps(attrs)


def test_resume_repairs_and_skips(run_cli, real_png: Path, tmp_path: Path) -> None:
    out = tmp_path / "ds"
    assert _synth(run_cli, real_png, out).code == 0
    before = _shards(out)
    shards = sorted((out / "shards").glob("*.shard"))
    shards[0].unlink()
    shards[1].write_bytes(shards[1].read_bytes()[:1000])
    again = _synth(run_cli, real_png, out)
    assert again.code == 0, again.err
    assert "2 shard(s) written, 1 shard(s) kept" in again.out
    assert _shards(out) == before


def test_streaming_gives_the_same_items(real_png: Path, tmp_path: Path, run_cli) -> None:
    from pysynth.synth.config import SynthConfig
    from pysynth.synth.generate import SyntheticPatches, streaming_dataset

    assert _synth(run_cli, real_png, tmp_path / "ds").code == 0
    stream = streaming_dataset([real_png], tmp_path / "stream", SynthConfig(size=96), seed=3, length=6, input_mpp=0.25)
    stored = SyntheticPatches(tmp_path / "ds")
    for item in stream:
        np.testing.assert_array_equal(item["image"], stored[item["index"]]["image"])
        np.testing.assert_array_equal(item["labels"], stored[item["index"]]["labels"])


@pytest.mark.parametrize(
    ("make", "extra", "code", "message"),
    [
        ("white", [], 1, "no usable real tissue"),
        ("small", [], 1, "smaller than --size"),
        ("missing", [], 2, "no such file or folder"),
        ("tile", ["--n", "0"], 2, "'--n'"),
        ("tile", ["--config", "{bad}"], 2, "max_overlap"),
        ("tile", ["--config", "{unknown}"], 2, "unknown synthesis parameter"),
    ],
)
def test_bad_input(
    run_cli, real_png: Path, tmp_path: Path, make: str, extra: list[str], code: int, message: str
) -> None:
    files = {"bad": tmp_path / "bad.json", "unknown": tmp_path / "unknown.json"}
    files["bad"].write_text(json.dumps({"max_overlap": 3}))
    files["unknown"].write_text(json.dumps({"colour": 1}))
    sources = {
        "tile": real_png,
        "missing": tmp_path / "nope.png",
        "white": tmp_path / "white.png",
        "small": tmp_path / "small.png",
    }
    cv2.imwrite(str(sources["white"]), np.full((300, 300, 3), 255, np.uint8))
    cv2.imwrite(str(sources["small"]), np.full((50, 50, 3), (150, 80, 160), np.uint8))
    out = tmp_path / "out"
    result = run_cli(
        "synthesize",
        "--source",
        sources[make],
        "--input-mpp",
        "0.25",
        "--n",
        8,
        "--size",
        96,
        "--out",
        out,
        *[e.format(**files) for e in extra],
    )
    assert result.code == code, result.err
    errors = result.error_lines()
    assert len(errors) == 1, result.err
    assert message in errors[0]
    assert "Traceback" not in result.err
    assert not list(out.glob("shards/*"))  # nothing half-made


def test_other_settings_are_refused(run_cli, real_png: Path, tmp_path: Path) -> None:
    assert _synth(run_cli, real_png, tmp_path / "ds").code == 0
    other = run_cli(
        "synthesize",
        "--source",
        real_png,
        "--input-mpp",
        "0.25",
        "--n",
        40,
        "--size",
        96,
        "--shard-size",
        16,
        "--seed",
        4,
        "--out",
        tmp_path / "ds",
    )
    assert other.code == 1
    assert "other" in other.error_lines()[0] or "overwrite" in other.error_lines()[0]


def test_full_disk_keeps_nothing_half_written(run_cli, real_png: Path, tmp_path: Path, small_disk) -> None:
    import shutil

    disk = small_disk("6m")  # the prepared source fits, the shards do not
    args = [
        "synthesize",
        "--source",
        real_png,
        "--input-mpp",
        "0.25",
        "--n",
        400,
        "--size",
        96,
        "--shard-size",
        16,
        "--seed",
        3,
    ]
    full = run_cli(*args, "--out", disk / "ds")
    assert full.code == 1
    assert "No space left on device" in full.error_lines()[0]
    assert "Traceback" not in full.err
    assert not [p for p in (disk / "ds").rglob("*") if ".tmp" in p.name or p.name.endswith(".part")]
    # What it left is either whole or redone: finishing elsewhere gives the same bytes as a clean run.
    shutil.copytree(disk / "ds", tmp_path / "resumed")
    assert run_cli(*args, "--out", tmp_path / "resumed").code == 0
    assert run_cli(*args, "--out", tmp_path / "clean").code == 0
    assert _shards(tmp_path / "resumed") == _shards(tmp_path / "clean")


def test_slides_are_sampled_on_the_fly(run_cli, sample_slide: Path, tmp_path: Path) -> None:
    """A whole slide as source: tissue tiles are read at 0.25 µm/px (20x upsampled) and prepared."""
    result = run_cli("synthesize", "--source", sample_slide, "--n", 8, "--size", 128, "--out", tmp_path / "ds")
    assert result.code == 0, result.err
    names = json.loads((tmp_path / "ds" / "sources" / "sources.json").read_text())["names"]
    assert len(names) == 8
    assert all(name.startswith("CMU-1-Small-Region.svs#") for name in names)
    from pysynth.synth.generate import load_sources

    tiles = load_sources(tmp_path / "ds")
    assert all(t.rgb.shape == (1024, 1024, 3) for t in tiles)
    assert all(t.tissue.mean() > 0.4 for t in tiles)  # placed on tissue (≥ 50% by the slide's mask)

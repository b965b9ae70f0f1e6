"""Patch sampling: only tissue, right resolution, complete manifest, determinism, resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from pysynth.errors import PysynthError
from pysynth.io import ArrayReader, compute_tissue_mask, open_slide, read_region
from pysynth.ledger import LEDGER, read_ledger
from pysynth.sample import MANIFEST_COLUMNS, SampleConfig, read_manifest, sample
from pysynth.sources import collect_sources, unique_names


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.png"))} | {
        "manifest.csv": (folder / "manifest.csv").read_bytes()
    }


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory, sample_slide: Path, tissue_rgb: np.ndarray) -> list[Path]:
    """The bundled slide plus two real-tissue PNG tiles (no mpp metadata)."""
    folder = tmp_path_factory.mktemp("sources")
    shutil.copy(sample_slide, folder / "slide.svs")
    cv2.imwrite(str(folder / "tile_a.png"), cv2.cvtColor(tissue_rgb, cv2.COLOR_RGB2BGR))
    cv2.imwrite(str(folder / "tile_b.png"), cv2.cvtColor(np.ascontiguousarray(tissue_rgb[::-1]), cv2.COLOR_RGB2BGR))
    return collect_sources([folder])


def _run(sources: list[Path], out: Path, workers: int = 1, **kw: object) -> object:
    config = SampleConfig(**({"n_per_slide": 6, "size": 128, "input_mpp": 0.5, "seed": 7} | kw))
    out.mkdir(exist_ok=True)
    return sample(sources, unique_names(sources), out, config, workers=workers)


def test_patches_are_tissue_at_the_asked_resolution(sources: list[Path], tmp_path: Path) -> None:
    report = _run(sources, tmp_path)
    assert not report.failures
    rows = read_manifest(tmp_path / "manifest.csv")
    assert len(rows) == report.patches == 18
    assert list(rows[0]) == list(MANIFEST_COLUMNS)
    for row in rows:
        patch = cv2.imread(str(tmp_path / row["file"]))
        assert patch.shape == (128, 128, 3)
        assert row["mpp"] == 0.25
        assert row["tissue_fraction"] >= 0.7
        assert row["source_mpp"] in (0.499, 0.5)
        assert row["mpp_source"] == ("metadata" if row["source"].endswith(".svs") else "user")
        assert row["size_level0"] == pytest.approx(128 * 0.25 / row["source_mpp"], abs=1e-3)
    # Coordinates say where each patch came from: re-reading there gives the same pixels.
    row = rows[0]
    with open_slide(row["source"], 0.5) as slide:
        again = read_region(slide, row["x"], row["y"], (128, 128), 0.25)
        tissue = compute_tissue_mask(slide)
    np.testing.assert_array_equal(again, cv2.cvtColor(cv2.imread(str(tmp_path / row["file"])), cv2.COLOR_BGR2RGB))
    assert tissue.region_fraction(row["x"], row["y"], row["size_level0"], row["size_level0"]) == pytest.approx(
        row["tissue_fraction"], abs=1e-4
    )
    # Patches of one source do not overlap.
    for source in {r["source"] for r in rows}:
        boxes = [(r["x"], r["y"], r["size_level0"]) for r in rows if r["source"] == source]
        for i, (x1, y1, s) in enumerate(boxes):
            for x2, y2, _ in boxes[i + 1 :]:
                assert abs(x1 - x2) >= s or abs(y1 - y2) >= s


def test_same_seed_same_bytes_whatever_the_workers(sources: list[Path], tmp_path: Path) -> None:
    _run(sources, tmp_path / "one", workers=1)
    _run(sources, tmp_path / "two", workers=2)
    assert _files(tmp_path / "one") == _files(tmp_path / "two")
    _run(sources, tmp_path / "other", seed=8)
    assert _files(tmp_path / "other") != _files(tmp_path / "one")


def test_a_sources_patches_do_not_depend_on_the_others(sources: list[Path], tmp_path: Path) -> None:
    _run(sources, tmp_path / "all")
    _run(sources[:1], tmp_path / "first")
    first = _files(tmp_path / "first")
    everything = _files(tmp_path / "all")
    for name, data in first.items():
        if name != "manifest.csv":
            assert everything[name] == data


def test_resume_after_interruption(sources: list[Path], tmp_path: Path) -> None:
    _run(sources, tmp_path / "ref")
    out = tmp_path / "run"
    _run(sources, out)
    # Simulate a run killed while sampling the second source: its record and one patch are missing,
    # another patch half-written, and the manifest not yet rewritten.
    ledger_path = out / LEDGER
    name = sorted(read_ledger(out)["entries"])[1]
    lines = ledger_path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if json.loads(line).get("name") != name]
    ledger_path.write_text("".join(kept) + '{"type":"entry","name":"cut sh')  # and a line cut short by the kill
    victims = sorted(out.glob(f"{name}_*.png"))
    victims[0].unlink()
    victims[1].write_bytes(victims[1].read_bytes()[:100])
    (out / "manifest.csv").unlink()
    report = _run(sources, out)
    assert report.skipped == 2
    resumed, ref = _files(out), _files(tmp_path / "ref")
    assert {k: v for k, v in resumed.items() if k != "manifest.csv"} == {
        k: v for k, v in ref.items() if k != "manifest.csv"
    }
    # The same rows; the resampled source's rows say they come from the second run.
    rows, ref_rows = read_manifest(out / "manifest.csv"), read_manifest(tmp_path / "ref" / "manifest.csv")
    assert [{**r, "run": 0} for r in rows] == [{**r, "run": 0} for r in ref_rows]
    assert {r["run"] for r in rows if r["file"].startswith(f"{name}_")} == {2}
    assert {r["run"] for r in rows if not r["file"].startswith(f"{name}_")} == {1}


def test_other_settings_in_the_same_folder_are_refused(sources: list[Path], tmp_path: Path) -> None:
    _run(sources[:1], tmp_path)
    with pytest.raises(PysynthError, match=r"other settings \(size 128 -> 96\)"):
        _run(sources[:1], tmp_path, size=96)
    config = SampleConfig(n_per_slide=6, size=96, input_mpp=0.5, seed=7)
    report = sample(sources[:1], unique_names(sources[:1]), tmp_path, config, overwrite=True)
    assert report.patches == 6
    assert all(cv2.imread(str(p)).shape == (96, 96, 3) for p in tmp_path.glob("*.png"))


def test_failures_do_not_stop_the_others(sources: list[Path], tmp_path: Path) -> None:
    bad = tmp_path / "bad.svs"
    bad.write_text("not a slide")
    white = tmp_path / "white.png"
    cv2.imwrite(str(white), np.full((300, 300, 3), 255, np.uint8))
    out = tmp_path / "out"
    report = _run([bad, sources[0], white], out)
    assert [r.error is None for r in report.results] == [False, True, False]
    assert "bad.svs" in report.results[0].error
    assert "no tissue" in report.results[2].error
    assert report.patches == 6


def test_sampling_an_in_memory_layout_covers_tissue_only() -> None:
    from pysynth.sample import place_patches, source_rng

    image = np.full((1000, 1000, 3), 250, np.uint8)
    image[200:700, 300:800] = (150, 80, 160)  # a purple square of "tissue"
    tissue = compute_tissue_mask(ArrayReader(image, mpp=0.5))
    xy, fractions = place_patches(tissue, (1000, 1000), 100.0, 10, 0.7, source_rng(0, "x"), 20_000)
    assert len(xy) == 10
    assert (fractions >= 0.7).all()
    assert (xy[:, 0] >= 300 - 35).all()
    assert (xy[:, 0] + 100 <= 800 + 35).all()
    assert (xy[:, 1] >= 200 - 35).all()
    assert (xy[:, 1] + 100 <= 700 + 35).all()


def test_config_is_validated() -> None:
    for bad in ({"n_per_slide": 0}, {"n_per_slide": 1, "min_tissue": 1.5}, {"n_per_slide": 1, "mpp": 0}):
        with pytest.raises(ValueError, match=next(iter(k for k in bad if k != "n_per_slide"), "n_per_slide")):
            SampleConfig(**bad)

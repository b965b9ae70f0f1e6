"""Reruns into an existing output folder keep, make, refuse or redo results, and never lose, swap or misattribute
them (the run record of :mod:`pysynth.ledger`, shared by sample, segment, infer and train)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from pysynth.ledger import Ledger, file_identity, read_ledger, same_content, stable_names
from pysynth.sample import read_manifest


def _png(path: Path, rgb: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR))
    return path


@pytest.fixture
def twins(tmp_path: Path, tissue_rgb: np.ndarray) -> tuple[Path, Path]:
    """``a/X.png`` and ``b/X.png``: the same name, different tissue (different nucleus counts)."""
    return (
        _png(tmp_path / "in" / "a" / "X.png", tissue_rgb[:256, :256]),
        _png(tmp_path / "in" / "b" / "X.png", tissue_rgb[300:556, 400:720]),
    )


def _outputs(folder: Path, stem: str) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob(f"{stem}[._]*")) if p.is_file()}


# --- the mechanism ---------------------------------------------------------------------------------------------


def test_stable_names_do_not_depend_on_order_and_keep_what_the_ledger_gave(tmp_path: Path) -> None:
    paths = [tmp_path / "c17" / "HE.svs", tmp_path / "c18" / "HE.svs", tmp_path / "x" / "other.png"]
    assert stable_names(paths) == ["c17_HE", "c18_HE", "other"]
    assert stable_names(paths[::-1]) == ["other", "c18_HE", "c17_HE"]
    assert stable_names([tmp_path / "a" / "X.png", tmp_path / "b" / "x.PNG"]) == ["a_X", "b_x"]  # case-blind
    # A name the ledger holds is never given to another input; an input it knows keeps its name.
    for p in paths[:2]:
        p.parent.mkdir(parents=True)
        p.write_bytes(p.parent.name.encode())
    (tmp_path / "out").mkdir()
    ledger = Ledger(tmp_path / "out", "segment")
    ledger.record("HE", file_identity(paths[0]), {}, [])
    assert ledger.names([paths[1], paths[0]]) == ["c18_HE", "HE"]


def test_content_identity_follows_the_bytes_not_the_path(tmp_path: Path) -> None:
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    big = np.random.default_rng(0).integers(0, 256, 3 << 20, dtype=np.uint8).tobytes()  # hashed head + tail
    a.write_bytes(big)
    b.write_bytes(big)
    assert same_content(file_identity(a), file_identity(b))
    b.write_bytes(big[:-1] + bytes([big[-1] ^ 1]))  # the last byte differs
    assert not same_content(file_identity(a), file_identity(b))
    b.write_bytes(big + b"x")
    assert not same_content(file_identity(a), file_identity(b))


def test_a_second_run_into_a_folder_being_written_is_refused(tmp_path: Path) -> None:
    from pysynth.errors import PysynthError

    with Ledger(tmp_path, "segment"), pytest.raises(PysynthError, match="another pysynth run"):
        Ledger(tmp_path, "segment").__enter__()
    with Ledger(tmp_path, "segment"):  # released when the first ends
        pass
    with pytest.raises(PysynthError, match="results of `pysynth segment`"):
        Ledger(tmp_path, "infer")


# --- 1. sample: the manifest accumulates -----------------------------------------------------------------------


def test_sample_reruns_accumulate_the_manifest_and_a_failed_run_keeps_it(
    run_cli, tmp_path: Path, tissue_rgb: np.ndarray
) -> None:
    first = _png(tmp_path / "in" / "first.png", tissue_rgb[:400, :400])
    second = _png(tmp_path / "in" / "second.png", tissue_rgb[200:600, 300:700])
    out = tmp_path / "patches"
    args = ("--out", out, "--n-per-slide", "3", "--size", "200", "--input-mpp", "0.5")
    assert run_cli("sample", first, *args).code == 0
    assert run_cli("sample", first, *args).code == 0  # the same run again: nothing lost
    rows = read_manifest(out / "manifest.csv")
    assert [r["file"] for r in rows] == [f"first_{k:04d}.png" for k in range(3)]
    assert run_cli("sample", second, *args).code == 0  # another source, same settings: added
    rows = read_manifest(out / "manifest.csv")
    assert sorted({Path(r["source"]).name for r in rows}) == ["first.png", "second.png"]
    assert [r["run"] for r in rows] == [1, 1, 1, 3, 3, 3]
    blank = _png(tmp_path / "in" / "glass.png", np.full((400, 400, 3), 245, np.uint8))
    failed = run_cli("sample", blank, *args)
    assert failed.code == 1
    assert len(read_manifest(out / "manifest.csv")) == 6  # a failed run keeps every earlier row
    # What synthesize reads from the folder: every patch of the manifest.
    from pysynth.synth.config import SynthConfig
    from pysynth.synth.generate import collect_real_tiles

    tiles, failures = collect_real_tiles([out], SynthConfig(size=80))
    assert (len(tiles), failures) == (6, [])


# --- 2. same-named inputs from different folders ---------------------------------------------------------------


def test_segment_names_same_stem_inputs_by_folder_and_never_swaps_them(run_cli, tmp_path: Path, twins) -> None:
    a, b = twins
    out = tmp_path / "seg"
    assert run_cli("segment", a, b, "--input-mpp", "0.5", "--out", out).code == 0
    expected = {"a_X": _outputs(out, "a_X"), "b_X": _outputs(out, "b_X")}
    assert all(len(v) == 4 for v in expected.values())  # labels, GeoJSON, overlay, table
    again = run_cli("segment", b, a, "--input-mpp", "0.5", "--out", out)  # reversed order
    assert again.code == 0
    assert "2 already done" in again.out
    assert {stem: _outputs(out, stem) for stem in expected} == expected
    # Each name holds its own input's nuclei: the same as a run on that input alone.
    alone = tmp_path / "alone"
    assert run_cli("segment", b, "--input-mpp", "0.5", "--out", alone).code == 0
    assert (alone / "X.geojson").read_bytes().replace(b'"name":"X"', b"") == (out / "b_X.geojson").read_bytes().replace(
        b'"name":"b_X"', b""
    )
    ledger = read_ledger(out)
    assert ledger["entries"]["a_X"]["input"]["path"] == str(a.resolve())
    assert ledger["entries"]["b_X"]["input"]["path"] == str(b.resolve())


def test_infer_never_swaps_same_stem_slides_and_run_json_attributes_counts(run_cli, tmp_path: Path, twins) -> None:
    a, b = twins
    out = tmp_path / "inf"
    assert run_cli("infer", a, b, "--input-mpp", "0.5", "--out", out).code == 0
    counts = {s["name"]: s["nuclei"] for s in json.loads((out / "run.json").read_text())["slides"]}
    assert set(counts) == {"a_X", "b_X"}
    assert counts["a_X"] != counts["b_X"]
    assert run_cli("infer", b, a, "--input-mpp", "0.5", "--out", out).code == 0
    run = json.loads((out / "run.json").read_text())
    by_name = {s["name"]: s for s in run["slides"]}
    assert {n: s["nuclei"] for n, s in by_name.items()} == counts
    assert by_name["b_X"]["slide"] == str(b.resolve())
    for name in counts:
        features = json.loads((out / name / "nuclei.geojson").read_text())["features"]
        assert len(features) == counts[name]


def test_a_changed_input_under_a_known_name_is_refused_and_its_results_kept(
    run_cli, tmp_path: Path, tissue_rgb: np.ndarray
) -> None:
    image = _png(tmp_path / "in" / "X.png", tissue_rgb[:256, :256])
    out = tmp_path / "seg"
    assert run_cli("segment", image, "--input-mpp", "0.5", "--out", out).code == 0
    before = _outputs(out, "X")
    _png(image, tissue_rgb[300:556, 300:556])  # another image under the same path
    refused = run_cli("segment", image, "--input-mpp", "0.5", "--out", out)
    assert refused.code == 1
    assert "other content" in refused.err
    assert _outputs(out, "X") == before
    assert run_cli("segment", image, "--input-mpp", "0.5", "--out", out, "--overwrite").code == 0
    assert _outputs(out, "X") != before


def test_results_without_a_record_are_not_rewritten(run_cli, tmp_path: Path, tissue_rgb: np.ndarray) -> None:
    image = _png(tmp_path / "in" / "X.png", tissue_rgb[:256, :256])
    out = tmp_path / "seg"
    out.mkdir()
    (out / "X.geojson").write_text('{"made": "by hand"}')
    refused = run_cli("segment", image, "--input-mpp", "0.5", "--out", out)
    assert refused.code == 1
    assert "no record" in refused.err
    assert (out / "X.geojson").read_text() == '{"made": "by hand"}'


# --- 3. segment remembers its settings -------------------------------------------------------------------------


def test_segment_rerun_with_another_input_mpp_is_refused(run_cli, tmp_path: Path, tissue_rgb: np.ndarray) -> None:
    image = _png(tmp_path / "in" / "X.png", tissue_rgb[:256, :256])
    out = tmp_path / "seg"
    assert run_cli("segment", image, "--input-mpp", "0.5", "--out", out).code == 0
    before = _outputs(out, "X")
    refused = run_cli("segment", image, "--input-mpp", "0.25", "--out", out)
    assert refused.code == 1
    assert "input_mpp 0.5 -> 0.25" in refused.err
    assert "already done" not in refused.out
    assert _outputs(out, "X") == before
    assert run_cli("segment", image, "--input-mpp", "0.25", "--out", out, "--overwrite").code == 0
    labels = cv2.imread(str(out / "X_labels.png"), cv2.IMREAD_UNCHANGED)
    assert labels.shape == (256, 256)
    assert _outputs(out, "X") != before


# --- 4 and 5. train ---------------------------------------------------------------------------------------------


def test_train_refuses_other_sources_and_a_failed_start_does_not_block_the_fix(
    run_cli, tmp_path: Path, tissue_rgb: np.ndarray, tiny_train: dict
) -> None:
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_train))
    one = _png(tmp_path / "in" / "one.png", tissue_rgb[:400, :400])
    two = _png(tmp_path / "in" / "two.png", tissue_rgb[200:, 300:])
    glass = _png(tmp_path / "in" / "glass.png", np.full((300, 300, 3), 245, np.uint8))
    model = tmp_path / "model"
    common = ("--input-mpp", "0.5", "--config", config, "--out", model)
    # 5: a start that fails (no tissue) leaves nothing that blocks the corrected command with other settings.
    failed = run_cli("train", "--real", glass, *common, "--steps", "4")
    assert failed.code == 1
    assert "no usable real tissue" in failed.err or "no tissue" in failed.err
    done = run_cli("train", "--real", one, *common, "--steps", "2")
    assert done.code == 0, done.err
    # The bar is followed by a line for threshold selection, and short runs are timed in seconds, not "0.0 min".
    assert "choosing post-processing thresholds on 4 held-out synthetic patches" in done.err
    assert re.search(r"trained 2 steps \(\d+ s of training steps in all runs; this call \d+ s\)", done.out)
    model_json = (model / "model.json").read_bytes()
    # 4: a finished run does not take other sources as its own.
    other = run_cli("train", "--real", two, *common, "--steps", "2")
    assert other.code == 1
    assert "other sources" in other.err
    assert (model / "model.json").read_bytes() == model_json
    # The same sources, moved to another folder, are the same run.
    moved = _png(tmp_path / "moved" / "one.png", cv2.cvtColor(cv2.imread(str(one)), cv2.COLOR_BGR2RGB))
    assert run_cli("train", "--real", moved, *common, "--steps", "2").code == 0


# --- 6. run.json of infer covers every call ---------------------------------------------------------------------


def test_infer_run_json_accumulates_and_a_refused_rerun_keeps_the_slide_done(
    run_cli, tmp_path: Path, tissue_rgb: np.ndarray
) -> None:
    first = _png(tmp_path / "in" / "first.png", tissue_rgb[:256, :256])
    second = _png(tmp_path / "in" / "second.png", tissue_rgb[300:556, 300:556])
    out = tmp_path / "inf"
    assert run_cli("infer", first, "--input-mpp", "0.5", "--out", out).code == 0
    assert run_cli("infer", second, "--input-mpp", "0.5", "--out", out).code == 0
    run = json.loads((out / "run.json").read_text())
    assert [(s["name"], s["status"], s["run"]) for s in run["slides"]] == [("first", "done", 1), ("second", "done", 2)]
    assert [r["run"] for r in run["runs"]] == [1, 2]
    refused = run_cli("infer", first, "--input-mpp", "0.5", "--out", out, "--tta", "2")
    assert refused.code == 1
    assert "refused" in refused.out
    assert "config.tta 1 -> 2" in refused.err
    run = json.loads((out / "run.json").read_text())
    first_record = next(s for s in run["slides"] if s["name"] == "first")
    assert first_record["status"] == "done"
    assert first_record["last_call"]["status"] == "refused"
    assert run["runs"][-1]["slides"] == {"first": "refused"}
    assert (out / "first" / "summary.json").exists()


# --- synthesize: a dataset made from other tissue is refused before anything is written -------------------------


def test_synthesize_refuses_other_tissue_under_the_same_names(run_cli, tmp_path: Path, tissue_rgb: np.ndarray) -> None:
    a = _png(tmp_path / "a" / "X.png", tissue_rgb[:300, :300])
    b = _png(tmp_path / "b" / "X.png", tissue_rgb[300:600, 400:700])
    out = tmp_path / "ds"
    args = ("--out", out, "--n", "4", "--size", "80", "--input-mpp", "0.25", "--shard-size", "2")
    assert run_cli("synthesize", "--source", a, *args).code == 0, "first run"
    before = {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    refused = run_cli("synthesize", "--source", b, *args)
    assert refused.code == 1
    assert "other real tissue" in refused.err
    after = {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    assert after == before  # the earlier dataset and its prepared tiles are untouched
    assert run_cli("synthesize", "--source", b, *args, "--overwrite").code == 0
    redone = {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    assert redone[Path("sources") / "00000.npz"] != before[Path("sources") / "00000.npz"]


def test_prepared_tiles_of_other_tissue_are_never_reused(tmp_path: Path, tissue_rgb: np.ndarray) -> None:
    from pysynth.synth.config import SynthConfig
    from pysynth.synth.generate import SOURCES_DIR, save_sources

    config = SynthConfig(size=80)
    first = [("X.png", tissue_rgb[:200, :200].copy()), ("Y.png", tissue_rgb[200:400, :200].copy())]
    save_sources(first, config, tmp_path / "a")
    save_sources(first, config, tmp_path / "b")
    folder = tmp_path / "b" / SOURCES_DIR
    kept = (folder / "00000.npz").stat().st_mtime_ns
    save_sources(first, config, tmp_path / "b")  # the same tiles: kept (a resume)
    assert (folder / "00000.npz").stat().st_mtime_ns == kept
    other = [first[0], ("Y.png", tissue_rgb[400:600, 200:400].copy())]  # the second tile's pixels changed
    save_sources(other, config, tmp_path / "b")
    assert (folder / "00000.npz").stat().st_mtime_ns == kept
    save_sources(other, config, tmp_path / "c")
    assert (folder / "00001.npz").read_bytes() == (tmp_path / "c" / SOURCES_DIR / "00001.npz").read_bytes()


def test_prepared_tiles_record_their_guide_by_its_weights(tmp_path: Path, tissue_rgb: np.ndarray) -> None:
    from pysynth.models.io import model_digest, resolve_model_dir
    from pysynth.synth.config import SynthConfig
    from pysynth.synth.generate import SOURCES_DIR, save_sources

    tiles = [("X.png", tissue_rgb[:200, :200].copy())]
    save_sources(tiles, SynthConfig(size=80, guide="plain", guide_tta=1), tmp_path)
    record = json.loads((tmp_path / SOURCES_DIR / "digests.json").read_text())
    assert record["guide"] == model_digest(resolve_model_dir("plain"))
    kept = (tmp_path / SOURCES_DIR / "00000.npz").read_bytes()
    save_sources(tiles, SynthConfig(size=80, guide="default", guide_tta=1), tmp_path)  # another guide: redone
    assert (tmp_path / SOURCES_DIR / "00000.npz").read_bytes() != kept


def test_infer_refuses_region_settings_that_break_its_seams(run_cli, tmp_path: Path, tissue_rgb: np.ndarray) -> None:
    image = _png(tmp_path / "in" / "X.png", tissue_rgb[:256, :256])
    for args, message in (
        (("--core", "64", "--margin", "0"), "--margin"),
        (("--core", "104"), "--core 104 is not a multiple of 16"),
        (("--margin", "136"), "--margin 136 is not a multiple of 16"),
    ):
        r = run_cli("infer", image, "--input-mpp", "0.5", "--out", tmp_path / "out", *args)
        assert r.code == 2, args
        assert message in r.err
        assert len(r.error_lines()) == 1
    assert not (tmp_path / "out").exists()

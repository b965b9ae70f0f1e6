"""Whole-slide inference on real tissue: seams, coordinates, resolution, resume, outputs and bad input."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from pysynth.infer import (
    GEOJSON,
    PARTS,
    SUMMARY,
    InferConfig,
    fit_colour,
    infer_slide,
    inference_model,
    rasterise,
)
from pysynth.io import ArrayReader, open_slide, read_region
from pysynth.models.io import default_model_dir


@pytest.fixture(scope="module")
def model_info():
    return inference_model(str(default_model_dir()))


@pytest.fixture(scope="module")
def tissue_40x() -> np.ndarray:
    """A 560×720 px region of the bundled real slide at 0.25 µm/px (upsampled from 20x), dense with nuclei."""
    from pysynth import data_path

    with open_slide(data_path("CMU-1-Small-Region.svs")) as slide:
        return read_region(slide, 900, 1200, (560, 720), 0.25)


def _run(reader, model_info, out: Path, **kw) -> tuple[list[dict], dict]:
    model, info = model_info
    config = kw.pop("config", InferConfig())
    infer_slide(reader, model, info, out, config=config, model_id="test", **kw)
    features = json.loads((out / GEOJSON).read_text())["features"]
    return features, json.loads((out / SUMMARY).read_text())


def _match(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, int, int]:
    """Best IoU in ``b`` of each instance of ``a``; and the instance counts."""
    from pysynth.metrics import best_iou

    return best_iou(a, b), len(np.unique(a[a > 0])), len(np.unique(b[b > 0]))


def test_regions_tiled_with_margins_give_the_nuclei_of_one_pass(tmp_path, model_info, tissue_40x):
    # Seam test on real tissue: 20 small regions (cores of 160 px, non-square ones at the right and bottom edges)
    # against one region holding everything: the same nuclei, each whole (IoU >= 0.95), none twice.
    reader = ArrayReader(tissue_40x, 0.25)
    whole, _ = _run(reader, model_info, tmp_path / "whole", config=InferConfig(core=2048))
    tiled, summary = _run(reader, model_info, tmp_path / "tiled", config=InferConfig(core=160, margin=128))
    assert summary["regions"] == 20  # 4 × 5 grid, every region has tissue
    assert len(whole) > 100
    shape = tissue_40x.shape[:2]
    a, b = rasterise(whole, shape), rasterise(tiled, shape)
    best, na, nb = _match(a, b)
    assert nb == na
    assert np.all(best >= 0.95), f"{np.sum(best < 0.95)} of {na} nuclei differ"
    # No duplicates: drawn one by one, no tiled nucleus overlaps another.
    drawn = np.zeros(shape, np.int32)
    for feat in tiled:
        one = rasterise([feat], shape) > 0
        assert not np.any(drawn[one]), "two tiled nuclei overlap"
        drawn[one] = 1


def test_polygons_land_on_the_nuclei_of_a_real_slide_at_level0(tmp_path, model_info, sample_slide):
    # A 20x slide read at 40x with regions whose border ones are not square: the polygons, in level-0
    # coordinates of the slide, must cover what `segment` finds on the same pixels (no x/y swap, no offset) and
    # lie on dark (haematoxylin) pixels of the level-0 image.
    from pysynth.segment import segment_rgb
    from pysynth.synth.deconv import rgb_to_hed

    with open_slide(sample_slide) as slide:
        level0 = slide.read_level(0, 700, 1500, 600, 430)  # tissue, at the slide's 0.499 µm/px
    reader = ArrayReader(level0, 0.499)
    model, info = model_info
    features, summary = _run(reader, model_info, tmp_path / "s", config=InferConfig(core=512, normalise="none"))
    assert summary["regions"] == 6  # cores of 512 px at 0.25 µm/px: 1203×862 px → 3 columns × 2 rows
    drawn = rasterise(features, level0.shape[:2])
    reference = segment_rgb(model, info, level0, 0.499)
    best, na, nb = _match(drawn, reference)
    assert na > 30
    assert abs(na - nb) <= 0.1 * nb
    assert np.median(best) > 0.7
    hema = rgb_to_hed(level0)[..., 0]
    assert hema[drawn > 0].mean() > hema[drawn == 0].mean() + 0.05
    # Measurements agree with the geometry exactly: a polygon is its nucleus' pixel-edge outline on the model's grid
    # scaled to level-0 px, so its area is the pixel count (= Area µm^2 / 0.25²) and its centroid the mean of the
    # pixel centres. The only slack is rounding: vertices and centroids are written to 0.01 level-0 px, which moves
    # the area by at most 0.005 px times the outline's length along x plus along y, and areas to 0.001 µm²
    # (measured: at most 0.59 of that bound, 0.0085 px on the centroids).
    import shapely

    assert len(features) > 100
    for feat in features:
        ring = np.array(feat["geometry"]["coordinates"][0], np.float64)
        poly = shapely.Polygon(ring)
        assert poly.is_valid
        m = feat["properties"]["measurements"]
        rounding = 0.005 * np.abs(np.diff(ring, axis=0)).sum() * 0.499**2 + 0.0005
        assert abs(m["Area µm^2"] - poly.area * 0.499**2) <= rounding
        c = poly.centroid
        assert abs(c.x - m["Centroid X px"]) < 0.02
        assert abs(c.y - m["Centroid Y px"]) < 0.02
    # The CSV (the method's released format) carries the pixel counts themselves: µm² = pixels × 0.25², rounded.
    rows = [
        line.split(",", 2)
        for path in sorted((tmp_path / "s" / "csv").glob("*.csv"))
        for line in path.read_text().splitlines()[1:]
    ]
    assert len(rows) == len(features)
    for pixels, area_um2, _ in rows:
        assert float(area_um2) == round(int(pixels) * 0.25**2, 3)


def _agreement(a: np.ndarray, b: np.ndarray) -> tuple[float, int, int]:
    """Share of ``a``'s nuclei with IoU >= 0.98 in ``b``; and the counts."""
    best, na, nb = _match(a, b)
    return float(np.mean(best >= 0.98)), na, nb


def test_infer_and_segment_with_defaults_give_the_same_nuclei(tmp_path, model_info, tissue_40x):
    # The same real pixels through both commands' library paths, as the commands read them: a 40x image written
    # as a PNG, then one region / one pass, and a slide cut in 3 × 3 regions / cores of the same layout.
    from pysynth.segment import segment_image

    model, info = model_info
    png = tmp_path / "tissue.png"
    cv2.imwrite(str(png), cv2.cvtColor(tissue_40x, cv2.COLOR_RGB2BGR))
    with open_slide(png, 0.25) as reader:
        rgb = read_region(reader, 0, 0, reader.level_shapes_hw[0], reader.mpp)
        for name, core in (("one", None), ("tiled", 256)):
            config = InferConfig() if core is None else InferConfig(core=core)
            features, summary = _run(reader, model_info, tmp_path / name, config=config)
            assert summary["regions"] == (1 if core is None else 9)
            found = segment_image(model, info, rgb, 0.25, **({} if core is None else {"core": core}))
            drawn = rasterise(features, rgb.shape[:2])
            share, n_segment, n_infer = _agreement(found.labels, drawn)
            assert n_segment > 100
            assert abs(n_segment - n_infer) <= 0.005 * n_segment, (name, n_segment, n_infer)
            assert share >= 0.99, (name, share)
            # The same confidences, nucleus by nucleus (matched by their centroid's pixel).
            for feat in features[:40]:
                m = feat["properties"]["measurements"]
                k = found.labels[int(m["Centroid Y px"]), int(m["Centroid X px"])]
                if k:
                    assert m["Confidence"] == pytest.approx(found.confidence[k], abs=2e-3)
                    assert m["Detection peak"] == pytest.approx(found.detection_peak[k], abs=2e-3)


def test_infer_and_segment_agree_on_a_20x_slide(tmp_path, model_info, sample_slide):
    # Read at 0.499 µm/px and resampled to the model's 0.25 the same way, the two find the same nuclei on the
    # model's grid. On the slide's own pixels they differ only where infer's polygon vertices, rounded to 0.01
    # level-0 px, pass within that of a pixel centre (a pixel or two on a few nuclei).
    from pysynth.instances import find_instances
    from pysynth.segment import model_extent, predict_maps, to_model_grid

    model, info = model_info
    with open_slide(sample_slide) as slide:
        level0 = slide.read_level(0, 700, 1500, 600, 430)
    features, _ = _run(ArrayReader(level0, 0.499), model_info, tmp_path / "s")
    det, seg = predict_maps(model, to_model_grid(level0, 0.499, info.mpp), tile=2048, context=128)
    on_model_grid = find_instances(det, seg, info.instances).labels
    assert on_model_grid.shape == model_extent(level0.shape[:2], 0.499, info.mpp)
    share, n_segment, n_infer = _agreement(on_model_grid, rasterise(features, on_model_grid.shape, 0.499 / 0.25))
    assert n_segment == n_infer > 100
    assert share >= 0.99
    from pysynth.segment import segment_image

    labels = segment_image(model, info, level0, 0.499).labels
    drawn = rasterise(features, level0.shape[:2])
    assert np.mean((labels > 0) == (drawn > 0)) > 0.999
    share, _, _ = _agreement(labels, drawn)
    assert share >= 0.9


def test_infer_settings_hold_tta_and_min_confidence(tmp_path, model_info, tissue_40x):
    from pysynth.errors import PysynthError

    model, info = model_info
    reader = ArrayReader(tissue_40x[:300, :400].copy(), 0.25)
    every, summary = _run(reader, model_info, tmp_path / "all", config=InferConfig(min_confidence=0.0))
    assert summary["settings"]["config"]["tta"] == 1
    assert summary["settings"]["instances"]["min_confidence"] == 0.0
    for other in (InferConfig(min_confidence=0.0, tta=2), InferConfig(min_confidence=0.8)):
        with pytest.raises(PysynthError, match="with other settings"):
            infer_slide(reader, model, info, tmp_path / "all", config=other, model_id="test")
    # Dropping nuclei below a confidence leaves the others exactly as they were.
    high, summary = _run(reader, model_info, tmp_path / "high", config=InferConfig(min_confidence=0.8))
    expected = [f for f in every if f["properties"]["measurements"]["Confidence"] >= 0.8]
    assert 0 < len(high) == len(expected) < len(every)
    assert [f["geometry"] for f in high] == [f["geometry"] for f in expected]
    assert summary["nuclei"] == len(high)
    # The model's own minimum confidence when none is given.
    default, summary = _run(reader, model_info, tmp_path / "default")
    assert summary["settings"]["instances"]["min_confidence"] == info.instances.min_confidence
    assert len(default) == sum(
        f["properties"]["measurements"]["Confidence"] >= info.instances.min_confidence for f in every
    )


def test_infer_tta_averages_flipped_windows(tmp_path, model_info, tissue_40x):
    # One region: infer's network stage with --tta 2 gives segment's --tta 2 nuclei, not the plain ones.
    from pysynth.segment import segment_image

    model, info = model_info
    rgb = tissue_40x[:300, :400].copy()
    flipped, summary = _run(ArrayReader(rgb, 0.25), model_info, tmp_path / "2", config=InferConfig(tta=2))
    assert summary["settings"]["config"]["tta"] == 2
    drawn = rasterise(flipped, rgb.shape[:2])
    share, n_segment, n_infer = _agreement(segment_image(model, info, rgb, 0.25, tta=2).labels, drawn)
    assert n_segment == n_infer
    assert share >= 0.99
    plain, _, _ = _agreement(segment_image(model, info, rgb, 0.25).labels, drawn)
    assert plain < 0.9


def test_infer_config_checks_tta_and_min_confidence() -> None:
    assert InferConfig().normalise == "none"
    assert InferConfig().tta == 1
    with pytest.raises(ValueError, match="tta"):
        InferConfig(tta=3)
    with pytest.raises(ValueError, match="min_confidence"):
        InferConfig(min_confidence=1.5)


def test_geojson_is_valid_qupath_detections_and_csv_matches(tmp_path, model_info, tissue_40x):
    import shapely

    reader = ArrayReader(tissue_40x[:300, :400].copy(), 0.25)
    features, summary = _run(reader, model_info, tmp_path / "g")
    data = json.loads((tmp_path / "g" / GEOJSON).read_text())
    assert data["type"] == "FeatureCollection"
    assert len(features) == summary["nuclei"] > 10
    for feat in features:
        ring = feat["geometry"]["coordinates"][0]
        assert feat["geometry"]["type"] == "Polygon"
        assert ring[0] == ring[-1]
        assert shapely.Polygon(ring).is_valid
        assert feat["properties"]["objectType"] == "detection"
        measurements = feat["properties"]["measurements"]
        assert set(measurements) >= {"Area µm^2", "Perimeter µm", "Hematoxylin OD mean", "Confidence", "Detection peak"}
        assert 0 < measurements["Confidence"] <= 1
        assert 0 < measurements["Detection peak"] <= 1
    rows = []
    for path in sorted((tmp_path / "g" / "csv").glob("*.csv")):
        lines = path.read_text().splitlines()
        assert lines[0] == "AreaInPixels,PhysicalSize,Polygon"
        rows += lines[1:]
    assert len(rows) == len(features)
    values = [float(v) for v in rows[0].split(",", 2)[2].strip("[]").split(":")]
    assert np.allclose(np.reshape(values, (-1, 2)), features[0]["geometry"]["coordinates"][0][:-1], atol=0.01)
    assert (tmp_path / "g" / "overlay.png").is_file()
    assert not (tmp_path / "g" / PARTS).exists()


def test_20x_and_40x_slides_give_nuclei_of_the_same_physical_size(tmp_path, model_info, tissue_40x):
    image_40x = tissue_40x
    image_20x = cv2.resize(image_40x, (image_40x.shape[1] // 2, image_40x.shape[0] // 2), interpolation=cv2.INTER_AREA)
    f40, _ = _run(ArrayReader(image_40x, 0.25), model_info, tmp_path / "x40")
    f20, _ = _run(ArrayReader(image_20x, 0.5), model_info, tmp_path / "x20")
    a40 = np.median([f["properties"]["measurements"]["Area µm^2"] for f in f40])
    a20 = np.median([f["properties"]["measurements"]["Area µm^2"] for f in f20])
    assert a20 == pytest.approx(a40, rel=0.15)
    assert len(f20) == pytest.approx(len(f40), rel=0.2)


def test_an_interrupted_slide_resumes_to_the_same_result(tmp_path, model_info, tissue_40x):
    reader = ArrayReader(tissue_40x, 0.25)
    config = InferConfig(core=256)
    _run(reader, model_info, tmp_path / "ref", config=config)
    model, info = model_info
    calls = []
    with pytest.raises(KeyboardInterrupt):
        infer_slide(
            reader, model, info, tmp_path / "cut", config=config, model_id="test",
            stop=lambda: calls.append(1) or len(calls) >= 2,
        )  # fmt: skip
    parts = sorted((tmp_path / "cut" / PARTS).glob("0*.json"))
    assert len(parts) == 2
    assert not (tmp_path / "cut" / SUMMARY).exists()
    result = infer_slide(reader, model, info, tmp_path / "cut", config=config, model_id="test")
    assert result.resumed_regions == 2
    assert (tmp_path / "cut" / GEOJSON).read_bytes() == (tmp_path / "ref" / GEOJSON).read_bytes()
    # A finished slide is skipped; other settings in the same folder are refused.
    assert infer_slide(reader, model, info, tmp_path / "cut", config=config, model_id="test").skipped
    from pysynth.errors import PysynthError

    with pytest.raises(PysynthError, match="with other settings"):
        infer_slide(reader, model, info, tmp_path / "cut", config=InferConfig(core=512), model_id="test")


def test_killed_run_resumes_to_the_same_result(tmp_path, tissue_40x):
    # kill -9 in the middle of a slide: the rerun keeps the finished regions and ends with the same files.
    image = tmp_path / "in" / "tissue.png"
    image.parent.mkdir()
    big = np.concatenate([tissue_40x, tissue_40x[:, ::-1]], axis=1)
    cv2.imwrite(str(image), cv2.cvtColor(big, cv2.COLOR_RGB2BGR))
    cmd = [sys.executable, "-c", "from pysynth.cli import main; main()", "infer", str(image), "--input-mpp", "0.25"]
    cmd += ["--core", "192"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([*cmd, "--out", str(tmp_path / "ref")], check=True, env=env, capture_output=True)
    proc = subprocess.Popen([*cmd, "--out", str(tmp_path / "cut")], env=env, stderr=subprocess.DEVNULL)
    parts = tmp_path / "cut" / "tissue" / PARTS
    deadline = time.time() + 120
    while time.time() < deadline and len(list(parts.glob("0*.json"))) < 3:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    kept = len(list(parts.glob("0*.json")))
    assert 3 <= kept < 24, "the kill should land in the middle of the slide"
    done = subprocess.run([*cmd, "--out", str(tmp_path / "cut")], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    for name in (GEOJSON, "overlay.png"):
        assert (tmp_path / "cut" / "tissue" / name).read_bytes() == (tmp_path / "ref" / "tissue" / name).read_bytes()
    assert json.loads((tmp_path / "cut" / "tissue" / SUMMARY).read_text())["resumed_regions"] == kept


def test_colour_normalisation_moves_slide_statistics_to_the_reference(tissue_40x):
    from pysynth.infer import REFERENCE_LAB

    tinted = np.clip(tissue_40x.astype(np.float32) * [0.8, 1.05, 0.9] + [10, 0, 25], 0, 255).astype(np.uint8)
    colour = fit_colour([tinted], "reinhard")
    fixed = fit_colour([colour.apply(tinted)], "reinhard")
    assert np.allclose(fixed.params["mean"], REFERENCE_LAB[0], atol=1.5)
    assert np.allclose(fixed.params["std"], REFERENCE_LAB[1], rtol=0.1)
    assert fit_colour([np.full((50, 50, 3), 240, np.uint8)], "reinhard").method == "none"  # glass only


def _unit(v: list[float]) -> np.ndarray:
    return np.asarray(v, np.float64) / np.linalg.norm(v)


def _stained(he: np.ndarray, seed: int, n: int = 160) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An image made by Beer–Lambert from stain vectors ``he`` (columns H, E): RGB, concentrations, pixel kinds.

    A third of the pixels hold haematoxylin only (kind 0), a third eosin only (1), the rest both (2), at
    concentrations whose optical densities all pass Macenko's 0.15 floor, so the extreme angles are the stains.
    """
    rng = np.random.default_rng(seed)
    kind = rng.integers(0, 3, (n, n))
    conc = np.stack([rng.uniform(0.4, 1.2, (n, n)), rng.uniform(0.6, 1.2, (n, n))], axis=-1)
    conc[kind == 1, 0] = 0
    conc[kind == 0, 1] = 0
    rgb = np.clip(256 * np.exp(-conc @ he.T) - 1 + 0.5, 0, 255).astype(np.uint8)
    return rgb, conc, kind


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity along the last axis."""
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def test_macenko_finds_the_stains_and_maps_them_to_the_reference():
    from pysynth.infer.colour import REFERENCE_HE, REFERENCE_MAX_C, ColourModel

    known = np.stack([_unit([0.65, 0.70, 0.29]), _unit([0.27, 0.83, 0.49])], axis=1)
    rgb, conc, _ = _stained(known, seed=0)
    fitted = fit_colour([rgb], "macenko")
    assert fitted.method == "macenko"
    he = np.array(fitted.params["he"])
    assert np.all(_cosine(he.T, known.T) > 0.999)  # haematoxylin first, then eosin (measured: 0.99999 each)
    # The concentrations' 99th percentiles, on the pixels dense enough to fit on (measured within 1%).
    np.testing.assert_allclose(fitted.params["max_c"], np.percentile(conc.reshape(-1, 2), 99, axis=0), rtol=0.03)

    # Another lab's stains, each some way off the reference's (cosine 0.977, 0.984), are mapped onto the reference:
    # every pixel's optical density becomes that of the reference stains at its concentrations, rescaled so that
    # their 99th percentiles are the reference's.
    other = np.stack([_unit([0.45, 0.85, 0.28]), _unit([0.35, 0.70, 0.62])], axis=1)
    assert np.all(_cosine(other.T, REFERENCE_HE.T) < 0.99)
    rgb, conc, kind = _stained(other, seed=1)
    colour = fit_colour([rgb], "macenko")
    expected = (conc * (REFERENCE_MAX_C / np.percentile(conc.reshape(-1, 2), 99, axis=0))) @ REFERENCE_HE.T

    def od_error(model: ColourModel) -> tuple[float, float, np.ndarray]:
        out = model.apply(rgb, lookup=False)  # the per-pixel specification (the lookup table is tested to equal it)
        od = -np.log((out.astype(np.float64) + 1.0) / 256.0)
        rel = np.abs(od - expected).sum(-1) / expected.sum(-1)
        # The optical density of the haematoxylin-only and eosin-only pixels, against the reference stains.
        directions = np.array([_cosine(od[kind == k], REFERENCE_HE[:, k]).min() for k in (0, 1)])
        return float(np.median(rel)), float(np.percentile(rel, 99)), directions

    median, worst, directions = od_error(colour)
    assert np.all(directions > 0.999)  # measured: 0.99997 and 0.9998
    assert median < 0.02  # measured: 0.008 (8-bit rounding of the input and output, max_c fitted within 1%)
    assert worst < 0.06  # measured: 0.035
    # The checks have teeth: with the fitted stains swapped (eosin read as haematoxylin) they fail by far.
    swapped = ColourModel(
        "macenko", {"he": np.array(colour.params["he"])[:, ::-1].tolist(), "max_c": colour.params["max_c"]}
    )
    median, worst, directions = od_error(swapped)
    assert median > 0.2
    assert np.all(directions < 0.95)


def test_cli_bad_inputs_fail_alone_and_clearly(tmp_path, run_cli, tissue_40x):
    good, empty, corrupt = tmp_path / "good.png", tmp_path / "glass.png", tmp_path / "bad.svs"
    cv2.imwrite(str(good), cv2.cvtColor(tissue_40x[:256, :256], cv2.COLOR_RGB2BGR))
    cv2.imwrite(str(empty), np.full((300, 300, 3), 242, np.uint8))
    corrupt.write_bytes(b"II*\x00" + b"\x00" * 500)
    r = run_cli("infer", good, empty, corrupt, "--input-mpp", "0.25", "--out", tmp_path / "out")
    assert r.code == 1
    assert any("bad.svs" in line for line in r.error_lines())
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert [s["status"] for s in run["slides"]] == ["done", "done", "failed"]
    glass = json.loads((tmp_path / "out" / "glass" / GEOJSON).read_text())
    assert glass["features"] == []
    assert not (tmp_path / "out" / "bad").exists() or not (tmp_path / "out" / "bad" / SUMMARY).exists()
    # No resolution: a clear error, and nothing written for that input.
    r = run_cli("infer", good, "--out", tmp_path / "out2")
    assert r.code == 1
    assert "--input-mpp" in r.error_lines()[0]
    r = run_cli("infer", tmp_path / "nothing.svs", "--out", tmp_path / "out3")
    assert r.code != 0
    assert len(r.error_lines()) == 1
    assert "Traceback" not in r.err
    notes = tmp_path / "notes.txt"
    notes.write_text("not a slide")
    r = run_cli("infer", notes, "--out", tmp_path / "out4", "--input-mpp", "0.25")
    assert r.code != 0
    assert "Traceback" not in r.err


def test_cli_tta_and_min_confidence_are_passed_and_recorded(tmp_path, run_cli, tissue_40x):
    good = tmp_path / "good.png"
    cv2.imwrite(str(good), cv2.cvtColor(tissue_40x[:256, :256], cv2.COLOR_RGB2BGR))
    args = ("infer", good, "--input-mpp", "0.25", "--out", tmp_path / "out")
    r = run_cli(*args, "--tta", "2", "--min-confidence", "0.7")
    assert r.code == 0, r.err
    summary = json.loads((tmp_path / "out" / "good" / SUMMARY).read_text())
    assert summary["settings"]["config"]["tta"] == 2
    assert summary["settings"]["config"]["normalise"] == "none"
    assert summary["settings"]["instances"]["min_confidence"] == 0.7
    features = json.loads((tmp_path / "out" / "good" / GEOJSON).read_text())["features"]
    assert features
    assert all(f["properties"]["measurements"]["Confidence"] >= 0.7 for f in features)
    assert run_cli(*args, "--tta", "2", "--min-confidence", "0.7").code == 0  # the same settings: skipped
    for other in (("--min-confidence", "0.7"), ("--tta", "2")):  # tta 1, or the model's minimum confidence
        r = run_cli(*args, *other)
        assert r.code == 1
        assert "with other settings" in r.err
    assert run_cli(*args, "--overwrite").code == 0
    assert run_cli(*args, "--tta", "5").code == 2
    assert run_cli(*args, "--min-confidence", "1.5").code == 2


def test_cli_disk_full_fails_cleanly(tmp_path, run_cli, tissue_40x, small_disk):
    disk = small_disk("300k")
    good = tmp_path / "good.png"
    cv2.imwrite(str(good), cv2.cvtColor(tissue_40x, cv2.COLOR_RGB2BGR))
    r = run_cli("infer", good, "--input-mpp", "0.25", "--out", disk / "out")
    assert r.code == 1
    assert any("No space left" in line for line in r.error_lines())
    assert not (disk / "out" / "good" / SUMMARY).exists()
    leftovers = [p.name for p in (disk / "out").rglob("*") if p.name.endswith((".part", ".tmp"))]
    assert leftovers == []


def test_colour_lookup_table_equals_the_per_pixel_normalisation(tissue_40x):
    for method in ("reinhard", "macenko"):
        colour = fit_colour([tissue_40x], method)
        assert colour.method == method
        region = tissue_40x[100:300, 50:450]
        assert np.array_equal(colour.apply(region), colour.transform(region))
        assert not np.array_equal(colour.apply(region), region)


@pytest.fixture(scope="module")
def three_images(tmp_path_factory, tissue_40x) -> list[Path]:
    folder = tmp_path_factory.mktemp("slides")
    crops = [tissue_40x[:256, :320], tissue_40x[200:456, 300:620], tissue_40x[300:, 400:]]
    paths = []
    for k, crop in enumerate(crops):
        path = folder / f"s{k}.png"
        cv2.imwrite(str(path), cv2.cvtColor(np.ascontiguousarray(crop), cv2.COLOR_RGB2BGR))
        paths.append(path)
    return paths


def _outputs(folder: Path) -> dict[str, bytes]:
    return {p.parent.name: p.read_bytes() for p in sorted(folder.glob("*/nuclei.geojson"))}


def test_worker_processes_and_a_dask_cluster_give_the_local_results(tmp_path, run_cli, three_images):
    distributed = pytest.importorskip("distributed")
    args = [*three_images, "--input-mpp", "0.25", "--core", "192"]
    assert run_cli("infer", *args, "--out", tmp_path / "local").code == 0
    local = _outputs(tmp_path / "local")
    assert len(local) == 3
    assert run_cli("infer", *args, "--out", tmp_path / "workers", "--workers", "2").code == 0
    assert _outputs(tmp_path / "workers") == local
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cl:
        r = run_cli("infer", *args, "--out", tmp_path / "dask", "--scheduler", cl.scheduler_address)
    assert r.code == 0, r.err
    assert _outputs(tmp_path / "dask") == local
    r = run_cli("infer", *args, "--out", tmp_path / "nowhere", "--scheduler", "tcp://127.0.0.1:9")
    assert r.code == 1
    assert "cannot connect" in r.error_lines()[0]


def test_glass_regions_of_a_large_slide_are_not_planned():
    # A 40,000² px slide whose tissue is one block: the summed-area table's differences give glass regions
    # fractions of ~1e-16, which must not count as tissue.
    from types import SimpleNamespace

    from pysynth.infer import plan_regions
    from pysynth.io.tissue import TissueMask

    mask = np.zeros((4096, 4096), bool)
    mask[1991:2098, 1992:2203] = True  # the tissue of a real 40k slide made by the bench
    mask[:700, :900] = True
    tissue = TissueMask(mask, 40000 / 4096, 40000 / 4096 * 0.25)
    reader = SimpleNamespace(mpp=0.25, level_shapes_hw=((40000, 40000),))
    regions = plan_regions(reader, 0.25, InferConfig(), tissue)
    glass = [r for r in regions if not tissue.mask[
        int(r.y / tissue.scale) : int((r.y + r.h) / tissue.scale) + 1,
        int(r.x / tissue.scale) : int((r.x + r.w) / tissue.scale) + 1,
    ].any()]  # fmt: skip
    assert regions
    assert glass == []


def test_tiles_inside_a_region_give_the_maps_and_nuclei_of_one_pass(tmp_path, model_info, tissue_40x):
    from pysynth.segment import core_splits, predict_maps

    # Cores cut a side into near-equal parts on the pooling grid, covering it once.
    for n, core in ((2304, 1152), (2304, 800), (560, 256), (97, 256), (1000, 333)):
        parts = core_splits(n, core, 16)
        assert parts[0][0] == 0
        assert parts[-1][1] == n
        assert all(a % 16 == 0 and b > a for a, b in parts)
        assert all(b == c for (_, b), (c, _) in itertools.pairwise(parts))
        assert len(parts) == max(1, -(-n // core))
    model, _ = model_info
    one = predict_maps(model, tissue_40x, tile=4096, context=128)
    tiled = predict_maps(model, tissue_40x, tile=256, context=128)  # 3 × 3 cores of the 560 × 720 image
    for a, b in zip(one, tiled, strict=True):
        assert np.abs(a - b).max() < 1e-5
    short = predict_maps(model, tissue_40x, tile=256, context=32)  # too little context: the maps move
    assert np.abs(short[1] - one[1]).max() > 0.05
    reader = ArrayReader(tissue_40x, 0.25)
    whole, _ = _run(reader, model_info, tmp_path / "whole", config=InferConfig(min_confidence=0.0))
    tiles, summary = _run(reader, model_info, tmp_path / "tiles", config=InferConfig(tile=256, min_confidence=0.0))
    assert summary["settings"]["config"]["tile"] == 256
    assert len(whole) > 100
    assert [f["geometry"] for f in tiles] == [f["geometry"] for f in whole]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.compile's own imports of deprecated torch APIs
def test_compiled_network_gives_the_nuclei_of_eager_and_falls_back_when_it_cannot(
    tmp_path, model_info, tissue_40x, monkeypatch, caplog
):
    import pysynth.infer as infer_module

    reader = ArrayReader(np.ascontiguousarray(tissue_40x[:320, :384]), 0.25)
    eager, _ = _run(reader, model_info, tmp_path / "eager", config=InferConfig(min_confidence=0.0))
    fast, summary = _run(
        reader, model_info, tmp_path / "compiled", config=InferConfig(compile=True, min_confidence=0.0)
    )
    assert summary["settings"]["config"]["compile"] is True
    assert len(eager) > 20
    a, b = rasterise(eager, (320, 384)), rasterise(fast, (320, 384))
    best, na, nb = _match(a, b)
    assert na == nb
    assert np.all(best >= 0.98)

    class Broken(torch.nn.Module):  # what a machine without a working compiler gives
        def __init__(self, model):
            super().__init__()
            self.inner = model
            self.config = model.config

        def forward(self, x):
            raise RuntimeError("no C++ compiler found\nmore detail")

    monkeypatch.setattr(infer_module.network, "_COMPILED", {})
    monkeypatch.setattr(torch, "compile", lambda model, **kw: Broken(model))
    with caplog.at_level("WARNING", logger="pysynth"):
        fallback, _ = _run(
            reader, model_info, tmp_path / "fallback", config=InferConfig(compile=True, min_confidence=0.0)
        )
    assert [f["geometry"] for f in fallback] == [f["geometry"] for f in eager]
    assert any("torch.compile failed (no C++ compiler found)" in r.getMessage() for r in caplog.records)

"""GeoJSON that QuPath 0.6 imports: every polygon survives the precision reduction QuPath runs on import.

QuPath 0.6 reduces every imported geometry to its default precision model (JTS ``PrecisionModel(100)``, a 0.01
grid; its integer model, a grid of 1, rounds ROIs elsewhere) and rejects invalid input with "Reduction failed,
possible invalid input". ``shapely.set_precision`` runs the same GEOS/JTS precision reduction.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import shapely

from pysynth.qupath import CLASS_COLOURS


def _check_features(features: list[dict]) -> None:
    assert len(features) > 30
    for feat in features:
        assert feat["geometry"]["type"] == "Polygon"
        polygon = shapely.Polygon(feat["geometry"]["coordinates"][0])
        assert polygon.is_valid, shapely.is_valid_reason(polygon)
        for grid in (0.01, 1.0):  # QuPath's default precision model, and its integer one
            reduced = shapely.set_precision(polygon, grid)
            assert reduced.is_valid
            assert not reduced.is_empty
        assert shapely.set_precision(polygon, 0.01).area == pytest.approx(polygon.area, rel=0.02)
        kind = feat["properties"]["classification"]
        assert kind["name"] in CLASS_COLOURS
        if "color" in kind:
            assert kind["color"] == list(CLASS_COLOURS[kind["name"]])
            assert all(isinstance(c, int) and 0 <= c <= 255 for c in kind["color"])


@pytest.fixture(scope="module")
def model_info():
    from pysynth.infer import inference_model
    from pysynth.models.io import default_model_dir

    return inference_model(str(default_model_dir()))


def test_infer_polygons_of_a_real_20x_slide_survive_qupath_precision(tmp_path, model_info, sample_slide) -> None:
    # A 20x slide read at 40x: level-0 coordinates are pixel corners scaled by 0.501, rounded to 0.01.
    from pysynth.infer import GEOJSON, InferConfig, infer_slide
    from pysynth.io import ArrayReader, open_slide

    with open_slide(sample_slide) as slide:
        level0 = slide.read_level(0, 700, 1500, 600, 430)
    model, info = model_info
    reader = ArrayReader(level0, 0.499)
    infer_slide(reader, model, info, tmp_path / "s", config=InferConfig(core=512), model_id="x")
    features = json.loads((tmp_path / "s" / GEOJSON).read_text())["features"]
    _check_features(features)
    coords = np.concatenate([np.asarray(f["geometry"]["coordinates"][0]) for f in features])
    assert np.any(coords % 1 != 0)  # the case that needs the check: non-integer level-0 coordinates


def test_segment_polygons_survive_qupath_precision(tmp_path, model_info, tissue_rgb) -> None:
    from pysynth.segment import output_paths, segment_image, write_outputs

    model, info = model_info
    found = segment_image(model, info, tissue_rgb[:300, :400], 0.499)
    write_outputs(tmp_path, "t", tissue_rgb[:300, :400], found, mpp=0.499)
    _check_features(json.loads(output_paths(tmp_path, "t").geojson.read_text())["features"])


def test_a_nucleus_touching_itself_at_a_corner_becomes_a_valid_polygon() -> None:
    # A 3 x 3 block without its top-left pixel and with its centre open: the pixel-edge outline runs round the
    # open centre through the corner they share, a ring GEOS and JTS call invalid ("Ring Self-intersection"). The
    # written ring is the repaired one: valid before and after QuPath's reductions.
    from pysynth.instances import trace_contours
    from pysynth.qupath import valid_ring

    labels = np.zeros((7, 7), np.int32)
    labels[2:5, 2:5] = 1
    labels[2, 2] = labels[3, 3] = 0
    ring = trace_contours(labels)[0]
    assert not shapely.Polygon(ring).is_valid
    fixed = shapely.Polygon(valid_ring(ring))
    assert fixed.is_valid
    for grid in (0.01, 1.0):
        assert shapely.set_precision(fixed, grid).is_valid
    assert fixed.area == 8  # the outline round the block, the open centre filled


def test_geojson_zip_holds_the_plain_geojson_and_is_what_the_folder_is_checked_by(
    run_cli, tmp_path, sample_slide
) -> None:
    # QuPath's Import objects reads a .zip of GeoJSON entries (PathIO.readObjects), not .gz.
    import zipfile

    import cv2

    from pysynth.infer import GEOJSON, GEOJSON_ZIP, InferConfig
    from pysynth.io import open_slide

    assert "geojson" not in InferConfig().record()  # slides of earlier versions keep their identity
    assert InferConfig(geojson="zip").record()["geojson"] == "zip"
    with pytest.raises(ValueError, match="geojson must be one of"):
        InferConfig(geojson="gz")
    with open_slide(sample_slide) as slide:
        level0 = slide.read_level(0, 700, 1500, 600, 430)
    image = tmp_path / "t.png"
    cv2.imwrite(str(image), cv2.cvtColor(np.ascontiguousarray(level0), cv2.COLOR_RGB2BGR))
    common = ("infer", image, "--input-mpp", "0.499", "--core", "512")
    assert run_cli(*common, "--out", tmp_path / "plain").code == 0
    r = run_cli(*common, "--out", tmp_path / "zip", "--geojson", "zip")
    assert r.code == 0, r.err
    plain = (tmp_path / "plain" / "t" / GEOJSON).read_bytes()
    packed = tmp_path / "zip" / "t" / GEOJSON_ZIP
    assert not (tmp_path / "zip" / "t" / GEOJSON).exists()
    with zipfile.ZipFile(packed) as archive:
        assert archive.testzip() is None  # every entry's CRC checks
        (entry,) = archive.infolist()
        assert entry.filename == GEOJSON
        assert entry.compress_type == zipfile.ZIP_DEFLATED
        assert archive.read(entry) == plain  # the same GeoJSON, byte for byte
    assert packed.stat().st_size < len(plain) / 3
    _check_features(json.loads(plain)["features"])
    first = packed.read_bytes()
    again = run_cli(*common, "--out", tmp_path / "zip", "--geojson", "zip")
    assert again.code == 0
    assert "skipped" in again.out  # the zip marks the slide finished
    redo = run_cli(*common, "--out", tmp_path / "zip", "--geojson", "zip", "--overwrite")
    assert redo.code == 0
    assert packed.read_bytes() == first  # a fixed time stamp: the same nuclei give the same bytes
    other = run_cli(*common, "--out", tmp_path / "zip")
    assert other.code == 1  # another format in the same folder: refused in one line, results kept
    assert any("geojson" in line for line in other.error_lines()), other.err
    assert packed.read_bytes() == first

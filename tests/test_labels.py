"""``infer --labels ome-tiff``: a tiled pyramidal OME-TIFF of instance ids equal to the GeoJSON rasterised on the
same grid, with the table's ids, the physical pixel size, and levels that halve down to one tile."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

tifffile = pytest.importorskip("tifffile")


def test_label_pyramid_equals_the_geojson_rasterised(run_cli, tmp_path: Path, sample_slide) -> None:
    from pysynth.infer import GEOJSON, rasterise
    from pysynth.infer.labels import LABELS, TILE
    from pysynth.io import open_slide
    from pysynth.table import TABLE, read_table

    with open_slide(sample_slide) as slide:
        level0 = slide.read_level(0, 700, 1400, 700, 500)  # 20x: the labels are at the model's 0.25 µm/px
    image = tmp_path / "t.png"
    cv2.imwrite(str(image), cv2.cvtColor(level0, cv2.COLOR_RGB2BGR))
    out = tmp_path / "out"
    # Regions of 512 px: nuclei of several regions share tiles of the first bands.
    r = run_cli("infer", image, "--input-mpp", "0.499", "--core", "512", "--labels", "ome-tiff", "--out", out)
    assert r.code == 0, r.err
    path = out / "t" / LABELS
    features = json.loads((out / "t" / GEOJSON).read_text())["features"]
    with tifffile.TiffFile(path) as tif:
        assert tif.is_ome
        series = tif.series[0]
        base = series.levels[0].asarray()
        levels = [level.asarray() for level in series.levels]
        page = series.levels[0].keyframe
        assert page.is_tiled
        assert (page.tilelength, page.tilewidth) == (TILE, TILE)
        meta = tifffile.xml2dict(tif.ome_metadata)["OME"]["Image"]["Pixels"]
    assert base.dtype == np.uint32
    h, w = base.shape
    assert (h, w) == (round(500 * 0.499 / 0.25 + 0.5 - 1e-9), round(700 * 0.499 / 0.25 + 0.5 - 1e-9))
    assert meta["PhysicalSizeX"] == pytest.approx(0.25)
    assert meta["PhysicalSizeXUnit"] == "µm"
    # Level 0 is the GeoJSON rasterised on the model's grid (level-0 slide px scaled by 0.499/0.25).
    expected = rasterise(features, (h, w), scale=0.499 / 0.25)
    ids = np.array([f["id"] for f in features])
    np.testing.assert_array_equal(base, ids[expected - 1] * (expected > 0))
    table_ids = read_table(out / "t" / TABLE).column("id").to_numpy()
    assert set(np.unique(base[base > 0]).tolist()) <= set(table_ids.tolist())
    assert len(np.unique(base[base > 0])) > 0.98 * len(features)
    # Each level halves the one above, down to one tile; a nucleus keeps its id at every level it shows in.
    assert len(levels) >= 2
    for above, level in itertools.pairwise(levels):
        assert level.shape == tuple(-(-s // 2) for s in above.shape)
    assert max(levels[-1].shape) <= TILE
    half = levels[1]
    shown = half > 0
    sampled = base[::2, ::2][: half.shape[0], : half.shape[1]]
    assert (half[shown] == sampled[shown]).mean() > 0.9  # a half-size pixel takes the nucleus at its centre


def test_labels_are_recorded_only_when_asked_for(run_cli, tmp_path: Path, tissue_rgb) -> None:
    from pysynth.infer import InferConfig

    assert "labels" not in InferConfig().record()  # slides of earlier versions keep their identity
    assert InferConfig(labels="ome-tiff").record()["labels"] == "ome-tiff"
    with pytest.raises(ValueError, match="labels must be one of"):
        InferConfig(labels="png")
    image = tmp_path / "t.png"
    cv2.imwrite(str(image), cv2.cvtColor(tissue_rgb[:300, :300], cv2.COLOR_RGB2BGR))
    out = tmp_path / "out"
    assert run_cli("infer", image, "--input-mpp", "0.499", "--out", out).code == 0
    assert not (out / "t" / "labels.ome.tif").exists()
    again = run_cli("infer", image, "--input-mpp", "0.499", "--out", out, "--labels", "ome-tiff")
    assert again.code == 1  # other settings: refused in one line, results kept
    assert any("labels" in line for line in again.error_lines()), again.err


def test_a_failed_label_write_leaves_nothing_half_written_and_the_rerun_finishes(
    tmp_path: Path, tissue_rgb, monkeypatch
) -> None:
    import pysynth.infer.labels as labels_module
    from pysynth.infer import PARTS, SUMMARY, InferConfig, infer_slide, inference_model
    from pysynth.io import ArrayReader
    from pysynth.models.io import default_model_dir

    model, info = inference_model(str(default_model_dir()))
    reader = ArrayReader(tissue_rgb[:300, :300], 0.499, name="t.png")
    config = InferConfig(labels="ome-tiff")
    real = labels_module._level_tiles

    def full_disk(parts, shape, scale):
        for i, tile in enumerate(real(parts, shape, scale)):
            if i == 2:
                raise OSError(28, "No space left on device")
            yield tile

    monkeypatch.setattr(labels_module, "_level_tiles", full_disk)
    with pytest.raises(OSError, match="No space left"):
        infer_slide(reader, model, info, tmp_path / "t", config=config, model_id="x")
    left = sorted(p.name for p in (tmp_path / "t").iterdir())
    assert "labels.ome.tif" not in left
    assert not [name for name in left if name.endswith(".part")]
    assert SUMMARY not in left  # not finished: the rerun redoes what is missing
    assert len(list((tmp_path / "t" / PARTS).glob("0*.json"))) > 0  # the finished regions are kept
    monkeypatch.setattr(labels_module, "_level_tiles", real)
    result = infer_slide(reader, model, info, tmp_path / "t", config=config, model_id="x")
    assert result.resumed_regions == result.regions
    with tifffile.TiffFile(tmp_path / "t" / "labels.ome.tif") as tif:
        assert tif.series[0].levels[0].asarray().max() == result.nuclei

"""The per-nucleus table (``nuclei.parquet``): one row per GeoJSON feature with the same id, values that agree with
the GeoJSON and with direct computations, written whole or not at all, and refused when of another version."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from pysynth.errors import PysynthError
from pysynth.infer import MEASUREMENTS_VERSION
from pysynth.table import TABLE, TABLE_VERSION, read_table, schema, stain_stats, table_metadata, table_writer


def test_stain_stats_match_a_per_label_loop(rng) -> None:
    from pysynth.synth.deconv import rgb_to_hed_reference

    rgb = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    labels = rng.integers(0, 5, (30, 40)).astype(np.int32)
    labels[labels == 3] = 0  # an absent label
    stats = stain_stats(labels, rgb)
    hed = rgb_to_hed_reference(rgb)
    for k in range(1, 5):
        values = hed[labels == k]
        if len(values) == 0:
            assert stats["hematoxylin_od_mean"][k] == 0
            continue
        np.testing.assert_allclose(stats["hematoxylin_od_mean"][k], values[:, 0].mean(), atol=1e-5)
        np.testing.assert_allclose(stats["hematoxylin_od_sd"][k], values[:, 0].std(), atol=1e-5)
        np.testing.assert_allclose(stats["eosin_od_mean"][k], values[:, 1].mean(), atol=1e-5)
        np.testing.assert_allclose(stats["eosin_od_sd"][k], values[:, 1].std(), atol=1e-5)


def test_infer_table_has_a_row_per_feature_with_its_values(tmp_path: Path, model_info, tissue_crop) -> None:
    from pysynth.infer import GEOJSON, InferConfig, infer_slide
    from pysynth.io import ArrayReader

    model, info = model_info
    reader = ArrayReader(tissue_crop, 0.25, name="t.png")
    infer_slide(reader, model, info, tmp_path / "t", config=InferConfig(core=192), model_id="x")
    features = json.loads((tmp_path / "t" / GEOJSON).read_text())["features"]
    table = read_table(tmp_path / "t" / TABLE)
    assert len(features) > 30
    assert table.num_rows == len(features)
    assert table.schema.equals(schema(table_metadata(table)), check_metadata=False)
    meta = table_metadata(table)
    assert meta["slide_mpp"] == 0.25
    assert meta["source"] == "t.png"
    rows = table.to_pylist()
    regions = set()
    for feat, row in zip(features, rows, strict=True):
        m = feat["properties"]["measurements"]
        assert row["id"] == feat["id"]
        assert row["centroid_x_px"] == m["Centroid X px"]
        assert row["centroid_y_px"] == m["Centroid Y px"]
        assert row["centroid_x_um"] == pytest.approx(m["Centroid X px"] * 0.25)
        assert row["area_um2"] == m["Area µm^2"]
        assert row["circularity"] == m["Circularity"]
        assert row["hematoxylin_od_mean"] == pytest.approx(m["Hematoxylin OD mean"], abs=1e-6)
        assert row["eosin_od_sd"] == pytest.approx(m["Eosin OD sd"], abs=1e-6)
        assert row["confidence"] == pytest.approx(m["Confidence"], abs=1e-6)
        assert row["lymphocyte_probability"] == pytest.approx(m["Lymphocyte probability"], abs=1e-6)
        assert row["classification"] == feat["properties"]["classification"]["name"]
        regions.add(row["region"])
    assert len(regions) > 1  # regions of 192 px: nuclei come from several, one row group each
    import pyarrow.parquet as pq

    assert pq.ParquetFile(tmp_path / "t" / TABLE).metadata.num_row_groups == len(regions)


@pytest.mark.parametrize("call", ["probability", "probability+rule"])
def test_segment_table_agrees_with_its_labels_and_geojson(tmp_path: Path, model_info, tissue_crop, call) -> None:
    from pysynth.segment import output_paths, segment_image, write_outputs

    model, info = model_info
    found = segment_image(model, info, tissue_crop, 0.25)
    write_outputs(tmp_path, "t", tissue_crop, found, mpp=0.25, lymphocyte_threshold=0.5, lymphocyte_call=call)
    paths = output_paths(tmp_path, "t", found.count)
    features = json.loads(paths.geojson.read_text())["features"]
    rows = read_table(paths.table).to_pylist()
    labels = cv2.imread(str(paths.labels), cv2.IMREAD_UNCHANGED).astype(np.int64)
    assert [r["id"] for r in rows] == [f["id"] for f in features]
    assert len(rows) > 30
    for row in rows[::7]:
        ys, xs = np.nonzero(labels == row["id"])
        assert row["area_um2"] == pytest.approx(len(ys) * 0.0625, rel=1e-12)  # pixel count x (0.25 µm)², exactly
        assert row["centroid_x_px"] == pytest.approx(xs.mean() + 0.5)
        assert row["centroid_y_um"] == pytest.approx((ys.mean() + 0.5) * 0.25)
        assert row["confidence"] == pytest.approx(found.confidence[row["id"]], abs=1e-6)
        assert row["region"] is None
    kinds = np.array([r["classification"] for r in rows])
    if call == "probability":
        called = np.array([found.lymphocyte[r["id"]] >= 0.5 for r in rows])
        assert (kinds == np.where(called, "Lymphocyte", "Nucleus")).all()
        return
    # The call over the image's nuclei (pysynth.lymphocyte), recomputed from the table's own columns; nuclei
    # within float32 rounding of the boundary are skipped.
    from pysynth.lymphocyte import call_scores, rule_scores

    names = ("lymphocyte_probability", "area_um2", "hematoxylin_od_mean", "circularity")
    column = {k: np.array([r[k] for r in rows], np.float64) for k in names}
    rule = rule_scores(column["area_um2"], column["hematoxylin_od_mean"], column["circularity"])
    score = call_scores(column["lymphocyte_probability"], rule, 0.5)
    sure = np.abs(score) > 1e-3
    assert (kinds[sure] == np.where(score[sure] > 0, "Lymphocyte", "Nucleus")).all()
    assert {"Lymphocyte", "Nucleus"} <= set(kinds)


def test_a_failed_write_leaves_no_table_and_other_versions_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "n.parquet"

    def interrupted() -> None:
        with table_writer(path, {"mpp": 0.25}) as table:
            table.write({"id": [1, 2], "centroid_x_px": [1.0, 2.0], "centroid_y_px": [3.0, 4.0]})
            raise RuntimeError("disk full")  # what an interrupted run meets

    with pytest.raises(RuntimeError):
        interrupted()
    assert list(tmp_path.iterdir()) == []  # neither the table nor a temporary file
    with table_writer(path, {"mpp": 0.25}) as table:
        table.write({"id": [1], "centroid_x_px": [1.0], "centroid_y_px": [3.0], "classification": ["Nucleus"]})
    assert read_table(path).to_pylist()[0]["classification"] == "Nucleus"
    import pyarrow as pa
    import pyarrow.parquet as pq

    old = pa.table({"id": [1]}).replace_schema_metadata({b"pysynth_table_version": b"0"})
    pq.write_table(old, tmp_path / "old.parquet")
    with pytest.raises(PysynthError, match=f"version 0; this pysynth reads version {TABLE_VERSION}"):
        read_table(tmp_path / "old.parquet")
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(PysynthError, match="not a readable nucleus table"):
        read_table(tmp_path / "junk.parquet")


def test_infer_writes_the_table_and_refuses_a_slide_of_older_measurements(run_cli, tmp_path: Path, tissue_crop) -> None:
    image = tmp_path / "in" / "t.png"
    image.parent.mkdir()
    cv2.imwrite(str(image), cv2.cvtColor(tissue_crop, cv2.COLOR_RGB2BGR))
    out = tmp_path / "out"
    r = run_cli("infer", image, "--input-mpp", "0.25", "--out", out)
    assert r.code == 0, r.err
    table = read_table(out / "t" / TABLE)
    assert table.num_rows == json.loads((out / "t" / "summary.json").read_text())["nuclei"]
    # A slide finished by a version with other measurements: its table is kept, the rerun refused in one line.
    summary = json.loads((out / "t" / "summary.json").read_text())
    summary["settings"]["measurements"] = 2
    (out / "t" / "summary.json").write_text(json.dumps(summary))
    before = (out / "t" / TABLE).read_bytes()
    again = run_cli("infer", image, "--input-mpp", "0.25", "--out", out)
    assert again.code == 1
    assert "Traceback" not in again.err
    assert any(f"measurements 2 -> {MEASUREMENTS_VERSION}" in line for line in again.error_lines()), again.err
    assert (out / "t" / TABLE).read_bytes() == before


def test_segment_refuses_images_made_before_the_table_in_one_line(run_cli, tmp_path: Path, tissue_crop) -> None:
    image = tmp_path / "in" / "t.png"
    image.parent.mkdir()
    cv2.imwrite(str(image), cv2.cvtColor(tissue_crop, cv2.COLOR_RGB2BGR))
    out = tmp_path / "seg"
    assert run_cli("segment", image, "--input-mpp", "0.25", "--out", out).code == 0
    assert read_table(out / "t_nuclei.parquet").num_rows > 30
    # What a folder of an earlier version holds: the same results without a table, settings without its version.
    from pysynth.ledger import LEDGER

    (out / "t_nuclei.parquet").unlink()
    lines = (out / LEDGER).read_text().splitlines()
    old = [line.replace(f'"table":{TABLE_VERSION},', "").replace(',"t_nuclei.parquet"', "") for line in lines]
    (out / LEDGER).write_text("\n".join(old) + "\n")
    before = (out / "t.geojson").read_bytes()
    again = run_cli("segment", image, "--input-mpp", "0.25", "--out", out)
    assert again.code == 1
    assert "Traceback" not in again.err
    assert any("table" in line and "--overwrite" in line for line in again.error_lines()), again.err
    assert (out / "t.geojson").read_bytes() == before
    redo = run_cli("segment", image, "--input-mpp", "0.25", "--out", out, "--overwrite")
    assert redo.code == 0
    assert read_table(out / "t_nuclei.parquet").num_rows > 30


def test_a_disk_full_while_writing_the_table_leaves_nothing_half_written_and_the_rerun_finishes(
    tmp_path: Path, tissue_rgb, monkeypatch
) -> None:
    import contextlib

    import pysynth.infer.write as write_module
    from pysynth.infer import GEOJSON, PARTS, SUMMARY, InferConfig, infer_slide, inference_model
    from pysynth.io import ArrayReader
    from pysynth.models.io import default_model_dir

    model, info = inference_model(str(default_model_dir()))
    reader = ArrayReader(tissue_rgb[:300, :300], 0.499, name="t.png")
    config = InferConfig(core=256)  # 3 x 3 regions: the table fails after its first row group
    real = write_module.table_writer

    @contextlib.contextmanager
    def full_disk(path, metadata):
        with real(path, metadata) as table:
            calls = []

            class Failing:
                def write(self, columns):
                    calls.append(1)
                    if len(calls) == 2:
                        raise OSError(28, "No space left on device")
                    table.write(columns)

            yield Failing()

    monkeypatch.setattr(write_module, "table_writer", full_disk)
    with pytest.raises(OSError, match="No space left"):
        infer_slide(reader, model, info, tmp_path / "t", config=config, model_id="x")
    left = sorted(p.name for p in (tmp_path / "t").iterdir())
    assert TABLE not in left
    assert GEOJSON not in left  # written beside the table: neither is half there
    assert not [name for name in left if name.endswith(".part")]  # nor a temporary file
    assert SUMMARY not in left  # not finished: the rerun redoes what is missing
    kept = len(list((tmp_path / "t" / PARTS).glob("0*.json")))
    assert kept == 9  # every region kept
    monkeypatch.setattr(write_module, "table_writer", real)
    result = infer_slide(reader, model, info, tmp_path / "t", config=config, model_id="x")
    assert result.resumed_regions == kept
    assert read_table(tmp_path / "t" / TABLE).num_rows == result.nuclei
    fresh = infer_slide(reader, model, info, tmp_path / "fresh", config=config, model_id="x")
    assert (tmp_path / "t" / GEOJSON).read_bytes() == (tmp_path / "fresh" / GEOJSON).read_bytes()
    assert fresh.nuclei == result.nuclei

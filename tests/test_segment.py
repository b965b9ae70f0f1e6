"""Segmenting images: tiled prediction, resampling, outputs, the command line and its bad-input cases."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from pysynth.instances import InstanceConfig
from pysynth.ledger import read_ledger
from pysynth.models.io import ModelError, ModelInfo, default_model_dir, load_model, read_model_info, save_model
from pysynth.models.unet import UNet, UNetConfig
from pysynth.segment import core_splits, geojson, model_extent, predict_maps, segment_image, to_image_grid


class PixelModel(nn.Module):
    """A per-pixel function with the U-Net's interface: tiling must not change its output at all."""

    def __init__(self) -> None:
        super().__init__()
        self.config = UNetConfig(width=4, depth=3, max_width=16)
        self.mix = nn.Conv2d(3, 2, 1)
        torch.manual_seed(0)
        nn.init.normal_(self.mix.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[-1] % 8 == 0
        assert x.shape[-2] % 8 == 0
        return self.mix(x)


def test_tiles_blend_without_seams(tissue_rgb: np.ndarray) -> None:
    model = PixelModel().eval()
    rgb = tissue_rgb[:333, :517]
    det_whole, seg_whole = predict_maps(model, rgb, tile=1024)
    det, seg = predict_maps(model, rgb, tile=128, overlap=32, batch=3)
    assert det.shape == seg.shape == rgb.shape[:2]
    np.testing.assert_allclose(det, det_whole, atol=1e-5)
    np.testing.assert_allclose(seg, seg_whole, atol=1e-5)


def test_whole_image_prediction_is_the_network_output(tissue_rgb: np.ndarray) -> None:
    torch.manual_seed(0)
    model = UNet(UNetConfig(width=4, depth=2, max_width=8)).eval()
    rgb = np.ascontiguousarray(tissue_rgb[:64, :96])
    det, seg = predict_maps(model, rgb, tile=256)
    x = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 127.5 - 1
    expected = torch.sigmoid(model(x))[0].detach().numpy()
    np.testing.assert_allclose(det, expected[0], atol=1e-5)
    np.testing.assert_allclose(seg, expected[1], atol=1e-5)


@pytest.fixture(scope="module")
def tissue_40x(sample_slide: Path) -> np.ndarray:
    """A 560×720 px region of the bundled real slide at 0.25 µm/px (upsampled from 20x), dense with nuclei."""
    from pysynth.io import open_slide, read_region

    with open_slide(sample_slide) as slide:
        return read_region(slide, 900, 1200, (560, 720), 0.25)


def test_cores_with_context_have_no_seams(tissue_40x: np.ndarray) -> None:
    # segment's layout (cores kept whole, context cut at the image's edges) with the shipped depth-4 U-Net on real
    # tissue. Its reach is 128 px and every core starts on its 16 px pooling grid, so with 128 px of context each
    # core is computed from the same pixels on the same grid as in one pass: the maps agree to float rounding. A
    # per-pixel model could not tell; this one sees seams wherever the context is short of its reach.
    model, info = load_model()
    assert info.mpp == 0.25
    rgb = np.ascontiguousarray(tissue_40x[:553, :711])  # not multiples of 16: the last cores are padded like the whole
    rows, cols = core_splits(553, 256, 16), core_splits(711, 256, 16)
    assert len(rows) == len(cols) == 3  # 3 × 3 cores: 4 seams inside the image
    assert all(start % 16 == 0 for start, _ in rows + cols)
    whole = predict_maps(model, rgb, tile=max(rgb.shape[:2]), context=128, classes=True)
    cored = predict_maps(model, rgb, tile=256, context=128, classes=True)
    for name, a, b in zip(("detection", "segmentation", "lymphocyte"), cored, whole, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, err_msg=name)
    # The test has teeth: 16 px of context (on the pooling grid, so only the reach is short) changes the maps by
    # far more than rounding near the seams (measured: up to 0.8 detection, 0.99 segmentation).
    det, seg = predict_maps(model, rgb, tile=256, context=16)
    assert np.abs(det - whole[0]).max() > 0.3
    assert np.abs(seg - whole[1]).max() > 0.3


def test_tta_of_a_per_pixel_function_is_the_function(tissue_rgb: np.ndarray) -> None:
    # Every flip/rotation commutes with a per-pixel function: mapped back, the views agree with one pass.
    model = PixelModel().eval()
    rgb = np.ascontiguousarray(tissue_rgb[:72, :104])
    det1, seg1 = predict_maps(model, rgb, tile=256)
    for n in (2, 4, 8):
        det, seg = predict_maps(model, rgb, tile=256, tta=n)
        np.testing.assert_allclose(det, det1, atol=1e-5)
        np.testing.assert_allclose(seg, seg1, atol=1e-5)
    with pytest.raises(ValueError, match="tta"):
        predict_maps(model, rgb, tta=3)


@pytest.mark.parametrize("context", [None, 32])
def test_tta8_of_an_image_is_the_transpose_of_tta8_of_its_transpose(tissue_rgb: np.ndarray, context) -> None:
    # The 8 views of an image and of its transpose are the same 8 images: the averaged maps must be transposes
    # of each other (up to float rounding) for any network, here a real U-Net that is not symmetric at all.
    torch.manual_seed(0)
    model = UNet(UNetConfig(width=4, depth=2, max_width=8)).eval()
    rgb = np.ascontiguousarray(tissue_rgb[100:180, 200:300])  # 80 × 100, not square
    kw = {"tile": 64, "context": context} if context is not None else {"tile": 256}
    det, seg = predict_maps(model, rgb, tta=8, **kw)
    det_t, seg_t = predict_maps(model, np.ascontiguousarray(rgb.transpose(1, 0, 2)), tta=8, **kw)
    np.testing.assert_allclose(det_t, det.T, atol=1e-5)
    np.testing.assert_allclose(seg_t, seg.T, atol=1e-5)
    single, _ = predict_maps(model, rgb, **kw)
    single_t, _ = predict_maps(model, np.ascontiguousarray(rgb.transpose(1, 0, 2)), **kw)
    assert np.abs(single_t - single.T).max() > 1e-3  # without TTA the network is not symmetric


def test_segment_image_confidences_are_those_of_the_models_maps(tmp_path: Path, tissue_rgb: np.ndarray) -> None:
    from pysynth.instances import find_instances, instance_confidence

    _tiny_model(tmp_path / "m")
    model, info = load_model(tmp_path / "m")
    rgb = np.ascontiguousarray(tissue_rgb[:96, :128])
    det, seg = predict_maps(model, rgb, tile=2048, context=128)
    # An untrained network's maps hover near 0.5: thresholds from their own spread give a few dozen instances (a
    # foreground of 20%: at half the image one mesh encloses the rest, and they join it).
    cfg = InstanceConfig(
        detection_threshold=float(np.percentile(det, 80)),
        foreground_threshold=float(np.percentile(seg, 80)),
        min_size=4,
    )
    found = segment_image(model, info, rgb, 0.25, cfg)
    np.testing.assert_array_equal(found.labels, find_instances(det, seg, cfg).labels)
    mean_seg, peak = instance_confidence(found.labels, det, seg)
    np.testing.assert_allclose(found.confidence, mean_seg)
    np.testing.assert_allclose(found.detection_peak, peak)
    assert found.count > 3
    # At another resolution the confidences are those of the model's grid, carried per label.
    half = segment_image(model, info, rgb[::2, ::2].copy(), 0.5, cfg)
    assert half.labels.shape == (48, 64)
    assert len(half.confidence) == len(half.detection_peak) == half.count + 1
    assert np.all((half.confidence[1:] > 0) & (half.confidence[1:] <= 1))


def test_geojson_polygons_have_the_instances_areas() -> None:
    labels = np.zeros((40, 50), np.int32)
    labels[3:12, 4:20] = 1
    labels[20:35, 30:41] = 2
    labels[22:26, 32:35] = 0  # a hole: the outer ring's area includes it
    features = geojson(labels, name="x")["features"]
    assert [f["properties"]["label"] for f in features] == [1, 2]
    for f in features:
        ring = np.array(f["geometry"]["coordinates"][0], float)
        assert (ring[0] == ring[-1]).all()
        area = 0.5 * abs(np.dot(ring[:-1, 0], ring[1:, 1]) - np.dot(ring[1:, 0], ring[:-1, 1]))
        k = f["properties"]["label"]
        filled = cv2.fillPoly(np.zeros_like(labels, np.uint8), [ring[:-1].astype(np.int32)], 1)
        assert area == (labels == k).sum() + (12 if k == 2 else 0)
        assert filled.sum() >= (labels == k).sum()


def _tiny_model(folder: Path, mpp: float = 0.25) -> None:
    torch.manual_seed(0)
    save_model(folder, UNet(UNetConfig(width=4, depth=2, max_width=8)), mpp, InstanceConfig(), {"steps": 0})


def test_labels_come_back_on_the_inputs_grid() -> None:
    # Each image pixel takes the label of the model pixel whose square holds its centre, found here by walking the
    # model grid's pixel edges in µm. Resolutions coarser and finer than the model's, none with a centre on an edge.
    rng = np.random.default_rng(0)
    for mpp, hw in ((0.499, (7, 9)), (0.37, (11, 6)), (0.21, (13, 17))):
        shape = model_extent(hw, mpp, 0.25)
        labels = rng.integers(0, 1000, shape).astype(np.int32)  # a different label almost everywhere
        expected = np.zeros(hw, np.int32)
        for i in range(hw[0]):
            for j in range(hw[1]):
                y, x = (i + 0.5) * mpp, (j + 0.5) * mpp  # the pixel's centre, µm
                r = next(r for r in range(shape[0]) if r * 0.25 <= y < (r + 1) * 0.25)
                c = next(c for c in range(shape[1]) if c * 0.25 <= x < (c + 1) * 0.25)
                expected[i, j] = labels[r, c]
        got = to_image_grid(labels, hw, mpp, 0.25)
        assert got.shape == hw
        np.testing.assert_array_equal(got, expected, err_msg=f"{mpp} µm/px")
    same = rng.integers(0, 9, (5, 6)).astype(np.int32)
    assert to_image_grid(same, (5, 6), 0.25, 0.25) is same


def _centroids_um(labels: np.ndarray, mpp: float) -> tuple[np.ndarray, np.ndarray]:
    """``(y, x)`` centroid (µm, from the image's top left corner) and area (µm²) of each instance present."""
    ys, xs = np.nonzero(labels)
    ids = labels[ys, xs]
    n = int(labels.max()) + 1
    count = np.bincount(ids, minlength=n)
    present = np.flatnonzero(count[1:]) + 1
    centre = np.stack([np.bincount(ids, ys + 0.5, n), np.bincount(ids, xs + 0.5, n)], axis=1)
    return (centre / np.maximum(count, 1)[:, None] * mpp)[present], count[present] * mpp * mpp


def test_a_20x_image_gives_the_nuclei_of_the_same_tissue_at_the_models_resolution(
    sample_slide: Path, tissue_rgb: np.ndarray
) -> None:
    # The shipped 0.25 µm/px model on a 20x image (0.499 µm/px) against the same tissue read from the slide at
    # 0.25 µm/px: segment_image must resample the image as infer reads slides and put the labels back on the
    # image's pixels by their centres, so the same nuclei come out at the same places and on the same pixels.
    from pysynth.io import open_slide, read_region
    from pysynth.metrics import best_iou

    model, info = load_model()
    rgb = np.ascontiguousarray(tissue_rgb[:300, :400])  # level-0 pixels x 700-1100, y 1500-1800
    shape = model_extent(rgb.shape[:2], 0.499, info.mpp)
    with open_slide(sample_slide) as slide:
        assert slide.mpp == 0.499
        fine = read_region(slide, 700, 1500, shape, info.mpp)
    coarse = segment_image(model, info, rgb, 0.499)
    reference = segment_image(model, info, fine, info.mpp)
    assert coarse.labels.shape == (300, 400)
    assert coarse.labels.dtype == np.int32
    assert reference.count > 100
    assert abs(coarse.count - reference.count) <= 0.03 * reference.count
    # The same places: nearly every nucleus within 1 µm of one of the reference's, no shift on average. Mapping the
    # labels by pixel corners instead of centres moves them 0.25 µm down and right (measured: 0.25, 0.26 µm);
    # matched nuclei here are off by 0.02 µm and 0.00 µm.
    c_coarse, a_coarse = _centroids_um(coarse.labels, 0.499)
    c_ref, a_ref = _centroids_um(reference.labels, info.mpp)
    dist = np.linalg.norm(c_coarse[:, None] - c_ref[None], axis=2)
    nearest, gap = dist.argmin(axis=1), dist.min(axis=1)
    assert np.mean(gap < 1.0) >= 0.95
    matched = gap < 1.0
    assert np.all(np.abs((c_coarse - c_ref[nearest])[matched].mean(axis=0)) < 0.1)
    assert np.median(a_coarse[matched] / a_ref[nearest[matched]]) == pytest.approx(1.0, abs=0.03)
    # Pixel for pixel: the reference's labels taken at each 20x pixel's centre (the model grid's pixel edges in
    # µm) cover the same pixels. Only the maps near the image's edges differ (the 20x array has nothing beyond
    # them, the slide has tissue), so a few nuclei do not match exactly (measured: 97% at IoU >= 0.9, foreground
    # IoU 0.987; with corner mapping 1% and 0.75, with bilinear resampling 36% and 0.85).
    rows = np.searchsorted(np.arange(shape[0] + 1) * 0.25, (np.arange(300) + 0.5) * 0.499, side="right") - 1
    cols = np.searchsorted(np.arange(shape[1] + 1) * 0.25, (np.arange(400) + 0.5) * 0.499, side="right") - 1
    expected = reference.labels[rows[:, None], cols[None, :]]
    assert np.mean(best_iou(coarse.labels, expected) >= 0.9) >= 0.9
    a, b = coarse.labels > 0, expected > 0
    assert (a & b).sum() / (a | b).sum() >= 0.95


def test_model_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="no such model folder"):
        read_model_info(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="not a model folder"):
        read_model_info(tmp_path / "empty")
    _tiny_model(tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "model.json").read_text())
    meta["unet"]["width"] = 8  # the weights are for width 4
    (tmp_path / "m" / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="do not fit"):
        load_model(tmp_path / "m")
    meta["unet"]["depth"] = 99
    (tmp_path / "m" / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="incompatible"):
        load_model(tmp_path / "m")
    (tmp_path / "m" / "model.json").write_text("{")
    with pytest.raises(ModelError, match="unreadable"):
        load_model(tmp_path / "m")


def test_info_round_trip(tmp_path: Path) -> None:
    _tiny_model(tmp_path / "m", mpp=0.5)
    info = read_model_info(tmp_path / "m")
    assert isinstance(info, ModelInfo)
    assert info.mpp == 0.5
    assert info.extra == {"steps": 0}
    assert info.instances == InstanceConfig()


# --- the command line --------------------------------------------------------------------------------------------


@pytest.fixture
def images(tmp_path: Path, tissue_rgb: np.ndarray) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    cv2.imwrite(str(folder / "a.png"), cv2.cvtColor(tissue_rgb[:200, :300], cv2.COLOR_RGB2BGR))
    cv2.imwrite(str(folder / "b.png"), cv2.cvtColor(tissue_rgb[200:456, 300:556], cv2.COLOR_RGB2BGR))
    return folder


def test_segment_writes_the_three_outputs_and_resumes(run_cli, tmp_path: Path, images: Path) -> None:
    out = tmp_path / "out"
    result = run_cli("segment", str(images), "--input-mpp", "0.5", "--out", str(out))
    assert result.code == 0, result.err
    for stem, shape in (("a", (200, 300)), ("b", (256, 256))):
        labels = cv2.imread(str(out / f"{stem}_labels.png"), cv2.IMREAD_UNCHANGED)
        assert labels.dtype == np.uint16
        assert labels.shape == shape
        overlay = cv2.imread(str(out / f"{stem}_overlay.png"))
        assert overlay.shape == (*shape, 3)
        features = json.loads((out / f"{stem}.geojson").read_text())["features"]
        assert len(features) == len(np.unique(labels)) - 1
        for feat in features:
            m = feat["properties"]["measurements"]
            assert {"Confidence", "Detection peak", "Area µm^2", "Perimeter µm", "Circularity", "Solidity"} <= set(m)
            assert 0 < m["Confidence"] <= 1
            assert 0 < m["Detection peak"] <= 1
            assert feat["properties"]["area_px"] == np.sum(labels == feat["properties"]["label"])
    assert "segmented 2 image(s)" in result.out
    assert torch.is_grad_enabled()  # the command leaves the process' autograd state alone
    again = run_cli("segment", str(images), "--input-mpp", "0.5", "--out", str(out))
    assert again.code == 0
    assert "2 already done" in again.out


def test_segment_bad_input(run_cli, tmp_path: Path, images: Path) -> None:
    out = str(tmp_path / "out")
    no_mpp = run_cli("segment", str(images / "a.png"), "--out", out)
    assert no_mpp.code == 1
    assert "--input-mpp" in no_mpp.err
    (tmp_path / "broken.png").write_bytes(b"not a png")
    broken = run_cli("segment", str(tmp_path / "broken.png"), "--input-mpp", "0.25", "--out", out)
    assert broken.code == 1
    assert "broken.png" in broken.err
    assert "Traceback" not in broken.err
    cv2.imwrite(str(tmp_path / "tiny.png"), np.full((6, 6, 3), 128, np.uint8))
    tiny = run_cli("segment", str(tmp_path / "tiny.png"), "--input-mpp", "0.25", "--out", out)
    assert tiny.code == 1
    assert "minimum" in tiny.err
    (tmp_path / "nomodel").mkdir()
    nomodel = run_cli("segment", str(images), "--model", str(tmp_path / "nomodel"), "--input-mpp", "0.5", "--out", out)
    assert nomodel.code == 1
    assert "not a model folder" in nomodel.error_lines()[0]
    missing = run_cli("segment", str(tmp_path / "nothing.png"), "--out", out)
    assert missing.code == 2
    assert "no such file" in missing.err
    _tiny_model(tmp_path / "m")
    assert run_cli("segment", str(images), "--input-mpp", "0.5", "--out", out).code == 0
    other = run_cli("segment", str(images), "--model", str(tmp_path / "m"), "--input-mpp", "0.5", "--out", out)
    assert other.code == 1
    assert "other settings (" in other.err
    assert "model " in other.err.split("other settings (")[1]
    assert (
        run_cli(
            "segment", str(images), "--model", str(tmp_path / "m"), "--input-mpp", "0.5", "--out", out, "--overwrite"
        ).code
        == 0
    )


def test_segment_min_confidence_and_tta_are_settings_of_the_results(run_cli, tmp_path: Path, images: Path) -> None:
    image = str(images / "b.png")
    out = tmp_path / "out"

    def nuclei(folder: Path) -> list[dict]:
        return json.loads((folder / "b.geojson").read_text())["features"]

    assert run_cli("segment", image, "--input-mpp", "0.5", "--out", str(out)).code == 0
    settings = read_ledger(out)["entries"]["b"]["settings"]
    assert settings["tta"] == 1
    assert settings["min_confidence"] == read_model_info(default_model_dir()).instances.min_confidence
    for args in (["--tta", "2"], ["--min-confidence", "0.9"]):
        refused = run_cli("segment", image, "--input-mpp", "0.5", "--out", str(out), *args)
        assert refused.code == 1
        assert "other settings" in refused.err
    assert run_cli("segment", image, "--input-mpp", "0.5", "--out", str(out), "--tta", "2", "--overwrite").code == 0
    assert read_ledger(out)["entries"]["b"]["settings"]["tta"] == 2
    assert run_cli("segment", image, "--input-mpp", "0.5", "--out", str(out), "--tta", "3").code == 2
    # --min-confidence drops exactly the nuclei below it (the others keep their outlines), renumbered.
    for name, value in (("all", "0"), ("hi", "0.8")):
        args = ("--input-mpp", "0.5", "--out", str(tmp_path / name), "--min-confidence", value)
        assert run_cli("segment", image, *args).code == 0
    every, high = nuclei(tmp_path / "all"), nuclei(tmp_path / "hi")
    expected = [f for f in every if f["properties"]["measurements"]["Confidence"] >= 0.8]
    assert 0 < len(high) == len(expected) < len(every)
    assert [f["geometry"] for f in high] == [f["geometry"] for f in expected]
    assert [f["properties"]["label"] for f in high] == list(range(1, len(high) + 1))
    labels = cv2.imread(str(tmp_path / "hi" / "b_labels.png"), cv2.IMREAD_UNCHANGED)
    assert labels.max() == len(high)


def test_old_model_files_load_without_a_minimum_confidence(tmp_path: Path) -> None:
    _tiny_model(tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "model.json").read_text())
    assert meta["instances"]["min_confidence"] == 0.0
    del meta["instances"]["min_confidence"]  # a model written before the field existed
    (tmp_path / "m" / "model.json").write_text(json.dumps(meta))
    assert load_model(tmp_path / "m")[1].instances.min_confidence == 0.0
    meta["instances"]["min_confidence"] = 0.7
    (tmp_path / "m" / "model.json").write_text(json.dumps(meta))
    assert read_model_info(tmp_path / "m").instances.min_confidence == 0.7
    meta["instances"]["min_confidence"] = 7
    (tmp_path / "m" / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ModelError):
        read_model_info(tmp_path / "m")


def test_more_than_65535_nuclei_go_to_a_32_bit_tiff(tmp_path: Path) -> None:
    from pysynth.segment import write_outputs

    labels = np.arange(1, 300 * 300 + 1, dtype=np.int32).reshape(300, 300)  # every pixel its own nucleus
    rgb = np.full((300, 300, 3), 200, np.uint8)
    paths = write_outputs(tmp_path, "many", rgb, labels)
    assert paths.labels.name == "many_labels.tif"
    back = cv2.imread(str(paths.labels), cv2.IMREAD_UNCHANGED)
    assert back.dtype == np.int32
    np.testing.assert_array_equal(back, labels)
    small = write_outputs(tmp_path, "few", rgb, (labels % 7).astype(np.int32))
    assert small.labels.name == "few_labels.png"
    assert cv2.imread(str(small.labels), cv2.IMREAD_UNCHANGED).dtype == np.uint16

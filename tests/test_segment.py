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
from pysynth.models.io import ModelError, ModelInfo, load_model, read_model_info, save_model
from pysynth.models.unet import UNet, UNetConfig
from pysynth.segment import geojson, predict_maps, segment_rgb


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


def test_labels_come_back_on_the_inputs_grid(tmp_path: Path, tissue_rgb: np.ndarray) -> None:
    _tiny_model(tmp_path / "m")
    model, info = load_model(tmp_path / "m")
    # A 20x image for a 40x model: resampled up, and the labels mapped back to the input's pixels.
    cfg = InstanceConfig(detection_threshold=0.0, foreground_threshold=0.0, min_size=0)
    labels = segment_rgb(model, info, tissue_rgb[:100, :150], 0.5, cfg)
    assert labels.shape == (100, 150)
    assert labels.dtype == np.int32
    assert labels.max() >= 1


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
    other = run_cli("segment", str(images), "--model", str(tmp_path / "m"), "--input-mpp", "0.5", "--out", out)
    assert other.code == 1
    assert "another model" in other.err
    assert (
        run_cli(
            "segment", str(images), "--model", str(tmp_path / "m"), "--input-mpp", "0.5", "--out", out, "--overwrite"
        ).code
        == 0
    )


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

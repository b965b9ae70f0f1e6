"""The class output: its loss, a segmenter gaining it, training it, and what segment writes with it."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import shapely
import torch
import yaml
from scipy.spatial import cKDTree

from pysynth.instances import Instances
from pysynth.models.unet import UNet, UNetConfig
from pysynth.train.targets import two_head_loss


def _targets(n: int = 2, s: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    det = (torch.rand(n, s, s, generator=g) > 0.8).float()
    seg = (torch.rand(n, s, s, generator=g) > 0.5).float()
    lym = (torch.rand(n, s, s, generator=g) > 0.5).float() * seg
    return det, seg, lym, torch.ones(n, s, s)


def test_class_term_is_the_mean_bce_over_known_nuclear_pixels() -> None:
    det, seg, lym, weights = _targets()
    logits = torch.randn(2, 3, 16, 16, requires_grad=True)
    base = two_head_loss(logits[:, :2], det, seg, weights)[0].detach()
    # No known class: the loss is the two-head loss, and channel 2 gets no gradient.
    none, parts = two_head_loss(logits, det, seg, weights, lymphocyte=lym, class_weights=torch.zeros_like(lym))
    assert float(none.detach()) == pytest.approx(float(base), abs=1e-6)
    assert parts["bce_lymphocyte"] == 0.0
    none.backward()
    assert float(logits.grad[:, 2].abs().sum()) == 0.0
    known = seg.clone()
    loss, parts = two_head_loss(logits, det, seg, weights, lymphocyte=lym, class_weights=known, class_weight=2.0)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits[:, 2], lym, reduction="none")
    expected = float((bce * known).sum().detach() / known.sum())
    assert parts["bce_lymphocyte"] == pytest.approx(expected, rel=1e-5)
    assert float(loss.detach()) == pytest.approx(float(base) + 2.0 * expected, rel=1e-5)
    with pytest.raises(ValueError, match="three-channel"):
        two_head_loss(logits[:, :2], det, seg, weights, lymphocyte=lym, class_weights=known)


def test_a_segmenter_gains_the_class_output_keeping_its_maps(tmp_path: Path) -> None:
    from pysynth.instances import InstanceConfig
    from pysynth.models.io import save_model
    from pysynth.train.config import TrainConfig
    from pysynth.train.loop import init_segmenter

    torch.manual_seed(0)
    small = UNetConfig(width=4, depth=2, max_width=8)
    old = UNet(small).eval()
    save_model(tmp_path / "old", old, 0.25, InstanceConfig())
    config = TrainConfig(model=UNetConfig(width=4, depth=2, max_width=8, classes=1), init=str(tmp_path / "old"))
    new = UNet(config.model)
    init_segmenter(new, config)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        a, b = old(x), new.eval()(x)
    assert b.shape[1] == 3
    torch.testing.assert_close(b[:, :2], a)
    # Another shape is still refused.
    wider = TrainConfig(model=UNetConfig(width=8, depth=2, max_width=8, classes=1), init=str(tmp_path / "old"))
    with pytest.raises(Exception, match="not the one configured"):
        init_segmenter(UNet(wider.model), wider)


def test_geojson_and_overlay_carry_the_class(tmp_path: Path) -> None:
    from pysynth.segment import CLASS_COLOURS, LYMPHOCYTE, LYMPHOCYTE_PROBABILITY, write_outputs

    labels = np.zeros((40, 40), np.int32)
    labels[2:12, 2:12] = 1
    labels[20:30, 20:30] = 2
    rgb = np.full((40, 40, 3), 200, np.uint8)
    found = Instances(labels, np.array([0, 0.9, 0.8]), np.array([0, 0.9, 0.9]), np.array([0.0, 0.2, 0.7]))
    paths = write_outputs(tmp_path, "x", rgb, found, mpp=0.25, lymphocyte_threshold=0.5)
    features = json.loads(paths.geojson.read_text())["features"]
    names = {f["properties"]["label"]: f["properties"]["classification"]["name"] for f in features}
    assert names == {1: "Nucleus", 2: "Lymphocyte"}
    assert [f["properties"]["measurements"][LYMPHOCYTE_PROBABILITY] for f in features] == [0.2, 0.7]
    picture = cv2.cvtColor(cv2.imread(str(paths.overlay)), cv2.COLOR_BGR2RGB)
    assert tuple(picture[20, 25]) == CLASS_COLOURS[LYMPHOCYTE]  # the lymphocyte's outline
    assert tuple(picture[2, 5]) == (0, 255, 0)  # the other nucleus'
    # Without a class output, no class measurement and every nucleus is a Nucleus.
    plain = write_outputs(tmp_path, "y", rgb, Instances(labels, found.confidence, found.detection_peak), mpp=0.25)
    features = json.loads(plain.geojson.read_text())["features"]
    assert {f["properties"]["classification"]["name"] for f in features} == {"Nucleus"}
    assert all(LYMPHOCYTE_PROBABILITY not in f["properties"]["measurements"] for f in features)


def test_train_a_class_output_then_segment_with_it(
    run_cli, tmp_path: Path, tissue_rgb: np.ndarray, tiny_train: dict
) -> None:
    real = tmp_path / "real.png"
    cv2.imwrite(str(real), cv2.cvtColor(tissue_rgb, cv2.COLOR_RGB2BGR))
    config = {**tiny_train, "model": {**tiny_train["model"], "classes": 1}}
    config["synth"] = {**tiny_train["synth"], "lymphocyte_fraction": 0.4}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    model = tmp_path / "m"
    args = ["train", "--real", str(real), "--input-mpp", "0.5", "--out", str(model), "--steps", "4"]
    result = run_cli(*args, "--config", str(tmp_path / "c.yaml"))
    assert result.code == 0, result.err
    meta = json.loads((model / "model.json").read_text())
    assert meta["unet"]["classes"] == 1
    assert meta["classes"]["lymphocyte_threshold"] == 0.5
    assert "bce_lymphocyte" in (model / "losses.csv").read_text().splitlines()[0]

    from pysynth.models.io import load_model
    from pysynth.segment import segment_image

    net, info = load_model(model)
    assert info.has_classes
    found = segment_image(net, info, tissue_rgb[:128, :128], 0.5)
    assert found.lymphocyte is not None
    assert len(found.lymphocyte) == found.count + 1
    assert ((found.lymphocyte >= 0) & (found.lymphocyte <= 1)).all()
    seg = run_cli("segment", str(real), "--model", str(model), "--input-mpp", "0.5", "--out", str(tmp_path / "s"))
    assert seg.code == 0, seg.err
    assert "lymphocytes)" in seg.out


def test_class_output_bad_configurations_are_one_line(run_cli, tmp_path: Path, sample_slide: Path, tiny_train: dict):
    config = {**tiny_train, "model": {**tiny_train["model"], "classes": 1}}
    config["synth"] = {**tiny_train["synth"], "lymphocyte_fraction": 0.0}  # no synthetic lymphocytes
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    result = run_cli(
        "train", "--real", str(sample_slide), "--out", str(tmp_path / "a"), "--config", tmp_path / "c.yaml"
    )
    assert result.code != 0
    assert "Traceback" not in result.err
    assert result.error_lines()
    assert "lymphocyte_fraction is 0" in result.error_lines()[0]
    config["synth"] = {**tiny_train["synth"], "lymphocyte_fraction": 0.3}
    (tmp_path / "g.yaml").write_text(yaml.safe_dump(config))
    gan = run_cli(
        "train", "--real", str(sample_slide), "--out", str(tmp_path / "b"), "--config", tmp_path / "g.yaml", "--gan"
    )
    assert gan.code != 0
    assert "Traceback" not in gan.err
    assert "class output" in gan.error_lines()[0]


def test_density_grid_counts_per_mm2_of_tissue() -> None:
    from pysynth.infer import density_grid
    from pysynth.io.tissue import TissueMask

    # A 2 x 1 mm slide at 1 µm/px, mask at 10 px per mask pixel: the left 1 mm is tissue, the right half of the
    # right 1 mm too (half a cell of tissue), the rest background.
    mask = np.zeros((100, 200), bool)
    mask[:, :100] = True
    mask[:, 150:] = True
    tissue = TissueMask(mask, 10.0, 10.0)
    xy = np.array([[50.0, 50.0]] * 4 + [[1500.0, 20.0]] * 2 + [[1200.0, 900.0]])  # level-0 px
    grid = density_grid(xy, tissue, cell_um=1000.0)
    assert grid.shape == (1, 2)
    assert grid[0, 0] == pytest.approx(4 / 1.0)  # 4 per mm² of tissue
    assert grid[0, 1] == pytest.approx(3 / 0.5)  # 3 in half a mm² of tissue
    small = density_grid(xy, tissue, cell_um=500.0)
    assert small.shape == (2, 4)
    assert np.isnan(small[0, 2])
    assert np.isnan(small[1, 2])
    assert small[0, 0] == pytest.approx(4 / 0.25)
    # The nucleus at (1200, 900) lies in a cell without tissue: no density there, the other 6 are all counted.
    assert np.nansum(small * np.where(small > 0, 0.25, 0)) == pytest.approx(6)


@pytest.mark.parametrize("option", [("--lymphocyte-threshold", "0.4"), ("--lymphocyte-call", "probability+rule")])
@pytest.mark.parametrize("command", ["segment", "infer"])
def test_lymphocyte_threshold_needs_a_class_output(
    run_cli, tmp_path: Path, tissue_rgb: np.ndarray, command: str, option: tuple[str, str]
):
    image = tmp_path / "tile.png"
    cv2.imwrite(str(image), cv2.cvtColor(tissue_rgb[:256, :256], cv2.COLOR_RGB2BGR))
    args = [command, image, "--model", "plain", "--input-mpp", "0.5", "--out", tmp_path / "o"]
    result = run_cli(*args, *option)
    assert result.code == 2
    assert "Traceback" not in result.err
    assert "has no class output" in result.err
    assert not (tmp_path / "o").exists()  # refused before anything is written


def test_infer_writes_classes_counts_and_density(run_cli, tmp_path: Path, tissue_rgb: np.ndarray) -> None:
    from pysynth.models.io import read_model_info, resolve_model_dir

    assert read_model_info(resolve_model_dir("default")).has_classes  # the shipped model has the class output
    image = tmp_path / "tile.png"
    cv2.imwrite(str(image), cv2.cvtColor(tissue_rgb[:512, :512], cv2.COLOR_RGB2BGR))
    result = run_cli("infer", image, "--input-mpp", "0.5", "--out", tmp_path / "o")
    assert result.code == 0, result.err
    assert "lymph." in result.out
    slide = tmp_path / "o" / "tile"
    summary = json.loads((slide / "summary.json").read_text())
    assert "lymphocyte_call" not in summary["settings"]["config"]  # the default call keeps earlier folders' identity
    features = json.loads((slide / "nuclei.geojson").read_text())["features"]
    called = [f for f in features if f["properties"]["classification"]["name"] == "Lymphocyte"]
    assert summary["lymphocytes"] == len(called)
    assert all(
        f["properties"]["measurements"]["Lymphocyte probability"] >= summary["lymphocyte_threshold"] for f in called
    )
    assert summary["lymphocytes_per_mm2"] == pytest.approx(len(called) / summary["tissue_mm2"], rel=1e-3)
    grid = np.load(slide / "lymphocyte_density.npy")
    side_um = 512 * 0.5
    assert grid.shape == (int(np.ceil(side_um / 100)),) * 2
    finite = np.isfinite(grid)
    assert finite.any()
    # Each cell's density is its lymphocytes per mm² of its tissue: at least per mm² of the whole cell, 0 without.
    counts = np.zeros(grid.shape)
    for f in called:
        m = f["properties"]["measurements"]
        counts[int(m["Centroid Y px"] // 200), int(m["Centroid X px"] // 200)] += 1
    cell_mm2 = (100 / 1000) ** 2
    assert (grid[finite] >= counts[finite] / cell_mm2 - 1e-3).all()
    assert (grid[finite & (counts == 0)] == 0).all()
    assert (slide / "lymphocyte_density.png").stat().st_size > 0


def test_infer_calls_lymphocytes_by_probability_and_rule_over_the_slide(
    run_cli, tmp_path: Path, tissue_rgb: np.ndarray
) -> None:
    from pysynth.lymphocyte import call_scores, rule_scores

    image = tmp_path / "tile.png"
    cv2.imwrite(str(image), cv2.cvtColor(tissue_rgb[:512, :512], cv2.COLOR_RGB2BGR))
    out = tmp_path / "o"
    args = ["infer", image, "--input-mpp", "0.5", "--out", out, "--core", "256"]  # several regions, one call
    result = run_cli(*args, "--lymphocyte-call", "probability+rule")
    assert result.code == 0, result.err
    slide = out / "tile"
    summary = json.loads((slide / "summary.json").read_text())
    assert summary["regions"] > 1
    assert summary["settings"]["config"]["lymphocyte_call"] == "probability+rule"
    features = json.loads((slide / "nuclei.geojson").read_text())["features"]
    m = [f["properties"]["measurements"] for f in features]
    col = {k: np.array([x[k] for x in m], np.float64) for k in m[0]}
    score = call_scores(
        col["Lymphocyte probability"],
        rule_scores(col["Area µm^2"], col["Hematoxylin OD mean"], col["Circularity"]),
        summary["lymphocyte_threshold"],
    )
    kinds = np.array([f["properties"]["classification"]["name"] for f in features])
    sure = np.abs(score) > 1e-3  # the GeoJSON rounds measurements to 4 digits
    assert (kinds[sure] == np.where(score[sure] > 0, "Lymphocyte", "Nucleus")).all()
    assert summary["lymphocytes"] == int((kinds == "Lymphocyte").sum())
    page = (slide / "report.html").read_text()
    assert f"{summary['lymphocytes']:,} (" in page
    assert "and rule" in page
    # The call differs from the probability's here: the option is what classified them.
    by_probability = col["Lymphocyte probability"] >= summary["lymphocyte_threshold"]
    assert (by_probability != (kinds == "Lymphocyte")).any()
    # A rerun with the default call has other settings: refused without --overwrite.
    rerun = run_cli(*args)
    assert rerun.code != 0
    assert "Traceback" not in rerun.err


def test_segment_and_infer_make_the_same_rule_call_on_one_image(run_cli, tmp_path: Path, tissue_crop: np.ndarray):
    # One image is one slide to infer: the rule's z-scores are over the same nuclei, so the calls are the same. At
    # 40x, where both measure on the same grid (at 20x segment measures on the image's pixels and infer on the
    # model's 0.25 µm/px, so areas and densities differ by a few percent and a few relative calls with them).
    image = tmp_path / "tile.png"
    cv2.imwrite(str(image), cv2.cvtColor(tissue_crop, cv2.COLOR_RGB2BGR))
    calls = {}
    for command in ("segment", "infer"):
        out = tmp_path / command
        result = run_cli(command, image, "--input-mpp", "0.25", "--out", out, "--lymphocyte-call", "probability+rule")
        assert result.code == 0, result.err
        path = out / "tile.geojson" if command == "segment" else out / "tile" / "nuclei.geojson"
        features = json.loads(path.read_text())["features"]
        centres = [shapely.geometry.shape(f["geometry"]).centroid for f in features]
        kinds = [f["properties"]["classification"]["name"] for f in features]
        calls[command] = (np.array([(c.x, c.y) for c in centres]), np.array(kinds))
    (seg_xy, seg_kind), (inf_xy, inf_kind) = calls["segment"], calls["infer"]
    probability = np.array([f["properties"]["measurements"]["Lymphocyte probability"] for f in features])  # infer's
    threshold = json.loads((tmp_path / "infer" / "tile" / "summary.json").read_text())["lymphocyte_threshold"]
    assert len(seg_xy) > 50
    assert abs(len(seg_xy) - len(inf_xy)) <= 0.005 * len(seg_xy)
    # Each of segment's nuclei has infer's at the same place (within a pixel: the outlines are the same up to
    # vertex rounding), and the two call it alike.
    distance, nearest = cKDTree(inf_xy).query(seg_xy)
    matched = distance < 1.0
    assert matched.mean() >= 0.99
    assert (seg_kind[matched] == "Lymphocyte").sum() >= 3
    assert (seg_kind[matched] == inf_kind[nearest[matched]]).all()
    assert ((probability >= threshold) != (inf_kind == "Lymphocyte")).any()  # the rule made these calls

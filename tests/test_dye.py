"""Tissue-marking dye: objects of a colour no H&E mix gives are dropped by segment and infer (``--keep-dye`` keeps)."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from pysynth.dye import RED_GREEN_LIMIT, dye_labels, red_green_od
from pysynth.ledger import read_ledger
from pysynth.synth.deconv import hed_to_rgb


def _od(value: np.ndarray) -> np.ndarray:
    return -np.log((value.astype(np.float64) + 1.0) / 256.0)


def test_red_green_od_is_the_ratio_of_the_mean_densities_and_only_dye_is_above_the_limit() -> None:
    rgb = np.full((40, 80, 3), 245, np.uint8)
    labels = np.zeros((40, 80), np.int32)
    hematoxylin = hed_to_rgb(np.array([[[0.3, 0.0, 0.0]]]))[0, 0]  # a dark nucleus of pure hematoxylin
    mix = hed_to_rgb(np.array([[[0.1, 0.05, 0.0]]]))[0, 0]  # a paler one with eosin
    teal = np.array([40, 120, 125], np.uint8)  # blue-green marking ink
    for k, colour in ((1, hematoxylin), (2, mix), (4, teal)):  # label 3 is absent
        labels[5:15, 10 * k : 10 * k + 8] = k
        rgb[5:15, 10 * k : 10 * k + 8] = colour
    rgb[5:10, 40:48] = (60, 140, 140)  # label 4 is not uniform: the ratio is of the means over its pixels
    ratio = red_green_od(labels, rgb)
    assert ratio.shape == (5,)
    assert ratio[0] == 0
    assert ratio[3] == 0
    for k in (1, 2, 4):
        px = rgb[labels == k]
        assert ratio[k] == pytest.approx(_od(px[:, 0]).mean() / _od(px[:, 1]).mean(), rel=1e-12)
    assert ratio[1] < 1.0
    assert ratio[2] < ratio[1]
    assert ratio[4] > 1.5 * RED_GREEN_LIMIT
    assert dye_labels(labels, rgb).tolist() == [False, False, False, False, True]
    assert red_green_od(labels, rgb, n=6).shape == (7,)
    # Red absorbed and green not at all is dye too; an object of white pixels absorbs nothing and is not.
    rgb[labels == 4] = (30, 255, 255)
    rgb[labels == 2] = 255
    assert red_green_od(labels, rgb)[4] == np.inf
    assert dye_labels(labels, rgb).tolist() == [False, False, False, False, True]


@pytest.fixture(scope="module")
def inked() -> np.ndarray:
    """512² px at 0.25 µm/px of the bundled slide's edge, where blue-green margin ink lies on the tissue."""
    from pysynth import data_path
    from pysynth.io import open_slide, read_region

    with open_slide(data_path("CMU-1-Small-Region.svs")) as slide:
        return read_region(slide, 1700, 2050, (512, 512), 0.25)


def test_segment_image_drops_exactly_the_dye_objects(model_info, inked) -> None:
    from pysynth.instances import keep_instances
    from pysynth.segment import segment_image

    model, info = model_info
    every = segment_image(model, info, inked, 0.25, drop_dye=False)
    found = segment_image(model, info, inked, 0.25)
    dye = dye_labels(every.labels, inked)
    assert dye.sum() >= 20  # the ink is found as objects
    assert (~dye[1:]).sum() >= 20  # and the tissue's nuclei beside it
    np.testing.assert_array_equal(found.labels, keep_instances(every.labels, ~dye))
    np.testing.assert_array_equal(found.confidence, every.confidence[~dye])
    assert found.lymphocyte is not None
    np.testing.assert_array_equal(found.lymphocyte, every.lymphocyte[~dye])
    assert (red_green_od(found.labels, inked)[1:] < RED_GREEN_LIMIT).all()


def test_segment_and_infer_drop_the_dye_and_keep_it_with_keep_dye(tmp_path, run_cli, inked) -> None:
    png = tmp_path / "inked.png"
    cv2.imwrite(str(png), cv2.cvtColor(inked, cv2.COLOR_RGB2BGR))
    counts = {}
    for flags in ((), ("--keep-dye",)):
        name = "keep" if flags else "drop"
        result = run_cli("segment", str(png), "--input-mpp", "0.25", "--out", str(tmp_path / f"s-{name}"), *flags)
        assert result.code == 0, result.err
        segment_features = json.loads((tmp_path / f"s-{name}" / "inked.geojson").read_text())["features"]
        (entry,) = read_ledger(tmp_path / f"s-{name}")["entries"].values()
        settings = entry["settings"]
        assert settings.get("keep_dye", False) == bool(flags)
        assert ("dye_red_green_limit" in settings) != bool(flags)  # what decides the result, recorded
        result = run_cli("infer", str(png), "--input-mpp", "0.25", "--out", str(tmp_path / f"i-{name}"), *flags)
        assert result.code == 0, result.err
        summary = json.loads((tmp_path / f"i-{name}" / "inked" / "summary.json").read_text())
        assert summary["nuclei"] == len(segment_features)  # the two commands agree with and without the filter
        assert ("keep_dye" in summary["settings"]["config"]) == bool(flags)  # recorded only when not the default
        counts[name] = summary["nuclei"]
    assert counts["keep"] >= counts["drop"] + 20
    # A rerun with the other setting into a finished folder is refused, not mixed in.
    result = run_cli("infer", str(png), "--input-mpp", "0.25", "--out", str(tmp_path / "i-drop"), "--keep-dye")
    assert result.code != 0
    result = run_cli("segment", str(png), "--input-mpp", "0.25", "--out", str(tmp_path / "s-drop"), "--keep-dye")
    assert result.code != 0


def test_bench_dye_counts_the_objects_the_filter_would_drop(model_info, inked, tmp_path, capsys) -> None:
    from pysynth.bench import dye as bench_dye
    from pysynth.segment import segment_image

    model, info = model_info
    got = bench_dye.object_counts(model, info, [(inked, 0.25), (inked[:256], 0.25)])
    expected = 0
    total = 0
    for rgb in (inked, inked[:256]):
        every = segment_image(model, info, rgb, 0.25, drop_dye=False)
        expected += int(dye_labels(every.labels, rgb)[1:].sum())
        total += every.count
    assert got["objects"] == total
    assert got["at_or_above_limit"] == expected >= 20
    assert got["largest_ratio"] >= RED_GREEN_LIMIT
    # Without the dev sets: one line, exit 1.
    assert bench_dye.main(["--monuseg", str(tmp_path / "none"), "--brca", str(tmp_path / "none")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("error: dev sets not found")

"""Synthetic pyramidal slides of real tissue, and the whole-slide inference benchmark section on a tiny plan."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import cv2
import numpy as np
import pytest

pytest.importorskip("tifffile")


@pytest.fixture(scope="module")
def source() -> np.ndarray:
    """Real tissue at 0.25 µm/px: a 1200×1000 px part of the bundled slide, read at 40x."""
    from pysynth import data_path
    from pysynth.io import open_slide, read_region

    with open_slide(data_path("CMU-1-Small-Region.svs")) as slide:
        return read_region(slide, 600, 1300, (1200, 1000), 0.25)


def test_pyramidal_tiff_opens_with_its_resolution_levels_and_tissue(tmp_path: Path, source: np.ndarray) -> None:
    from pysynth.bench.make_slide import cell_rgb, write_pyramidal_tiff
    from pysynth.io import OpenSlideReader, compute_tissue_mask, open_slide

    path = tmp_path / "slide.tiff"
    layout = write_pyramidal_tiff(path, source, (1024, 1536), tile=128, tissue_fraction=0.25, block=256, seed=3)
    assert len(layout.cells) == 6  # a quarter of the 4 × 6 cells
    assert layout.tissue_fraction == pytest.approx(0.25)
    again = write_pyramidal_tiff(tmp_path / "again.tiff", source, (1024, 1536), tile=128, block=256, seed=3)
    assert again.cells == layout.cells  # the seed fixes the slide
    with open_slide(path) as slide:
        assert isinstance(slide, OpenSlideReader)
        assert slide.mpp == pytest.approx(0.25, rel=1e-4)
        assert slide.mpp_source == "metadata"
        assert (
            slide.level_shapes_hw
            == layout.level_shapes_hw
            == ((1024, 1536), (512, 768), (256, 384), (128, 192), (64, 96))
        )
        assert slide.level_downsamples == pytest.approx((1, 2, 4, 8, 16))
        places = {(c.row, c.col) for c in layout.cells}
        for cell in layout.cells:
            # Lossless: level 0 holds the turned source crop exactly, level 1 its 2×2 means.
            expected = np.ascontiguousarray(cell_rgb(source, cell, 256))
            np.testing.assert_array_equal(slide.read_level(0, cell.col * 256, cell.row * 256, 256, 256), expected)
            half = cv2.resize(expected, (128, 128), interpolation=cv2.INTER_AREA)
            np.testing.assert_array_equal(slide.read_level(1, cell.col * 128, cell.row * 128, 128, 128), half)
            assert expected.std() > 20  # tissue, not glass
        glass = [(r, c) for r in range(4) for c in range(6) if (r, c) not in places]
        for r, c in glass:
            assert (slide.read_level(0, c * 256, r * 256, 256, 256) == 255).all()
        mask = compute_tissue_mask(slide)
        for cell in layout.cells:
            assert mask.region_fraction(cell.col * 256, cell.row * 256, 256, 256) > 0.8
        assert mask.fraction == pytest.approx(0.25, abs=0.05)


def test_explicit_tissue_cells_and_bad_sizes(source: np.ndarray) -> None:
    from pysynth.bench.make_slide import plan_layout

    layout = plan_layout(source, (600, 800), tissue_cells=[(1, 2), (0, 0)], block=256, tile=256)
    assert [(c.row, c.col) for c in layout.cells] == [(0, 0), (1, 2)]
    assert layout.level_shapes_hw == ((600, 800), (300, 400), (150, 200))
    with pytest.raises(ValueError, match="whole cells"):
        plan_layout(source, (600, 800), tissue_cells=[(2, 0)], block=256)  # row 2 is cut by the edge
    with pytest.raises(ValueError, match="multiple of 16"):
        plan_layout(source, (600, 800), tile=100)


def test_centred_cells_keep_tissue_inside_regions() -> None:
    from pysynth.bench.infer import centred_cells

    cells, block = centred_cells(8000, (1, 1), 2048)
    assert block == 512
    assert sorted(cells) == [(5, 5), (5, 6), (6, 5), (6, 6)]  # the middle of region (1, 1)
    cells, _ = centred_cells(40000, (1, 2), 2048)
    assert sorted(cells) == [(37, 33), (37, 34), (37, 37), (37, 38), (38, 33), (38, 34), (38, 37), (38, 38)]
    with pytest.raises(ValueError, match="fewer than"):
        centred_cells(3000, (2, 2), 2048)


@pytest.mark.slow
def test_infer_section_rows_on_a_tiny_plan(monkeypatch: pytest.MonkeyPatch) -> None:
    from pysynth.bench import infer, suite
    from pysynth.infer import InferConfig

    tiny = infer.Plan(side=1536, tissue_mpx=0.2, block=256, rss_sides=(1024, 2048), rss_more=(2, 2),
                      config=InferConfig(core=512, margin=128))  # fmt: skip
    monkeypatch.setattr(infer, "QUICK", tiny)
    result = suite.run_section("infer", quick=True)
    assert result.available
    # default against the classical pipeline; native20x on the same slide; bf16 where the CPU has bf16 units
    ours, baseline, native, *bf16 = result.timings
    assert len(bf16) == int(infer.cpu_bf16_units())
    assert ours.extra["baseline"] == baseline.name
    assert ours.unit == baseline.unit == "px"
    assert ours.items_per_call == baseline.items_per_call > 0  # the same region cores
    assert ours.rate > 0
    assert baseline.rate > 0
    assert result.ratio(ours) == pytest.approx(ours.rate / baseline.rate)
    assert set(ours.extra["stages_s"]) >= {"prepare", "read", "normalise", "network", "post", "write"}
    assert "native20x" in native.name
    assert native.items_per_call == ours.items_per_call  # the same slide: rates compare as inverse wall times
    notes = result.notes
    assert notes["native20x_vs_classical"] == pytest.approx(native.rate / baseline.rate, rel=1e-3)
    assert "warning" not in notes
    assert notes["end_to_end_mpx_per_s"] > 0
    assert "overlap" in notes["time_split"]
    cases = notes["peak_rss_cases"]
    assert [c["slide_px"] for c in cases] == [1024, 2048, 2048]
    assert [c["regions"] for c in cases] == [1, 1, 4]  # tissue centred in regions: no neighbours from the mask
    assert all(c["peak_mb"] >= c["setup_peak_mb"] > 0 for c in cases)
    assert "MB" in notes["peak_rss"]
    if bf16:
        assert "bf16" in bf16[0].name
        assert bf16[0].items_per_call == ours.items_per_call
        assert notes["bf16_vs_fp32"] == pytest.approx(bf16[0].rate / ours.rate, rel=1e-3)
        assert notes["bf16_agreement"]["nuclei"][0] == ours.extra["nuclei"]
    else:
        assert "no bf16 units" in notes["bf16"]
    assert "infer" in suite.format_section(result)


def test_nucleus_agreement_scores_each_reference_nucleus_by_its_best_iou(tmp_path: Path) -> None:
    import json

    from pysynth.bench.infer import nucleus_agreement

    def square(x: float, y: float, side: float = 20.0) -> dict:
        ring = [[x, y], [x + side, y], [x + side, y + side], [x, y + side], [x, y]]
        return {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]}}

    def write(name: str, features: list[dict]) -> Path:
        path = tmp_path / name
        path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
        return path

    reference = write("a.json", [square(0, 0), square(100, 0), square(200, 0), square(300, 0)])
    # the same; moved by 1 px of 20 (IoU 19/21 = 0.905); moved by 0.1 px (IoU 0.990); gone; and one new.
    other = write("b.json", [square(0, 0), square(101, 0), square(200.1, 0), square(500, 0), square(600, 0)])
    agreement = nucleus_agreement(reference, other)
    assert agreement["nuclei"] == [4, 5]
    assert agreement["share_iou_0.98"] == 0.5  # the first and the third
    assert agreement["share_iou_0.9"] == 0.75  # and the second
    assert agreement["count_change"] == 0.25
    assert nucleus_agreement(reference, reference)["share_iou_0.98"] == 1.0


@pytest.mark.skipif(platform.system() != "Linux", reason="per-thread nice values are Linux's")
def test_contention_bench_measures_three_cases_and_stops_its_thread(model_info, tissue_crop):
    import threading

    from pysynth.bench.network_layout import contention

    model, _ = model_info
    before, priority = threading.active_count(), os.getpriority(os.PRIO_PROCESS, 0)
    rates = contention(model, np.ascontiguousarray(tissue_crop[:256, :256]))
    assert list(rates) == ["alone", "beside a busy thread", "beside a busy thread at the helpers' priority"]
    assert all(r > 0 for r in rates.values())
    assert threading.active_count() == before
    assert os.getpriority(os.PRIO_PROCESS, 0) == priority  # only the busy thread was lowered, not the caller

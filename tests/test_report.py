"""The page per slide (report.html) and per cohort (index.html): self-contained, and saying what the run found."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import cv2
import numpy as np

from pysynth.infer.report import CROP_PX, crop_centres


def test_crop_centres_take_the_fullest_cells_apart_from_each_other() -> None:
    grid = np.zeros((12, 12))
    grid[2, 2], grid[2, 3], grid[9, 9], grid[9, 2], grid[5, 5] = 50, 49, 40, 30, 20
    grid[0, 0] = np.nan
    centres = crop_centres(grid, cell_px=10.0, count=3)
    # (2, 3) is next to (2, 2): skipped for (9, 9) and (9, 2); centres in level-0 px at cell centres.
    assert centres == [(25.0, 25.0), (95.0, 95.0), (25.0, 95.0)]
    # Asked for more than the spread allows: the spacing shrinks, (5, 5) then (2, 3), never a cell twice.
    assert crop_centres(grid, cell_px=10.0, count=6) == [
        (25.0, 25.0),
        (95.0, 95.0),
        (25.0, 95.0),
        (55.0, 55.0),
        (35.0, 25.0),
    ]
    assert crop_centres(np.zeros((4, 4)), 10.0) == []  # no nuclei: no crops


def _images(page: str) -> list[np.ndarray]:
    found = re.findall(r'src="data:image/(?:png|jpeg);base64,([^"]+)"', page)
    return [cv2.imdecode(np.frombuffer(base64.b64decode(d), np.uint8), cv2.IMREAD_COLOR) for d in found]


def test_infer_writes_a_self_contained_report_and_a_cohort_index(run_cli, tmp_path: Path, sample_slide) -> None:
    from pysynth.io import open_slide

    with open_slide(sample_slide) as slide:
        level0 = slide.read_level(0, 700, 1500, 600, 430)
    good = tmp_path / "in" / "good.png"
    good.parent.mkdir()
    cv2.imwrite(str(good), cv2.cvtColor(level0, cv2.COLOR_RGB2BGR))
    bad = tmp_path / "in" / "bad.png"
    bad.write_bytes(b"not an image")
    out = tmp_path / "out"
    r = run_cli("infer", good, bad, "--input-mpp", "0.499", "--out", out)
    assert r.code == 1  # one slide failed
    summary = json.loads((out / "good" / "summary.json").read_text())
    page = (out / "good" / "report.html").read_text()
    # Self-contained: no file or network reference beyond the embedded pictures.
    assert not re.search(r'(src|href)="(?!data:)', page)
    assert f"<td>nuclei</td><td>{summary['nuclei']:,}</td>" in page
    assert "report" in summary["timings"]
    pictures = _images(page)
    assert len(pictures) == 3 + 4  # outline, nucleus density, lymphocyte density; four crops
    crops = [p for p in pictures if p.shape[:2] == (CROP_PX, CROP_PX)]
    assert len(crops) == 4
    for crop in crops:  # every crop has outlines drawn (green or the lymphocytes' blue)
        b, g, r_ = crop[..., 0].astype(int), crop[..., 1].astype(int), crop[..., 2].astype(int)
        outlined = ((g > 150) & (r_ < 80) & (b < 80)) | ((b > 200) & (g > 120) & (r_ < 60))
        assert outlined.sum() > 200
    counts = [int(m) for m in re.findall(r"(\d+) nuclei, 96 µm wide", page)]
    assert len(counts) == 4
    assert all(n > 10 for n in counts)
    index = (out / "index.html").read_text()
    assert '<a href="good/report.html">good</a>' in index
    assert f"<td>{summary['nuclei']:,}</td>" in index
    assert re.search(r'<td>bad</td><td class="failed">failed</td>.*bad\.png', index)
    _check_picture(out / "good" / "report.html", summary, tmp_path / "report.png")


def _check_picture(report: Path, summary: dict, picture: Path) -> None:
    # The README's picture of a report is drawn from the page itself: its pictures, captions and tables.
    import pytest

    pytest.importorskip("PIL")
    from pysynth.bench.report_picture import draw, read_page

    page = read_page(report)
    assert page.title == "good.png"
    assert "µm/px" in page.subtitle
    assert len(page.figures) == 7
    assert sum("96 µm wide" in caption for _, caption in page.figures) == 4
    counts = dict(row for row in page.tables[0][1] if len(row) == 2)
    assert page.tables[0][0] == "Counts"
    assert counts["nuclei"] == f"{summary['nuclei']:,}"
    draw(page, picture)
    drawn = cv2.imread(str(picture))
    assert drawn.shape[1] == 1600
    assert (drawn < 200).any(axis=2).mean() > 0.3  # the pictures are on it, not a blank page

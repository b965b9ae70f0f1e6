"""A page per slide to look at (``report.html``), and one for a cohort (``index.html``): self-contained HTML.

A slide's page holds the thumbnail with the tissue outline, the nucleus density map (and the lymphocyte one with a
class output), the counts and summary statistics of the nuclei (from ``nuclei.parquet``), the stage timings, and
four crops at full resolution (the model's µm/px) with every nucleus outlined, taken where most nuclei are and
apart from each other. Pictures are embedded (base64 PNG/JPEG): the page needs no network and no other file.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from pysynth.fsutil import atomic_write_text
from pysynth.io import SlideReader, read_region, read_thumbnail
from pysynth.io.tissue import TissueMask
from pysynth.qupath import CLASS_COLOURS, LYMPHOCYTE

from .plan import Region

REPORT = "report.html"
INDEX = "index.html"
#: Side of the full-resolution crops, in px at the model's resolution (96 µm at 0.25 µm/px).
CROP_PX = 384
CROPS = 4

_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:24px;color:#222;max-width:1280px}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:24px 0 8px} .sub{color:#666;margin-bottom:16px}
table{border-collapse:collapse;font-size:14px} td,th{padding:3px 10px;border-bottom:1px solid #ddd;text-align:right}
th:first-child,td:first-child{text-align:left} .row{display:flex;flex-wrap:wrap;gap:16px;align-items:flex-start}
figure{margin:0} figcaption{font-size:13px;color:#555} img{max-width:100%;border:1px solid #ccc}
.failed{color:#b00} .refused{color:#a60}
"""


def _png(rgb: np.ndarray) -> str:
    return "data:image/png;base64," + base64.b64encode(cv2.imencode(".png", rgb[..., ::-1])[1].tobytes()).decode()


def _jpeg(rgb: np.ndarray) -> str:
    data = cv2.imencode(".jpg", rgb[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()
    return "data:image/jpeg;base64," + base64.b64encode(data).decode()


def _figure(src: str, caption: str, width: int | None = None) -> str:
    style = f' style="width:{width}px"' if width else ""
    return f'<figure{style}><img src="{src}" alt=""><figcaption>{html.escape(caption)}</figcaption></figure>'


def crop_centres(grid: np.ndarray, cell_px: float, count: int = CROPS) -> list[tuple[float, float]]:
    """Up to ``count`` level-0 ``(x, y)`` centres of the cells of ``grid`` with the most, apart from each other.

    Cells are taken in order of their values, each at least a quarter of the grid's larger side from those taken
    before; when that leaves fewer than ``count``, the spacing halves, down to neighbouring cells (crops of about
    a cell then never overlap).
    """
    values = np.where(np.isfinite(grid), grid, -1.0)
    order = [divmod(int(flat), grid.shape[1]) for flat in np.argsort(values, axis=None, kind="stable")[::-1]]
    order = [(r, c) for r, c in order if values[r, c] > 0]
    picked: list[tuple[int, int]] = []
    spacing = max(1.0, max(grid.shape) / 4)
    while len(picked) < count:
        for r, c in order:
            if len(picked) == count:
                break
            if (r, c) not in picked and all(max(abs(r - pr), abs(c - pc)) >= spacing for pr, pc in picked):
                picked.append((r, c))
        if spacing <= 1.0:
            break
        spacing = max(1.0, spacing / 2)
    return [((c + 0.5) * cell_px, (r + 0.5) * cell_px) for r, c in picked]


def _crop(
    reader: SlideReader,
    centre: tuple[float, float],
    mpp: float,
    regions: list[Region],
    parts: Path,
    called: dict[int, np.ndarray],
) -> tuple[np.ndarray, int]:
    """A crop of ``CROP_PX`` px at the model's ``mpp`` around a level-0 ``centre``, every nucleus in it outlined.

    ``called`` holds, per region index, whether each of its nuclei (in the order of its saved part) is a
    lymphocyte, as the table classifies it.
    """
    f = mpp / reader.mpp  # level-0 px per model px
    x0, y0 = centre[0] - CROP_PX / 2 * f, centre[1] - CROP_PX / 2 * f
    rgb = np.ascontiguousarray(read_region(reader, x0, y0, (CROP_PX, CROP_PX), mpp))
    box = (x0 / f, y0 / f, x0 / f + CROP_PX, y0 / f + CROP_PX)  # in model px
    groups: dict[bool, list[np.ndarray]] = {False: [], True: []}
    for region in regions:
        if region.x > box[2] + 64 or region.x + region.w < box[0] - 64:
            continue
        if region.y > box[3] + 64 or region.y + region.h < box[1] - 64:
            continue
        lymphocytes = called.get(region.index)
        for i, nuc in enumerate(json.loads((parts / f"{region.index:06d}.json").read_text())["nuclei"]):
            ring = (np.asarray(nuc["polygon"], np.float64) - (x0, y0)) / f
            if ring[:, 0].max() < 0 or ring[:, 1].max() < 0 or ring[:, 0].min() > CROP_PX or ring[:, 1].min() > CROP_PX:
                continue
            lymph = lymphocytes is not None and bool(lymphocytes[i])
            groups[lymph].append(np.round(ring * 4).astype(np.int32))
    for lymph, polys in groups.items():
        if polys:
            colour = CLASS_COLOURS[LYMPHOCYTE] if lymph else (0, 200, 0)
            cv2.polylines(rgb, polys, True, colour, 1, cv2.LINE_AA, shift=2)
    return rgb, len(groups[False]) + len(groups[True])


def _quantiles(values: np.ndarray) -> list[str]:
    values = values[np.isfinite(values)]
    if not len(values):
        return ["–"] * 3
    return [f"{v:.3g}" for v in np.percentile(values, [25, 50, 75])]


def write_report(
    slide_dir: Path,
    reader: SlideReader,
    regions: list[Region],
    parts: Path,
    mpp: float,
    tissue: TissueMask,
    summary: dict[str, Any],
    threshold: float | None,
) -> Path:
    """Write ``report.html`` of a finished slide (its table written; its saved regions, ``parts``, still there)."""
    from pysynth.table import TABLE, read_table
    from pysynth.viz import heatmap_over

    from .write import DENSITY_CELL_UM, density_grid

    columns = ["centroid_x_px", "centroid_y_px", "area_um2", "circularity", "confidence", "region", "classification"]
    table = read_table(slide_dir / TABLE).select(columns)
    data = {name: table.column(name).to_numpy(zero_copy_only=False) for name in columns[:-1]}
    kinds = np.asarray(table.column("classification").to_pylist(), dtype=object)
    # The table's classification per region, in the order of its saved part (the crops outline by it): a stable
    # sort by region keeps each region's rows in their order, in one pass whatever the number of regions.
    region = np.asarray(data["region"], np.int64)
    order = np.argsort(region, kind="stable")
    edges = np.flatnonzero(np.diff(region[order])) + 1
    lymph_rows = kinds[order] == LYMPHOCYTE
    called = {}
    if len(order):  # a slide without nuclei has no groups
        for a, b in zip(np.r_[0, edges], np.r_[edges, len(order)], strict=True):
            called[int(region[order[a]])] = lymph_rows[a:b]
    xy = np.stack([data["centroid_x_px"], data["centroid_y_px"]], axis=1).reshape(-1, 2)
    h0, w0 = reader.level_shapes_hw[0]
    t_mpp = max(4.0, max(h0, w0) * reader.mpp / 1200)
    thumb = np.ascontiguousarray(read_thumbnail(reader, t_mpp))
    outlined = thumb.copy()
    mask = cv2.resize(tissue.mask.astype(np.uint8), (thumb.shape[1], thumb.shape[0]), interpolation=cv2.INTER_NEAREST)
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(outlined, contours, -1, (0, 90, 255), 2)
    density = density_grid(xy, tissue)
    pictures = [
        _figure(_png(outlined), f"tissue outline ({tissue.area_um2() / 1e6:.2f} mm²)", 420),
        _figure(_png(heatmap_over(thumb, density, label="nuclei/mm² tissue")), "nuclei per mm² of tissue", 420),
    ]
    lymph = kinds == LYMPHOCYTE
    if threshold is not None:
        grid = density_grid(xy[lymph], tissue)
        pictures.append(_figure(_png(heatmap_over(thumb, grid, label="lymphocytes/mm²")), "lymphocytes per mm²", 420))
    # Crops where most nuclei are (counts, not density: a sliver of tissue at an edge has a high density of few).
    cell_px = DENSITY_CELL_UM / (tissue.mpp / tissue.scale)
    counts = np.zeros(density.shape, np.float64)
    if len(xy):
        r = np.clip((xy[:, 1] // cell_px).astype(np.int64), 0, density.shape[0] - 1)
        c = np.clip((xy[:, 0] // cell_px).astype(np.int64), 0, density.shape[1] - 1)
        np.add.at(counts, (r, c), 1.0)
    crops = []
    half = CROP_PX / 2 * mpp / reader.mpp  # half a crop in level-0 px: crops stay inside the slide
    for cx, cy in crop_centres(counts, cell_px):
        centre = (min(max(cx, half), max(half, w0 - half)), min(max(cy, half), max(half, h0 - half)))
        rgb, n = _crop(reader, centre, mpp, regions, parts, called)
        where = f"x {centre[0]:.0f}, y {centre[1]:.0f} (level-0 px)"
        crops.append(_figure(_jpeg(rgb), f"{where}: {n} nuclei, {CROP_PX * mpp:.0f} µm wide", CROP_PX))
    tissue_mm2 = tissue.area_um2() / 1e6
    n = len(xy)
    rows = [
        ("nuclei", f"{n:,}"),
        ("nuclei per mm² of tissue", f"{n / tissue_mm2:,.0f}" if tissue_mm2 > 0 else "–"),
        ("tissue", f"{tissue_mm2:.3f} mm²"),
        ("regions", str(summary.get("regions", ""))),
    ]
    if threshold is not None:
        share = lymph.mean() if n else 0.0
        by_rule = summary.get("settings", {}).get("config", {}).get("lymphocyte_call") == "probability+rule"
        how = f"by probability (threshold {threshold:g}) and rule" if by_rule else f"at probability ≥ {threshold:g}"
        rows += [
            ("lymphocytes", f"{int(lymph.sum()):,} ({share:.1%}) {how}"),
            ("lymphocytes per mm²", f"{lymph.sum() / tissue_mm2:,.0f}" if tissue_mm2 > 0 else "–"),
        ]
    stats = [
        ("area µm²", _quantiles(data["area_um2"])),
        ("circularity", _quantiles(data["circularity"])),
        ("confidence", _quantiles(data["confidence"])),
    ]
    timings = summary.get("timings", {})
    timing_rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{v:.1f} s</td></tr>" for k, v in timings.items())
    name = html.escape(Path(str(reader.name)).name)
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{name}: pysynth</title>
<style>{_STYLE}</style></head><body>
<h1>{name}</h1><div class="sub">pysynth {html.escape(str(summary.get("versions", {}).get("pysynth", "")))}, model
{html.escape(str(summary.get("settings", {}).get("model", "")))} at {mpp:g} µm/px; slide {reader.mpp:g} µm/px
({html.escape(str(reader.mpp_source))}); {summary.get("seconds", 0):.1f} s,
{summary.get("megapixels_per_s", 0):.2f} Mpx/s on {html.escape(str(summary.get("device", "")))}</div>
<div class="row">{"".join(pictures)}</div>
<div class="row"><div><h2>Counts</h2><table>{"".join(f"<tr><td>{k}</td><td>{v}</td></tr>" for k, v in rows)}</table>
</div><div><h2>Nuclei</h2><table><tr><th></th><th>25%</th><th>median</th><th>75%</th></tr>
{"".join(f"<tr><td>{k}</td>" + "".join(f"<td>{v}</td>" for v in q) + "</tr>" for k, q in stats)}</table></div>
<div><h2>Time per stage</h2><table>{timing_rows}</table></div></div>
<h2>At full resolution</h2><div class="sub">Where most nuclei are; nuclei outlined in green, lymphocytes in
blue.</div><div class="row">{"".join(crops) or "no nuclei"}</div>
</body></html>
"""
    path = slide_dir / REPORT
    atomic_write_text(path, page)
    return path


def write_index(out: Path, slides: list[dict[str, Any]]) -> Path:
    """Write the cohort page ``index.html`` of an output folder from ``run.json``'s slide records."""
    rows = []
    for record in slides:
        name = str(record.get("name", ""))
        status = str(record.get("last_call", {}).get("status") or record.get("status", ""))
        link = f"{name}/{REPORT}"
        has_report = (out / link).exists()
        cell = f'<a href="{html.escape(link)}">{html.escape(name)}</a>' if has_report else html.escape(name)
        nuclei = record.get("nuclei")
        lymphocytes = record.get("lymphocytes")
        error = html.escape(str(record.get("last_call", {}).get("error") or record.get("error") or ""))
        rows.append(
            f'<tr><td>{cell}</td><td class="{html.escape(status)}">{html.escape(status)}</td>'
            f"<td>{'' if nuclei is None else f'{nuclei:,}'}</td>"
            f"<td>{'' if lymphocytes is None else f'{lymphocytes:,}'}</td>"
            f"<td>{record.get('tissue_mm2', '') or ''}</td><td>{record.get('seconds', '') or ''}</td>"
            f'<td style="text-align:left">{error}</td></tr>'
        )
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>pysynth results</title>
<style>{_STYLE}</style></head><body><h1>pysynth results</h1><div class="sub">{len(slides)} slide(s)</div>
<table><tr><th>slide</th><th>status</th><th>nuclei</th><th>lymphocytes</th><th>tissue mm²</th><th>s</th>
<th style="text-align:left">error</th></tr>{"".join(rows)}</table></body></html>
"""
    path = out / INDEX
    atomic_write_text(path, page)
    return path

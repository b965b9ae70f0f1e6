"""Stage "write": a finished slide's outputs, streamed from its saved regions (GeoJSON, CSV, overlay, density map)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from pysynth.fsutil import atomic_write_bytes, atomic_write_text, atomic_writer
from pysynth.io import SlideReader, read_thumbnail
from pysynth.io.tissue import TissueMask
from pysynth.qupath import (
    CLASS_COLOURS,
    CONFIDENCE,
    DETECTION_PEAK,
    LYMPHOCYTE,
    LYMPHOCYTE_PROBABILITY,
    NUCLEUS,
    detection,
)
from pysynth.shape import MEASUREMENT_NAMES

from .config import CSV_DIR, DENSITY_CELL_UM, DENSITY_GRID, DENSITY_MAP, GEOJSON, OVERLAY, InferConfig
from .plan import Region


def csv_text(nuclei: list[dict[str, Any]]) -> str:
    """A region's nuclei in the CSV format of the method's released code (level-0 px polygons, area in px and µm²)."""
    lines = ["AreaInPixels,PhysicalSize,Polygon"]
    for nuc in nuclei:
        coords = ":".join(f"{x:.2f}:{y:.2f}" for x, y in nuc["polygon"])
        lines.append(f"{nuc['area_px']},{nuc['area_um2']},[{coords}]")
    return "\n".join(lines) + "\n"


def feature(nuc: dict[str, Any], ident: int, lymphocyte_threshold: float | None = None) -> dict[str, Any]:
    """One nucleus as a QuPath detection; with a class output (``lymphocyte`` in ``nuc``) classified by threshold."""
    classes = "lymphocyte" in nuc and lymphocyte_threshold is not None
    kind = None
    if classes:
        kind = LYMPHOCYTE if nuc["lymphocyte"] >= lymphocyte_threshold else NUCLEUS
    measurements = {
        # Area, perimeter and the shape features (parts written before the latter existed lack them).
        **{name: nuc[key] for key, name in MEASUREMENT_NAMES.items() if key in nuc},
        "Centroid X px": nuc["centroid"][0],
        "Centroid Y px": nuc["centroid"][1],
        "Hematoxylin OD mean": nuc["hematoxylin"],
        CONFIDENCE: nuc["confidence"],
        DETECTION_PEAK: nuc["detection_peak"],
        **({LYMPHOCYTE_PROBABILITY: nuc["lymphocyte"]} if classes else {}),
    }
    return detection(ident, nuc["polygon"], kind=kind, measurements=measurements)


def write_outputs(
    slide_dir: Path,
    reader: SlideReader,
    regions: list[Region],
    parts: Path,
    mpp: float,
    config: InferConfig,
    lymphocyte_threshold: float | None = None,
    tissue: TissueMask | None = None,
) -> tuple[int, float, dict[str, Any]]:
    """Stream the parts into nuclei.geojson, csv/ and overlay.png; returns (nuclei, seconds, class summary).

    With a class output (``lymphocyte_threshold`` given) lymphocytes are outlined in their own colour, and the
    lymphocyte density grid and its heatmap are written (:func:`write_density`); the class summary holds their
    count and density (empty without a class output).
    """
    started = time.perf_counter()
    classes_wanted = lymphocyte_threshold is not None and tissue is not None
    h0, w0 = reader.level_shapes_hw[0]
    o_mpp = max(config.overlay_mpp, max(h0, w0) * reader.mpp / 8000)
    thumb = np.ascontiguousarray(read_thumbnail(reader, o_mpp))
    scale = reader.mpp / o_mpp  # overlay px per level-0 px
    # The density map's background: the thumbnail before the outlines, at a quarter of the overlay's size.
    quarter = (max(1, thumb.shape[1] // 4), max(1, thumb.shape[0] // 4))
    plain = cv2.resize(thumb, quarter, interpolation=cv2.INTER_AREA) if classes_wanted else None
    csv_dir = slide_dir / CSV_DIR
    csv_dir.mkdir(exist_ok=True)
    f = mpp / reader.mpp
    count = 0
    lymphocyte_xy: list[tuple[float, float]] = []
    colours = {NUCLEUS: (0, 160, 0), LYMPHOCYTE: CLASS_COLOURS[LYMPHOCYTE]}
    with atomic_writer(slide_dir / GEOJSON, "w") as out:
        out.write('{"type":"FeatureCollection","features":[')
        for region in regions:
            nuclei = json.loads((parts / f"{region.index:06d}.json").read_text())["nuclei"]
            x0, y0 = round(region.x * f), round(region.y * f)
            name = f"{x0}_{y0}_{round(region.w * f)}_{round(region.h * f)}.csv"
            atomic_write_text(csv_dir / name, csv_text(nuclei))
            polys: dict[str, list[np.ndarray]] = {NUCLEUS: [], LYMPHOCYTE: []}
            for nuc in nuclei:
                count += 1
                feat = feature(nuc, count, lymphocyte_threshold)
                out.write(("," if count > 1 else "") + json.dumps(feat, separators=(",", ":")))
                kind = feat["properties"]["classification"]["name"]
                if kind == LYMPHOCYTE:
                    lymphocyte_xy.append((nuc["centroid"][0], nuc["centroid"][1]))
                polys[kind].append(np.round(np.array(nuc["polygon"]) * scale * 4).astype(np.int32))
            for kind, group in polys.items():
                if group:
                    cv2.polylines(thumb, group, True, colours[kind], 1, cv2.LINE_AA, shift=2)
        out.write("]}\n")
    atomic_write_bytes(slide_dir / OVERLAY, cv2.imencode(".png", cv2.cvtColor(thumb, cv2.COLOR_RGB2BGR))[1].tobytes())
    classes: dict[str, Any] = {}
    if plain is not None and tissue is not None:
        tissue_mm2 = tissue.area_um2() / 1e6
        classes = {
            "lymphocytes": len(lymphocyte_xy),
            "lymphocyte_threshold": lymphocyte_threshold,
            "lymphocytes_per_mm2": round(len(lymphocyte_xy) / tissue_mm2, 2) if tissue_mm2 > 0 else None,
            **write_density(slide_dir, np.array(lymphocyte_xy, np.float64).reshape(-1, 2), plain, tissue),
        }
    return count, time.perf_counter() - started, classes


def density_grid(
    xy: np.ndarray, tissue: TissueMask, cell_um: float = DENSITY_CELL_UM, min_tissue: float = 0.1
) -> np.ndarray:
    """Nuclei per mm² of tissue in square cells of ``cell_um`` over the slide (float32; NaN off tissue).

    Args:
        xy: ``(n, 2)`` centroids in level-0 px.
        tissue: The slide's tissue mask (its area per cell is the denominator; its µm per level-0 px is
            ``tissue.mpp / tissue.scale``).
        cell_um: Side of a cell.
        min_tissue: Cells with less tissue than this share of their area are NaN (an edge sliver's density is
            noise).
    """
    cell = cell_um / (tissue.mpp / tissue.scale)  # level-0 px per cell
    h0 = tissue.mask.shape[0] * tissue.scale
    w0 = tissue.mask.shape[1] * tissue.scale
    rows, cols = max(1, math.ceil(h0 / cell)), max(1, math.ceil(w0 / cell))
    counts = np.zeros((rows, cols), np.float64)
    if len(xy):
        c = np.clip((xy[:, 0] // cell).astype(np.int64), 0, cols - 1)
        r = np.clip((xy[:, 1] // cell).astype(np.int64), 0, rows - 1)
        np.add.at(counts, (r, c), 1.0)
    # Tissue share per cell: the mask's pixels binned into cells by their centres.
    my, mx = np.nonzero(tissue.mask)
    share = np.zeros((rows, cols), np.float64)
    per_pixel = tissue.scale * tissue.scale / (cell * cell)
    if len(my):
        r = np.clip((((my + 0.5) * tissue.scale) // cell).astype(np.int64), 0, rows - 1)
        c = np.clip((((mx + 0.5) * tissue.scale) // cell).astype(np.int64), 0, cols - 1)
        np.add.at(share, (r, c), per_pixel)
    share = np.minimum(share, 1.0)
    area_mm2 = share * (cell_um / 1000.0) ** 2
    with np.errstate(invalid="ignore", divide="ignore"):
        density = np.where(share >= min_tissue, counts / area_mm2, np.nan)
    return density.astype(np.float32)


def write_density(slide_dir: Path, xy: np.ndarray, thumbnail: np.ndarray, tissue: TissueMask) -> dict[str, Any]:
    """Write the lymphocyte density grid (``.npy``) and its heatmap over ``thumbnail``; returns their description.

    ``xy`` are the lymphocytes' centroids in level-0 px; ``thumbnail`` is the whole slide at any scale.
    """
    import io as _io

    from pysynth.viz import heatmap_over

    density = density_grid(xy, tissue)
    buffer = _io.BytesIO()
    np.save(buffer, density)
    atomic_write_bytes(slide_dir / DENSITY_GRID, buffer.getvalue())
    picture = heatmap_over(thumbnail, density, label="lymphocytes/mm² tissue")
    atomic_write_bytes(
        slide_dir / DENSITY_MAP, cv2.imencode(".png", cv2.cvtColor(picture, cv2.COLOR_RGB2BGR))[1].tobytes()
    )
    finite = density[np.isfinite(density)]
    return {
        "density_grid": DENSITY_GRID,
        "density_cell_um": DENSITY_CELL_UM,
        "density_max_per_mm2": round(float(finite.max()), 1) if finite.size else None,
    }


def rasterise(features: list[dict[str, Any]], shape_hw: tuple[int, int], scale: float = 1.0) -> np.ndarray:
    """Instance labels (int32, ``1..n`` in order) of GeoJSON polygons drawn at ``scale`` px per level-0 px.

    A pixel belongs to a polygon when its centre lies inside it, so exact pixel-edge outlines give back exactly
    the pixels they were traced from, and touching nuclei never share a pixel.
    """
    from pysynth.synth.raster import rasterize_polygons

    rings = [np.asarray(f["geometry"]["coordinates"][0], np.float64)[:-1] * scale for f in features]
    if not rings:
        return np.zeros(shape_hw, np.int32)
    offsets = np.cumsum([0, *(len(r) for r in rings)])
    return rasterize_polygons(np.concatenate(rings), offsets, shape_hw)

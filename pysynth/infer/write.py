"""Stage "write": a finished slide's outputs, streamed from its saved regions (GeoJSON, CSV, overlay, density map)."""

from __future__ import annotations

import contextlib
import io
import json
import math
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import cv2
import numpy as np

from pysynth import __version__
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
from pysynth.table import SHAPE_COLUMNS, TABLE, table_writer

from .config import CSV_DIR, DENSITY_CELL_UM, DENSITY_GRID, DENSITY_MAP, GEOJSON, GEOJSON_ZIP, OVERLAY, InferConfig
from .plan import Region


def csv_text(nuclei: list[dict[str, Any]]) -> str:
    """A region's nuclei in the CSV format of the method's released code (level-0 px polygons, area in px and µm²)."""
    lines = ["AreaInPixels,PhysicalSize,Polygon"]
    for nuc in nuclei:
        coords = ":".join(f"{x:.2f}:{y:.2f}" for x, y in nuc["polygon"])
        lines.append(f"{nuc['area_px']},{nuc['area_um2']},[{coords}]")
    return "\n".join(lines) + "\n"


#: QuPath names of the stain statistics of a region's nucleus records (the mean of hematoxylin has its own line).
STAIN_NAMES = {"hematoxylin_sd": "Hematoxylin OD sd", "eosin": "Eosin OD mean", "eosin_sd": "Eosin OD sd"}


#: Table columns of the other fields of a region's nucleus records.
RECORD_COLUMNS = {
    "hematoxylin": "hematoxylin_od_mean",
    "hematoxylin_sd": "hematoxylin_od_sd",
    "eosin": "eosin_od_mean",
    "eosin_sd": "eosin_od_sd",
    "lymphocyte": "lymphocyte_probability",
}


def table_columns(nuclei: list[dict[str, Any]], first_id: int, region: int, kinds: list[str], slide_mpp: float):
    """The table's columns (:mod:`pysynth.table`) of one region's nucleus records, ids from ``first_id``."""
    n = len(nuclei)
    xy = np.array([nuc["centroid"] for nuc in nuclei], np.float64).reshape(n, 2)
    columns: dict[str, Any] = {
        "id": np.arange(first_id, first_id + n, dtype=np.int64),
        "region": np.full(n, region, np.int32),
        "centroid_x_px": xy[:, 0],
        "centroid_y_px": xy[:, 1],
        "centroid_x_um": xy[:, 0] * slide_mpp,
        "centroid_y_um": xy[:, 1] * slide_mpp,
        "confidence": [nuc["confidence"] for nuc in nuclei],
        "detection_peak": [nuc["detection_peak"] for nuc in nuclei],
        "classification": kinds,
    }
    for key in ("area_um2", *SHAPE_COLUMNS):
        if n and key in nuclei[0]:
            columns[key] = [nuc[key] for nuc in nuclei]
    for key, column in RECORD_COLUMNS.items():
        if n and key in nuclei[0]:
            columns[column] = [nuc[key] for nuc in nuclei]
    return columns


def feature(
    nuc: dict[str, Any], ident: int, lymphocyte_threshold: float | None = None, lymphocyte: bool | None = None
) -> dict[str, Any]:
    """One nucleus as a QuPath detection; with a class output (``lymphocyte`` in ``nuc``) classified.

    ``lymphocyte`` is the call (:mod:`pysynth.lymphocyte`, made over the slide's nuclei by :func:`lymphocyte_calls`);
    without it the nucleus is classified by its probability at ``lymphocyte_threshold`` alone.
    """
    classes = "lymphocyte" in nuc and lymphocyte_threshold is not None
    kind = None
    if classes:
        called = nuc["lymphocyte"] >= lymphocyte_threshold if lymphocyte is None else lymphocyte
        kind = LYMPHOCYTE if called else NUCLEUS
    measurements = {
        # Area, perimeter and the shape features (parts written before the latter existed lack them).
        **{name: nuc[key] for key, name in MEASUREMENT_NAMES.items() if key in nuc},
        "Centroid X px": nuc["centroid"][0],
        "Centroid Y px": nuc["centroid"][1],
        "Hematoxylin OD mean": nuc["hematoxylin"],
        **{name: nuc[key] for key, name in STAIN_NAMES.items() if key in nuc},
        CONFIDENCE: nuc["confidence"],
        DETECTION_PEAK: nuc["detection_peak"],
        **({LYMPHOCYTE_PROBABILITY: nuc["lymphocyte"]} if classes else {}),
    }
    return detection(ident, nuc["polygon"], kind=kind, measurements=measurements)


@contextlib.contextmanager
def geojson_writer(slide_dir: Path, fmt: str = "plain") -> Iterator[IO[str]]:
    """A text stream into the slide's GeoJSON, replaced atomically when the block ends without an error.

    ``fmt`` ``"zip"`` deflates it into ``nuclei.geojson.zip`` (one entry, ``nuclei.geojson``, with a fixed time
    stamp, so the same nuclei give the same bytes).
    """
    if fmt == "plain":
        with atomic_writer(slide_dir / GEOJSON, "w") as out:
            yield out
        return
    entry = zipfile.ZipInfo(GEOJSON, date_time=(1980, 1, 1, 0, 0, 0))
    entry.compress_type = zipfile.ZIP_DEFLATED
    with (
        atomic_writer(slide_dir / GEOJSON_ZIP, "wb") as raw,
        zipfile.ZipFile(raw, "w", compresslevel=6) as archive,
        archive.open(entry, "w", force_zip64=True) as member,
        io.TextIOWrapper(member, encoding="utf-8") as out,
    ):
        yield out


def lymphocyte_calls(regions: list[Region], parts: Path, threshold: float) -> dict[int, np.ndarray]:
    """Per region, the lymphocyte call of each of its nuclei (:func:`pysynth.lymphocyte.call`) over the slide's nuclei.

    A first pass over the saved regions, since the rule's z-scores are taken over all nuclei of the slide.
    Empty when the nuclei have no class output's probability.
    """
    from pysynth.lymphocyte import call

    columns: dict[str, list[float]] = {"lymphocyte": [], "area_px": [], "hematoxylin": [], "circularity": []}
    sizes = []
    for region in regions:
        nuclei = json.loads((parts / f"{region.index:06d}.json").read_text())["nuclei"]
        if any("lymphocyte" not in nuc for nuc in nuclei):
            return {}
        sizes.append(len(nuclei))
        for key, values in columns.items():
            values.extend(float(nuc[key]) for nuc in nuclei)
    arrays = {key: np.asarray(values, np.float64) for key, values in columns.items()}
    called = call(arrays["lymphocyte"], arrays["area_px"], arrays["hematoxylin"], arrays["circularity"], threshold)
    ends = np.cumsum(sizes)
    return {region.index: called[end - n : end] for region, n, end in zip(regions, sizes, ends, strict=True)}


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
    """Stream the parts into the GeoJSON, nuclei.parquet, csv/ and overlay.png; returns (nuclei, seconds, classes).

    The table (:mod:`pysynth.table`) has one row per GeoJSON feature, with the same ``id``, one row group per
    region.

    With a class output (``lymphocyte_threshold`` given) lymphocytes (at the threshold, or with
    ``config.lymphocyte_call`` ``"probability+rule"`` by :func:`lymphocyte_calls` over the slide's nuclei) are
    outlined in their own colour, and the
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
    by_rule = lymphocyte_threshold is not None and config.lymphocyte_call == "probability+rule"
    calls = lymphocyte_calls(regions, parts, lymphocyte_threshold) if by_rule else {}
    metadata = {
        "source": Path(str(reader.name)).name,
        "slide_mpp": reader.mpp,
        "model_mpp": mpp,
        "pysynth": __version__,
        "coordinates": "level-0 px of the slide, x right, y down",
    }
    with geojson_writer(slide_dir, config.geojson) as out, table_writer(slide_dir / TABLE, metadata) as table:
        out.write('{"type":"FeatureCollection","features":[')
        for region in regions:
            nuclei = json.loads((parts / f"{region.index:06d}.json").read_text())["nuclei"]
            x0, y0 = round(region.x * f), round(region.y * f)
            name = f"{x0}_{y0}_{round(region.w * f)}_{round(region.h * f)}.csv"
            atomic_write_text(csv_dir / name, csv_text(nuclei))
            polys: dict[str, list[np.ndarray]] = {NUCLEUS: [], LYMPHOCYTE: []}
            first, kinds = count + 1, []
            region_calls = calls.get(region.index)
            for i, nuc in enumerate(nuclei):
                count += 1
                called = None if region_calls is None else bool(region_calls[i])
                feat = feature(nuc, count, lymphocyte_threshold, called)
                out.write(("," if count > 1 else "") + json.dumps(feat, separators=(",", ":")))
                kind = feat["properties"]["classification"]["name"]
                kinds.append(kind)
                if kind == LYMPHOCYTE:
                    lymphocyte_xy.append((nuc["centroid"][0], nuc["centroid"][1]))
                polys[kind].append(np.round(np.array(nuc["polygon"]) * scale * 4).astype(np.int32))
            table.write(table_columns(nuclei, first, region.index, kinds, reader.mpp))
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

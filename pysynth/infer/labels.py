"""Stage "labels" (``infer --labels ome-tiff``): the nuclei as a tiled, pyramidal OME-TIFF of uint32 instance ids.

Ids are the GeoJSON features' and the table's (``id``), pixels are at the model's resolution with the physical
pixel size in the OME metadata, and every level of the pyramid (halving down to one tile) is rasterised from the
polygons at its own scale (:func:`pysynth.synth.raster.rasterize_polygons`: a pixel belongs to the nucleus whose
outline holds its centre, so level 0 gives back exactly the pixels the outlines were traced from). Memory is
bounded by one band of tiles: the polygons of the saved regions are first spilled, with their bounding boxes, to
flat files beside them and read back memory-mapped band by band.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from pysynth.fsutil import atomic_path
from pysynth.io import SlideReader

from .plan import Region, slide_extent

LABELS = "labels.ome.tif"
#: Side of the TIFF tiles (px).
TILE = 512
_SPILL = ("labels-xy.f32", "labels-offsets.i64", "labels-ids.i64", "labels-boxes.f32")


def spill_polygons(regions: list[Region], parts: Path, level0_per_px: float) -> int:
    """Write every saved region's polygons (model px), ids and boxes to flat files in ``parts``.

    Ids count from 1 in output order (the GeoJSON's and the table's). Returns the number of nuclei.
    """
    files = [(parts / name).open("wb") for name in _SPILL]  # closed below, all together
    try:
        xy_file, offset_file, id_file, box_file = files
        count, vertices = 0, 0
        offset_file.write(np.zeros(1, np.int64).tobytes())
        for region in regions:
            nuclei = json.loads((parts / f"{region.index:06d}.json").read_text())["nuclei"]
            if not nuclei:
                continue
            rings = [np.asarray(nuc["polygon"], np.float64) / level0_per_px for nuc in nuclei]
            sizes = np.array([len(r) for r in rings], np.int64)
            xy = np.concatenate(rings).astype(np.float32)
            boxes = np.array([[*r.min(axis=0), *r.max(axis=0)] for r in rings], np.float32)
            xy_file.write(xy.tobytes())
            offset_file.write((vertices + np.cumsum(sizes)).astype(np.int64).tobytes())
            id_file.write(np.arange(count + 1, count + 1 + len(rings), dtype=np.int64).tobytes())
            box_file.write(boxes.tobytes())
            count += len(rings)
            vertices += int(sizes.sum())
    finally:
        for f in files:
            f.close()
    return count


def _spilled(parts: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    def mapped(name: str, dtype, shape=(-1,)) -> np.ndarray:
        path = parts / name
        if path.stat().st_size == 0:
            return np.zeros((0, *shape[1:]), dtype)
        return np.memmap(path, dtype=dtype, mode="r").reshape(shape)

    return (
        mapped(_SPILL[0], np.float32, (-1, 2)),
        mapped(_SPILL[1], np.int64),
        mapped(_SPILL[2], np.int64),
        mapped(_SPILL[3], np.float32, (-1, 4)),
    )


def _level_tiles(parts: Path, shape_hw: tuple[int, int], scale: float) -> Iterator[np.ndarray]:
    """The tiles of one level (``scale``: level px per model px), band by band, each ``TILE`` x ``TILE`` uint32."""
    from pysynth.synth.raster import rasterize_polygons

    xy, offsets, ids, boxes = _spilled(parts)
    h, w = shape_hw
    columns = math.ceil(w / TILE)
    for top in range(0, h, TILE):
        band = np.zeros((TILE, columns * TILE), np.int32)
        y0, y1 = top / scale, (top + TILE) / scale  # the band in model px
        picked = np.flatnonzero((boxes[:, 3] >= y0) & (boxes[:, 1] <= y1)) if len(boxes) else np.zeros(0, int)
        if len(picked):
            starts, ends = offsets[picked], offsets[picked + 1]
            rings = [np.asarray(xy[a:b], np.float64) for a, b in zip(starts, ends, strict=True)]
            lengths = np.array([len(r) for r in rings], np.int64)
            points = np.concatenate(rings) * scale - (0.0, top)
            rasterize_polygons(
                points, np.concatenate([[0], np.cumsum(lengths)]), band.shape, np.asarray(ids[picked], np.int64),
                labels=band,
            )  # fmt: skip
        for left in range(0, columns * TILE, TILE):
            yield band[:, left : left + TILE].astype(np.uint32)


def write_labels(slide_dir: Path, reader: SlideReader, regions: list[Region], parts: Path, mpp: float) -> Path:
    """Write ``labels.ome.tif`` of a slide from its saved regions (before they are removed); returns its path."""
    import tifffile

    f = mpp / reader.mpp
    spill_polygons(regions, parts, f)
    h, w = slide_extent(reader, mpp)
    levels = [(h, w)]
    while max(levels[-1]) > TILE:
        lh, lw = levels[-1]
        levels.append((max(1, math.ceil(lh / 2)), max(1, math.ceil(lw / 2))))
    per_cm = 1e4 / mpp
    metadata = {
        "axes": "YX",
        "Name": f"{Path(str(reader.name)).name} nuclei",
        "PhysicalSizeX": mpp,
        "PhysicalSizeXUnit": "µm",
        "PhysicalSizeY": mpp,
        "PhysicalSizeYUnit": "µm",
    }
    path = slide_dir / LABELS
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=True, ome=True) as tif:
        for k, shape in enumerate(levels):
            options = {
                "shape": shape,
                "dtype": np.uint32,
                "tile": (TILE, TILE),
                "compression": "zlib",
                "resolution": (per_cm / 2**k, per_cm / 2**k),
                "resolutionunit": "CENTIMETER",
            }
            if k == 0:
                options.update(subifds=len(levels) - 1, metadata=metadata)
            else:
                options.update(subfiletype=1, metadata=None)
            tif.write(_level_tiles(parts, shape, 1.0 / 2**k), **options)
    for name in _SPILL:
        (parts / name).unlink(missing_ok=True)
    return path

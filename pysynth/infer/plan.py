"""Stage "plan": the regions of a slide that hold tissue, and the window of context each is read with."""

from __future__ import annotations

import math
from dataclasses import dataclass

from pysynth.io import SlideReader
from pysynth.io.tissue import TissueMask

from .config import InferConfig


@dataclass(frozen=True)
class Region:
    """One region: its core in model pixels (``x``, ``y``, ``w``, ``h``) and its index in the slide's grid."""

    index: int
    x: int
    y: int
    w: int
    h: int


def slide_extent(reader: SlideReader, mpp: float) -> tuple[int, int]:
    """``(height, width)`` of the slide in pixels at ``mpp``."""
    h0, w0 = reader.level_shapes_hw[0]
    f = mpp / reader.mpp
    return max(1, math.ceil(h0 / f - 1e-9)), max(1, math.ceil(w0 / f - 1e-9))


def plan_regions(reader: SlideReader, mpp: float, config: InferConfig, tissue: TissueMask | None) -> list[Region]:
    """The regions of a slide that hold tissue, in raster order (indices count every grid cell)."""
    height, width = slide_extent(reader, mpp)
    f = mpp / reader.mpp
    regions, index = [], 0
    for y in range(0, height, config.core):
        for x in range(0, width, config.core):
            w, h = min(config.core, width - x), min(config.core, height - y)
            # The fraction comes from differences of a summed-area table: glass can come out at 1e-16, not 0.
            fraction = 1.0 if tissue is None else float(tissue.region_fraction(x * f, y * f, w * f, h * f))
            if fraction > max(config.min_tissue, 1e-6):
                regions.append(Region(index, x, y, w, h))
            index += 1
    return regions


def window_box(region: Region, margin: int, slide_hw: tuple[int, int] | None = None) -> tuple[int, int, int, int]:
    """``(x0, y0, x1, y1)`` in model px: a region's core with ``margin`` px around it, cut to ``slide_hw`` if given."""
    x0, y0 = region.x - margin, region.y - margin
    x1, y1 = region.x + region.w + margin, region.y + region.h + margin
    if slide_hw is not None:
        x0, y0, x1, y1 = max(0, x0), max(0, y0), min(slide_hw[1], x1), min(slide_hw[0], y1)
    return x0, y0, x1, y1

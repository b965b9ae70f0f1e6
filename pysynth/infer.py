"""Whole-slide inference: every nucleus of a slide, found once and whole, in bounded memory, resumable.

The slide is cut, at the model's resolution, into square *regions* (``core`` px) on a fixed grid; regions without
tissue are skipped. Each region is read with a ``margin`` of context on every side, cut at the slide's edges
(resampled from the best pyramid level by :func:`pysynth.io.read_region`), colour-normalised if asked with
statistics fitted once per slide, passed through the network in one piece (averaged over ``tta`` flips/rotations)
and turned into instances, each with its confidence; those below the minimum confidence are dropped. A nucleus
belongs to the region whose core holds its centroid: nuclei near a core's edge are seen whole thanks to the
margin, and exactly one region keeps each of them, so there are neither split nor duplicated nuclei at region
borders and no global label image is ever built.

Each finished region is written at once (atomically) to ``OUT/<stem>/.parts/``; an interrupted run continues from
the regions it has, and since a region's result depends only on the slide, the model and these settings, the
result is the same as an uninterrupted run's. When all regions are done the parts are streamed into
``nuclei.geojson`` (QuPath detections with measurements, confidences included, level-0 coordinates), ``csv/``
(one CSV of polygons per region, the format of the method's released code), ``overlay.png`` and, last,
``summary.json``, whose presence marks a finished slide. Memory is bounded by one region's working set, whatever
the slide's size.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from pysynth.errors import PysynthError
from pysynth.fsutil import atomic_write_bytes, atomic_write_text, atomic_writer
from pysynth.instances import InstanceConfig, find_instances, trace_contours
from pysynth.io import SlideReader, compute_tissue_mask, read_region, read_thumbnail
from pysynth.io.tissue import TissueMask
from pysynth.models.io import ModelInfo, model_digest
from pysynth.models.unet import UNet
from pysynth.segment import (
    CLASS_COLOURS,
    CONFIDENCE,
    DETECTION_PEAK,
    LYMPHOCYTE,
    LYMPHOCYTE_PROBABILITY,
    NUCLEUS,
    TTA_CHOICES,
    classification,
    predict_maps,
)
from pysynth.shape import MEASUREMENT_NAMES, shape_features

log = logging.getLogger(__name__)

PARTS = ".parts"
SETTINGS = "settings.json"
#: Version of the per-nucleus measurements: regions saved by a version with other measurements are not mixed in.
MEASUREMENTS_VERSION = 2
#: Least context around a region (model px). It must exceed the largest nucleus (about 15 µm, 60 px at 0.25 µm/px)
#: so the region that keeps a nucleus sees it whole, and the network's reach so its maps near a seam are those of
#: one pass. On the seam test's real region (134 nuclei, cores of 160 px, default model) margins of 128 and 96 give
#: the nuclei of one pass exactly; 64 moves 4 (IoU < 0.95) and finds one twice; 32 moves 10.
MIN_MARGIN = 128
SUMMARY = "summary.json"
GEOJSON = "nuclei.geojson"
OVERLAY = "overlay.png"
CSV_DIR = "csv"
#: Lymphocyte density of a slide (with a class output): the raw grid (nuclei per mm² of tissue, NaN off tissue)
#: and a heatmap over the thumbnail.
DENSITY_GRID = "lymphocyte_density.npy"
DENSITY_MAP = "lymphocyte_density.png"
#: Side of a cell of the lymphocyte density grid, µm (the 50 µm patches of TIL maps, doubled for counts that
#: are not mostly 0 or 1).
DENSITY_CELL_UM = 100.0

#: Reinhard target: mean and standard deviation of L*a*b* (OpenCV float scale: L 0..100) over the tissue pixels of
#: the shipped model's training sources (30 MoNuSeg tiles and 8 tiles of the bundled slide).
REFERENCE_LAB = ((47.938, 27.130, -12.276), (19.987, 10.486, 8.579))

#: Macenko target: stain vectors (columns H, E, in optical density) and the 99th percentile of their concentrations
#: (the reference values of Macenko et al.'s widely used implementation).
REFERENCE_HE = np.array([[0.5626, 0.2159], [0.7201, 0.8012], [0.4062, 0.5581]], np.float64)
REFERENCE_MAX_C = np.array([1.9705, 1.0308], np.float64)


@dataclass(frozen=True)
class InferConfig:
    """How a slide is cut up and processed (part of a run's identity: a change restarts unfinished slides).

    Attributes:
        core: Side of the regions that own nuclei, in pixels at the model's resolution.
        margin: Context read around each region's core, in pixels at the model's resolution (cut at the slide's
            edges: the network sees no made-up pixels beyond the slide, as ``segment`` sees none beyond an image).
            It must exceed the largest nucleus' radius (nuclei are owned by their centroid) and be wide enough that
            the network's output near the core's edge does not depend on what lies beyond the margin.
        normalise: ``"none"`` (default), ``"reinhard"`` (L*a*b* mean and deviation of the slide's tissue to the
            model's training tissue) or ``"macenko"`` (stain vectors and the 99th percentile of stain
            concentrations to the usual reference). On the 13 labelled dev tiles (DICE avg / AJI / PQ) Reinhard
            gives 0.683 / 0.521 / 0.475, Macenko 0.691 / 0.533 / 0.491, none 0.685 / 0.525 / 0.482: differences at
            the noise level; on held-out real tissue Reinhard lowered accuracy, so none is the default. Macenko
            washes out slides with many dark nuclei (their 99th percentile of haematoxylin is scaled down): on the
            bundled dermis slide it lost a third of the nuclei.
        tile: 0 (default): the network sees each window in one pass. Otherwise the window is cut into near-equal
            cores of about this side, each passed with ``tile_context`` px of the window around it and kept on its
            core only (:func:`pysynth.segment.core_splits`): with the default context the maps are those of one
            pass bit for bit (the shipped networks reach 128 px), so nuclei do not change, only the activations'
            cache footprint and memory.
        tile_context: Context of those tiles (a multiple of 16; 128 is exact for the shipped models, 96 moved
            the maps by < 0.01 on real tissue, 64 changed 6 of 643 nuclei).
        tta: Flips/rotations of each window averaged by the network stage (1, 2, 4 or 8; ``tta`` times its cost).
        min_confidence: Nuclei whose confidence (mean segmentation probability over their pixels) is below this
            are dropped; ``None``: the model's own ``instances.min_confidence``.
        precision: Network arithmetic: ``"fp32"``, ``"bf16"`` or ``"fp16"`` (GPU).
        lymphocyte_threshold: With a class output, nuclei whose lymphocyte probability is at least this are
            classified ``Lymphocyte``; ``None``: the model's own (``classes.lymphocyte_threshold`` of its card).
        compile: Run the network through ``torch.compile`` (one compilation per window shape, about 8-12 s each on
            this project's 2-core CPU; falls back to eager with a warning where it cannot compile). On that CPU a
            2,304² pass alone ran 1.21× faster (5.15 against 4.25 Mpx/s), but end to end on a 50 Mpx bench slide
            (24 regions, four window shapes) compiling cost more than it saved (32-50 s against 26-28 s eager): it
            can pay only on slides of about a gigapixel and more. Maps differ from eager by float rounding (< 1e-5;
            the same nuclei on that slide).
        min_tissue: A region is processed when the tissue fraction of its core exceeds this.
        overlay_mpp: Resolution of ``overlay.png`` (coarsened further for slides above 8,000 px at it).
    """

    core: int = 2048
    margin: int = 128
    tile: int = 0
    tile_context: int = 128
    normalise: str = "none"
    tta: int = 1
    min_confidence: float | None = None
    precision: str = "fp32"
    lymphocyte_threshold: float | None = None
    compile: bool = False
    min_tissue: float = 0.0
    overlay_mpp: float = 2.0

    def __post_init__(self) -> None:
        if self.core < 64:
            raise ValueError(f"core must be at least 64 px, got {self.core}")
        if self.margin < MIN_MARGIN:
            raise ValueError(
                f"margin must be at least {MIN_MARGIN} px (smaller margins cut, move or duplicate nuclei on region "
                f"seams), got {self.margin}"
            )
        if self.tile and (self.tile < 256 or self.tile % 16):
            raise ValueError(f"tile must be 0 (one pass) or a multiple of 16 of at least 256 px, got {self.tile}")
        if self.tile_context < 0 or self.tile_context % 16:
            raise ValueError(f"tile_context must be a non-negative multiple of 16, got {self.tile_context}")
        if self.normalise not in ("reinhard", "macenko", "none"):
            raise ValueError(f"normalise must be reinhard, macenko or none, got {self.normalise!r}")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"precision must be fp32, bf16 or fp16, got {self.precision!r}")
        if self.tta not in TTA_CHOICES:
            raise ValueError(f"tta must be one of {', '.join(map(str, TTA_CHOICES))}, got {self.tta!r}")
        if self.lymphocyte_threshold is not None and not 0.0 <= self.lymphocyte_threshold <= 1.0:
            raise ValueError(f"lymphocyte_threshold must be in [0, 1], got {self.lymphocyte_threshold}")
        if self.min_confidence is not None and not 0.0 <= self.min_confidence <= 1.0:
            raise ValueError(f"min_confidence must be in [0, 1], got {self.min_confidence}")

    def instances(self, model: InstanceConfig) -> InstanceConfig:
        """The post-processing a run uses: the model's, with ``min_confidence`` replaced when one is given."""
        if self.min_confidence is None:
            return model
        return replace(model, min_confidence=self.min_confidence)


# --- colour normalisation ---------------------------------------------------------------------------------------


def _tissue_pixels(rgb: np.ndarray) -> np.ndarray:
    od = -np.log((rgb.reshape(-1, 3).astype(np.float32) + 1.0) / 256.0)
    return od.sum(axis=1) > 0.3


@dataclass(frozen=True)
class ColourModel:
    """A per-slide colour normalisation, fitted once on tissue and applied to every region."""

    method: str
    params: dict[str, list[float] | list[list[float]]] = field(default_factory=dict)

    def transform(self, rgb: np.ndarray) -> np.ndarray:
        """The normalisation computed pixel by pixel (the specification of :meth:`apply`)."""
        if self.method == "none":
            return rgb
        if self.method == "reinhard":
            mean, std = np.array(self.params["mean"], np.float32), np.array(self.params["std"], np.float32)
            t_mean, t_std = (np.array(v, np.float32) for v in REFERENCE_LAB)
            lab = cv2.cvtColor(rgb.astype(np.float32) * (1 / 255), cv2.COLOR_RGB2LAB)
            lab = (lab - mean) * (t_std / np.maximum(std, 1e-3)) + t_mean
            out = cv2.cvtColor(lab, cv2.COLOR_LAB2RGB)
            return np.clip(out * 255 + 0.5, 0, 255).astype(np.uint8)
        he, max_c = np.array(self.params["he"]), np.array(self.params["max_c"])
        shape = rgb.shape
        od = -np.log((rgb.reshape(-1, 3).astype(np.float64) + 1.0) / 256.0)
        conc = (np.linalg.pinv(he) @ od.T) * (REFERENCE_MAX_C / np.maximum(max_c, 1e-6))[:, None]
        out = 256.0 * np.exp(-REFERENCE_HE @ conc) - 1.0
        return np.clip(out.T.reshape(shape) + 0.5, 0, 255).astype(np.uint8)

    def lut(self) -> np.ndarray:
        """The normalisation of every 24-bit colour as packed RGBx ``uint32`` (64 MB), built once in 1 Mpx pieces."""
        cached = self.__dict__.get("_lut")
        if cached is None:
            table = np.zeros((1 << 24, 4), np.uint8)
            codes = np.arange(1 << 20, dtype=np.uint32)
            for start in range(0, 1 << 24, 1 << 20):
                c = codes + start
                rgb = np.stack([(c >> 16) & 255, (c >> 8) & 255, c & 255], axis=1).astype(np.uint8)
                table[start : start + (1 << 20), :3] = self.transform(rgb[None])[0]
            cached = table.view(np.uint32).ravel()
            self.__dict__["_lut"] = cached
        return cached

    def apply(self, rgb: np.ndarray, *, lookup: bool = True) -> np.ndarray:
        """The region in the reference's colours (uint8 RGB).

        With ``lookup`` a table of all 2**24 colours (:meth:`lut`, about 2 s to build for Reinhard) replaces the
        per-pixel arithmetic: identical output, 3-10× faster per region; worth it from a few regions on.
        """
        if self.method == "none":
            return rgb
        if not lookup:
            return self.transform(rgb)
        h, w = rgb.shape[:2]
        padded = np.zeros((h, w, 4), np.uint8)
        padded[..., 1:] = rgb
        index = padded.view(">u4")[..., 0]  # 0x00RRGGBB
        return np.take(self.lut(), index).view(np.uint8).reshape(h, w, 4)[..., :3]


def fit_colour(samples: list[np.ndarray], method: str) -> ColourModel:
    """Fit a normalisation on tissue pixels of sample regions (RGB uint8 at any size).

    Falls back to ``"none"`` when the samples hold too little tissue to fit on (a logged note, not an error).
    """
    if method == "none":
        return ColourModel("none")
    pixels = [s.reshape(-1, 3)[_tissue_pixels(s)] for s in samples]
    pixels = np.concatenate(pixels) if pixels else np.zeros((0, 3), np.uint8)
    if len(pixels) < 1000:
        log.info("too little tissue to fit %s normalisation on; colours left as they are", method)
        return ColourModel("none")
    if method == "reinhard":
        lab = cv2.cvtColor(pixels[None].astype(np.float32) * (1 / 255), cv2.COLOR_RGB2LAB)[0]
        return ColourModel("reinhard", {"mean": lab.mean(0).tolist(), "std": lab.std(0).tolist()})
    # Macenko et al. 2009: the plane of the two largest principal directions of tissue OD, the extreme angles
    # (1st and 99th percentile) as the stain vectors, haematoxylin first.
    od = -np.log((pixels.astype(np.float64) + 1.0) / 256.0)
    od = od[(od > 0.15).all(axis=1)]
    if len(od) < 1000:
        return ColourModel("none")
    _, vectors = np.linalg.eigh(np.cov(od.T))
    plane = vectors[:, 1:3]
    proj = od @ plane
    phi = np.arctan2(proj[:, 1], proj[:, 0])
    lo, hi = np.percentile(phi, [1, 99])
    v1 = plane @ np.array([np.cos(lo), np.sin(lo)])
    v2 = plane @ np.array([np.cos(hi), np.sin(hi)])
    he = np.array([v1, v2]).T if v1[0] > v2[0] else np.array([v2, v1]).T
    he = he * np.sign(he.sum(axis=0, keepdims=True))
    conc = np.linalg.lstsq(he, od.T, rcond=None)[0]
    max_c = np.percentile(conc, 99, axis=1)
    return ColourModel("macenko", {"he": he.tolist(), "max_c": max_c.tolist()})


# --- regions ------------------------------------------------------------------------------------------------------


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


@dataclass
class Timings:
    """Seconds per stage of one slide.

    ``prepare`` (tissue mask, colour fit) runs once per slide; the others are summed over regions and overlap:
    reading and post-processing run in threads beside the network.
    """

    prepare: float = 0.0
    read: float = 0.0
    normalise: float = 0.0
    network: float = 0.0
    post: float = 0.0
    write: float = 0.0


def window_box(region: Region, margin: int, slide_hw: tuple[int, int] | None = None) -> tuple[int, int, int, int]:
    """``(x0, y0, x1, y1)`` in model px: a region's core with ``margin`` px around it, cut to ``slide_hw`` if given."""
    x0, y0 = region.x - margin, region.y - margin
    x1, y1 = region.x + region.w + margin, region.y + region.h + margin
    if slide_hw is not None:
        x0, y0, x1, y1 = max(0, x0), max(0, y0), min(slide_hw[1], x1), min(slide_hw[0], y1)
    return x0, y0, x1, y1


def read_window(
    reader: SlideReader, region: Region, mpp: float, margin: int, slide_hw: tuple[int, int] | None = None
) -> np.ndarray:
    """A region's core with ``margin`` px of context on every side, at ``mpp``.

    With ``slide_hw`` (the slide's extent at ``mpp``) the window stops at the slide's edges (what ``infer``
    reads); without, it keeps its full size and what lies outside the slide is white.
    """
    f = mpp / reader.mpp
    x0, y0, x1, y1 = window_box(region, margin, slide_hw)
    return read_region(reader, x0 * f, y0 * f, (y1 - y0, x1 - x0), mpp)


def _ring_ok(ring: np.ndarray) -> np.ndarray:
    """A simple (valid) polygon ring for QuPath.

    The exact pixel-edge outline (its area is the nucleus' pixel count, and touching nuclei share edges without
    overlapping), repaired by shapely where the outline touches itself at a corner. Outlines are not simplified:
    simplifying each nucleus on its own lets touching neighbours overlap.
    """
    import shapely

    if len(ring) < 3:
        return np.zeros((0, 2))
    poly = shapely.Polygon(ring)
    if poly.is_valid:
        return ring.astype(np.float64)
    fixed = shapely.make_valid(poly)
    polys = [g for g in getattr(fixed, "geoms", [fixed]) if g.geom_type == "Polygon" and not g.is_empty]
    if not polys:
        return np.zeros((0, 2))
    return np.asarray(max(polys, key=lambda g: g.area).exterior.coords)[:-1]


def region_nuclei(
    original: np.ndarray,
    det: np.ndarray,
    seg: np.ndarray,
    region: Region,
    origin: tuple[int, int],
    instances: InstanceConfig,
    mpp: float,
    level0_per_px: float,
    slide_hw: tuple[int, int],
    lymphocyte: np.ndarray | None = None,
) -> list[dict[str, Any]]:
    """The nuclei a region owns, with polygons in level-0 coordinates and measurements.

    The polygons are the exact pixel-edge outlines; the perimeter and the shape features are measured on the
    window's labels by :func:`pysynth.shape.shape_features` (perimeter on a sub-pixel outline).

    Args:
        original: The window as read (measurements use the slide's own colours, not the normalised ones).
        det: Detection probability map of the window.
        seg: Segmentation probability map of the window.
        region: The region.
        origin: ``(x, y)`` of the window's top left corner in slide px at the model's resolution.
        instances: Post-processing settings (``min_confidence`` included).
        mpp: The model's µm/px.
        level0_per_px: Level-0 pixels per model pixel.
        slide_hw: The slide's extent in model pixels (nuclei beyond it are dropped).
        lymphocyte: The class output's lymphocyte probability map of the window (None: no class output); each
            nucleus then has its mean as ``lymphocyte``.
    """
    from pysynth.synth.deconv import rgb_to_hed

    found = find_instances(det, seg, instances)
    if lymphocyte is not None:
        found = found.with_classes(lymphocyte)
    labels = found.labels
    n = found.count
    if n == 0:
        return []
    # Statistics over nucleus pixels only (a fraction of the window).
    where = np.flatnonzero(labels)
    ids = labels.ravel()[where]
    rows, cols = np.divmod(where, labels.shape[1])
    counts = np.bincount(ids, minlength=n + 1).astype(np.float64)
    cy = np.bincount(ids, weights=rows, minlength=n + 1) / np.maximum(counts, 1) + 0.5
    cx = np.bincount(ids, weights=cols, minlength=n + 1) / np.maximum(counts, 1) + 0.5
    hema = rgb_to_hed(original.reshape(-1, 3)[where][None])[0, :, 0]
    mean_h = np.bincount(ids, weights=hema, minlength=n + 1) / np.maximum(counts, 1)
    # Centroids in slide model pixels; a nucleus is this region's when its centroid lies in the core.
    gx, gy = cx + origin[0], cy + origin[1]
    owned = (
        (gx >= region.x) & (gx < region.x + region.w) & (gy >= region.y) & (gy < region.y + region.h)
        & (gx < slide_hw[1]) & (gy < slide_hw[0])
    )  # fmt: skip
    owned[0] = False
    rings = trace_contours(labels)
    shape = shape_features(labels, mpp, only=np.flatnonzero(owned))  # perimeter on a sub-pixel outline
    out = []
    f = level0_per_px
    for k in np.flatnonzero(owned):
        ring = _ring_ok(rings[k - 1])
        if len(ring) < 3:
            continue
        poly = (ring + np.array(origin)) * f
        out.append(
            {
                "polygon": np.round(poly, 2).tolist(),
                "area_px": int(counts[k]),
                "area_um2": round(float(counts[k]) * mpp * mpp, 3),
                "perimeter_um": round(float(shape.perimeter_um[k]), 3),
                "circularity": round(float(shape.circularity[k]), 4),
                "solidity": round(float(shape.solidity[k]), 4),
                "eccentricity": round(float(shape.eccentricity[k]), 4),
                "major_axis_um": round(float(shape.major_axis_um[k]), 3),
                "minor_axis_um": round(float(shape.minor_axis_um[k]), 3),
                "orientation_deg": round(float(shape.orientation_deg[k]), 2),
                "centroid": [round(float(gx[k] * f), 2), round(float(gy[k] * f), 2)],
                "hematoxylin": round(float(mean_h[k]), 4),
                "confidence": round(float(found.confidence[k]), 4),
                "detection_peak": round(float(found.detection_peak[k]), 4),
                **({} if found.lymphocyte is None else {"lymphocyte": round(float(found.lymphocyte[k]), 4)}),
            }
        )
    return out


# --- one slide ----------------------------------------------------------------------------------------------------


_COMPILED: dict[int, Any] = {}


def compiled(model: UNet) -> Any:
    """``torch.compile`` of ``model`` (static shapes), made once per model object and kept for later slides."""
    key = id(model)
    if key not in _COMPILED:
        _COMPILED.clear()  # one model at a time: an earlier one's compiled graphs are not kept alive
        _COMPILED[key] = torch.compile(model, dynamic=False)
    return _COMPILED[key]


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of returning it to the system (idempotent).

    The network allocates and frees tens of activations of ~170 MB per 2,304² window; by default glibc maps each
    one fresh (``mmap``) and unmaps it on free, so every layer pays page faults on hundreds of MB. Serving them
    from the heap and never trimming it made the network 1.3-1.9× faster per window on this project's CPU machine
    (2.3 and 1.9 against 1.5 Mpx/s, best of 3) for a peak RSS higher by 0.3-0.7 GB. A no-op (False) where the C
    library is not glibc.
    """
    import ctypes
    import ctypes.util
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4  # glibc's mallopt parameters
        return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 1 << 40))
    except (OSError, AttributeError):
        return False


def _colour_samples(reader: SlideReader, tissue: TissueMask, mpp: float, n: int = 16, size: int = 384):
    """Up to ``n`` windows at ``mpp`` centred on tissue, at fixed positions (deterministic)."""
    where = np.flatnonzero(tissue.mask)
    if len(where) == 0:
        return []
    picks = where[np.linspace(0, len(where) - 1, num=min(n, len(where))).astype(int)]
    f = mpp / reader.mpp
    out = []
    for i in picks:
        y, x = divmod(int(i), tissue.mask.shape[1])
        cx, cy = (x + 0.5) * tissue.scale, (y + 0.5) * tissue.scale
        out.append(read_region(reader, cx - size / 2 * f, cy - size / 2 * f, (size, size), mpp))
    return out


def _csv_text(nuclei: list[dict[str, Any]], mpp: float) -> str:
    lines = ["AreaInPixels,PhysicalSize,Polygon"]
    for nuc in nuclei:
        coords = ":".join(f"{x:.2f}:{y:.2f}" for x, y in nuc["polygon"])
        lines.append(f"{nuc['area_px']},{nuc['area_um2']},[{coords}]")
    return "\n".join(lines) + "\n"


def _feature(nuc: dict[str, Any], ident: int, lymphocyte_threshold: float | None = None) -> dict[str, Any]:
    """One nucleus as a QuPath detection; with a class output (``lymphocyte`` in ``nuc``) classified by threshold."""
    ring = [*nuc["polygon"], nuc["polygon"][0]]
    classes = "lymphocyte" in nuc and lymphocyte_threshold is not None
    extra = {LYMPHOCYTE_PROBABILITY: nuc["lymphocyte"]} if classes else {}
    kind = LYMPHOCYTE if classes and nuc["lymphocyte"] >= lymphocyte_threshold else NUCLEUS
    return {
        "type": "Feature",
        "id": ident,
        "geometry": {"type": "Polygon", "coordinates": [ring]},
        "properties": {
            "objectType": "detection",
            "classification": classification(kind) if classes else {"name": NUCLEUS},
            "measurements": {
                # Area, perimeter and the shape features (parts written before the latter existed lack them).
                **{name: nuc[key] for key, name in MEASUREMENT_NAMES.items() if key in nuc},
                "Centroid X px": nuc["centroid"][0],
                "Centroid Y px": nuc["centroid"][1],
                "Hematoxylin OD mean": nuc["hematoxylin"],
                CONFIDENCE: nuc["confidence"],
                DETECTION_PEAK: nuc["detection_peak"],
                **extra,
            },
        },
    }


def _write_outputs(
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
            atomic_write_text(csv_dir / name, _csv_text(nuclei, mpp))
            polys: dict[str, list[np.ndarray]] = {NUCLEUS: [], LYMPHOCYTE: []}
            for nuc in nuclei:
                count += 1
                feature = _feature(nuc, count, lymphocyte_threshold)
                out.write(("," if count > 1 else "") + json.dumps(feature, separators=(",", ":")))
                kind = feature["properties"]["classification"]["name"]
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


@dataclass
class SlideResult:
    """What one slide gave (also the content of its ``summary.json``)."""

    slide: str
    nuclei: int
    regions: int
    tissue_mm2: float
    pixels: float
    seconds: float
    timings: dict[str, float]
    skipped: bool = False
    resumed_regions: int = 0
    processed_pixels: float = 0.0
    lymphocytes: int | None = None


def infer_slide(
    reader: SlideReader,
    model: UNet,
    info: ModelInfo,
    slide_dir: Path,
    *,
    config: InferConfig,
    model_id: str,
    overwrite: bool = False,
    progress: Callable[[int, int, int], None] | None = None,
    stop: Callable[[], bool] | None = None,
) -> SlideResult:
    """Segment every nucleus of one slide into ``slide_dir`` (resuming what an earlier run left).

    Args:
        reader: The open slide.
        model: The network, on its device, in eval mode.
        info: Its description (resolution, post-processing).
        slide_dir: ``OUT/<stem>``.
        config: Region and normalisation settings.
        model_id: :func:`model_digest` of the model folder.
        overwrite: Start afresh even when the folder holds a finished or unfinished run.
        progress: Called as ``progress(done_regions, total_regions, nuclei_so_far)``.
        stop: Polled between regions; when it returns True the run stops after saving the current region and
            raises :class:`KeyboardInterrupt`.

    Returns:
        The slide's :class:`SlideResult`; ``skipped`` when ``summary.json`` showed it finished.
    """
    from pysynth import __version__

    keep_freed_memory()
    slide_dir.mkdir(parents=True, exist_ok=True)
    instances = config.instances(info.instances)
    settings = {
        "slide": Path(str(reader.name)).name,
        "model": model_id,
        "config": asdict(config),
        "instances": asdict(instances),
        "slide_mpp": reader.mpp,
        "level0_hw": list(reader.level_shapes_hw[0]),
        "measurements": MEASUREMENTS_VERSION,
    }
    classes = info.has_classes
    if config.lymphocyte_threshold is not None and not classes:
        raise PysynthError("--lymphocyte-threshold needs a model with a class output (lymphocytes); this one has none")
    lymphocyte_threshold = (
        info.lymphocyte_threshold if config.lymphocyte_threshold is None else config.lymphocyte_threshold
    )
    if classes:  # only for a model with a class output
        settings["lymphocyte_threshold"] = lymphocyte_threshold
    summary_path = slide_dir / SUMMARY
    parts = slide_dir / PARTS
    if overwrite:
        summary_path.unlink(missing_ok=True)
        shutil.rmtree(parts, ignore_errors=True)
    if summary_path.exists():
        from pysynth.ledger import SettingsMismatch, settings_diff

        try:
            old = json.loads(summary_path.read_text())
        except (OSError, ValueError) as exc:
            raise SettingsMismatch(
                f"{summary_path}: unreadable ({exc}); its results are kept as they are: use --overwrite to redo "
                "the slide"
            ) from None
        if not isinstance(old, dict):
            old = {}
        if old.get("settings") == settings:
            return SlideResult(
                str(reader.name),
                int(old.get("nuclei", 0)),
                0,
                0.0,
                0.0,
                0.0,
                {},
                skipped=True,
                lymphocytes=old.get("lymphocytes"),
            )
        changed = settings_diff(old.get("settings") or {}, settings)
        raise SettingsMismatch(
            f"{slide_dir}: holds results made with other settings ({'; '.join(changed) or 'unreadable record'}); "
            "kept as they are: use --overwrite to redo them, or another --out"
        )
    settings_path = parts / SETTINGS
    if parts.exists():
        try:
            old_settings = json.loads(settings_path.read_text())
        except (OSError, ValueError):
            old_settings = None
        if old_settings != settings:  # an unfinished run with other settings: its regions cannot be reused
            finished = len(list(parts.glob("0*.json")))
            if finished:
                why = "its settings are unreadable" if old_settings is None else "it had other settings"
                log.warning("%s: redoing the %d finished region(s) of an unfinished run (%s)", slide_dir, finished, why)
            shutil.rmtree(parts)
    parts.mkdir(exist_ok=True)
    atomic_write_text(settings_path, json.dumps(settings))

    started = time.perf_counter()
    timings = Timings()
    mpp = info.mpp
    f = mpp / reader.mpp
    slide_hw = slide_extent(reader, mpp)
    t = time.perf_counter()
    tissue = compute_tissue_mask(reader)
    colour = fit_colour(_colour_samples(reader, tissue, mpp), config.normalise)
    timings.prepare += time.perf_counter() - t
    regions = plan_regions(reader, mpp, config, tissue)
    todo = [r for r in regions if not (parts / f"{r.index:06d}.json").exists()]
    boxes = {r.index: window_box(r, config.margin, slide_hw) for r in todo}
    window_px = sum((x1 - x0) * (y1 - y0) for x0, y0, x1, y1 in boxes.values())
    lookup = window_px > 20e6  # the colour table pays for itself from about four default regions
    resumed = len(regions) - len(todo)
    nuclei_so_far = 0
    if progress is not None:
        progress(resumed, len(regions), nuclei_so_far)
    device = next(model.parameters()).device
    net = compiled(model) if config.compile else model

    def load(region: Region) -> tuple[np.ndarray, np.ndarray, float, float]:
        t0 = time.perf_counter()
        window = read_window(reader, region, mpp, config.margin, slide_hw)
        t1 = time.perf_counter()
        normalised = colour.apply(window, lookup=lookup)
        return window, normalised, t1 - t0, time.perf_counter() - t1

    def finish(region: Region, window: np.ndarray, maps: tuple[np.ndarray, ...]) -> tuple[int, float, float]:
        t0 = time.perf_counter()
        origin = boxes[region.index][:2]
        lymphocyte = maps[2] if classes else None
        nuclei = region_nuclei(window, maps[0], maps[1], region, origin, instances, mpp, f, slide_hw, lymphocyte)
        t1 = time.perf_counter()
        record = {"region": asdict(region), "nuclei": nuclei}
        atomic_write_text(parts / f"{region.index:06d}.json", json.dumps(record, separators=(",", ":")))
        return len(nuclei), t1 - t0, time.perf_counter() - t1

    def run_network(network: Any, normalised: np.ndarray) -> tuple[np.ndarray, ...]:
        side = config.tile or max(normalised.shape[:2])
        return predict_maps(
            network,
            normalised,
            tile=side,
            context=config.tile_context,
            precision=config.precision,
            tta=config.tta,
            classes=classes,
        )

    done = resumed

    def collect(post: Future) -> None:
        """Account for one finished region."""
        nonlocal done, nuclei_so_far
        n, t_post, t_write = post.result()
        timings.post += t_post
        timings.write += t_write
        nuclei_so_far += n
        done += 1
        if progress is not None:
            progress(done, len(regions), nuclei_so_far)

    # Pipelined: the next window is read and normalised, and the previous one post-processed and written, while
    # the network runs on the current one.
    interrupted = False
    with ThreadPoolExecutor(1) as reader_pool, ThreadPoolExecutor(1) as post_pool:
        pending_read = reader_pool.submit(load, todo[0]) if todo else None
        pending_post = None
        for i, region in enumerate(todo):
            assert pending_read is not None
            window, normalised, t_read, t_norm = pending_read.result()
            timings.read += t_read
            timings.normalise += t_norm
            pending_read = reader_pool.submit(load, todo[i + 1]) if i + 1 < len(todo) else None
            t0 = time.perf_counter()
            try:
                maps = run_network(net, normalised)
            except Exception as exc:  # torch.compile's backends raise many types (no compiler, unsupported op)
                if net is model:
                    raise
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
                log.warning("torch.compile failed (%s); the network runs eagerly", first)
                net = model
                maps = run_network(net, normalised)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            timings.network += time.perf_counter() - t0
            if pending_post is not None:
                collect(pending_post)
            pending_post = post_pool.submit(finish, region, window, maps)
            if stop is not None and stop():
                interrupted = True
                break
        if pending_post is not None:
            collect(pending_post)
        if pending_read is not None:
            pending_read.cancel()
    if interrupted:
        raise KeyboardInterrupt

    threshold = lymphocyte_threshold if classes else None
    count, t_write, class_summary = _write_outputs(slide_dir, reader, regions, parts, mpp, config, threshold, tissue)
    timings.write += t_write
    seconds = time.perf_counter() - started
    pixels = float(sum(r.w * r.h for r in regions))
    pixels_now = float(sum(r.w * r.h for r in todo))  # a resumed run's rate counts only what it processed
    import platform

    result = SlideResult(
        slide=str(reader.name),
        nuclei=count,
        regions=len(regions),
        tissue_mm2=round(tissue.area_um2() / 1e6, 4),
        pixels=pixels,
        seconds=round(seconds, 2),
        timings={k: round(v, 3) for k, v in asdict(timings).items()},
        resumed_regions=resumed,
        processed_pixels=pixels_now,
        lymphocytes=class_summary.get("lymphocytes"),
    )
    summary = {
        **asdict(result),
        "settings": settings,
        "mpp": mpp,
        "slide_mpp": reader.mpp,
        "mpp_source": reader.mpp_source,
        "colour": asdict(colour),
        "megapixels_per_s": round(pixels_now / max(seconds, 1e-9) / 1e6, 3),
        "versions": {
            "pysynth": __version__,
            "torch": torch.__version__,
            "numpy": np.__version__,
            "opencv": cv2.__version__,
            "python": platform.python_version(),
        },
        "device": str(device),
        **class_summary,
    }
    atomic_write_text(summary_path, json.dumps(summary, indent=1))
    shutil.rmtree(parts, ignore_errors=True)
    return result


def iter_features(geojson_path: Path) -> Iterator[dict[str, Any]]:
    """The features of a ``nuclei.geojson`` (loads the file; for tests and small slides)."""
    yield from json.loads(Path(geojson_path).read_text())["features"]


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


def run_slide(
    path: str,
    out_dir: str,
    *,
    model_dir: str | None,
    input_mpp: float | None,
    device: str,
    config: InferConfig,
    overwrite: bool,
    threads: int = 0,
    stem: str | None = None,
    progress: Callable[[int, int, int], None] | None = None,
    stop: Callable[[], bool] | None = None,
) -> dict[str, Any]:
    """Infer one slide from its path: the command line's unit of work, here, in a worker process or on Dask.

    A problem with the slide or its outputs (unreadable, no resolution, other settings in its folder, disk full)
    becomes a ``"failed"`` record with a one-line ``error``, so the other slides go on; ``progress`` and ``stop``
    are passed to :func:`infer_slide` (a stop raises :class:`KeyboardInterrupt`).

    Returns a JSON-able record: ``status`` ``"done"``, ``"skipped"``, ``"refused"`` (the slide's folder holds
    results made with other settings, kept as they are) or ``"failed"`` (both with ``error``), and the
    :class:`SlideResult` fields.
    """
    from pysynth.errors import SlideError
    from pysynth.io import open_slide
    from pysynth.ledger import SettingsMismatch
    from pysynth.models.io import resolve_model_dir
    from pysynth.segment import resolve_device

    if threads:
        torch.set_num_threads(threads)
    folder = resolve_model_dir(model_dir)
    model, info = inference_model(str(folder))
    model = model.to(resolve_device(device))
    stem = stem or Path(path).stem
    try:
        with open_slide(path, input_mpp) as reader:
            result = infer_slide(
                reader, model, info, Path(out_dir) / stem, config=config, model_id=model_digest(folder),
                overwrite=overwrite, progress=progress, stop=stop,
            )  # fmt: skip
    except SlideError as exc:
        return {"slide": str(path), "status": "failed", "error": str(exc)}
    except SettingsMismatch as exc:
        return {"slide": str(path), "status": "refused", "error": f"{path}: {exc}"}
    except PysynthError as exc:
        return {"slide": str(path), "status": "failed", "error": f"{path}: {exc}"}
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        return {"slide": str(path), "status": "failed", "error": f"{path}: {where}{exc.strerror or exc}"}
    except Exception as exc:  # anything else (out of GPU memory, an OpenCV error, a bug) fails this slide alone
        log.debug("%s: failed", path, exc_info=True)
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        kind = type(exc).__qualname__
        if type(exc).__module__ not in ("builtins", None):
            kind = f"{type(exc).__module__.split('.')[0]}.{kind}"
        return {"slide": str(path), "status": "failed", "error": f"{path}: {kind}: {first}"}
    record = asdict(result)
    record["slide"] = str(path)
    record["status"] = "skipped" if result.skipped else "done"
    return record


_MODELS: dict[str, tuple[UNet, ModelInfo]] = {}


def inference_model(folder: str) -> tuple[UNet, ModelInfo]:
    """A model folder's network, BatchNorm folded and channels-last, and its description; loaded once per process."""
    if folder not in _MODELS:
        from pysynth.models.io import load_model
        from pysynth.models.unet import fold_batchnorm

        model, info = load_model(folder)
        _MODELS[folder] = (fold_batchnorm(model).to(memory_format=torch.channels_last), info)
    return _MODELS[folder]

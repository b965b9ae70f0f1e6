"""Stage "instances": the nuclei a region owns, from its window's maps, with outlines and measurements."""

from __future__ import annotations

from typing import Any

import numpy as np

from pysynth.dye import dye_labels
from pysynth.instances import InstanceConfig, find_instances, label_moments, trace_contours
from pysynth.qupath import valid_ring
from pysynth.shape import shape_features

from .plan import Region


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
    drop_dye: bool = True,
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
        drop_dye: Drop the objects of tissue-marking dye's colours (:mod:`pysynth.dye`).
    """
    from pysynth.table import stain_stats

    found = find_instances(det, seg, instances)
    if drop_dye:
        found = found.keep(~dye_labels(found.labels, original, found.count))
    if lymphocyte is not None:
        found = found.with_classes(lymphocyte)
    labels = found.labels
    n = found.count
    if n == 0:
        return []
    # Pixel counts and centroids in one pass over the labels (the compiled core).
    counts, sum_y, sum_x, _ = label_moments(labels)
    counts = counts.astype(np.float64)
    cy = sum_y / np.maximum(counts, 1) + 0.5
    cx = sum_x / np.maximum(counts, 1) + 0.5
    stains = stain_stats(labels, original, n)
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
        ring = valid_ring(rings[k - 1])
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
                "hematoxylin": round(float(stains["hematoxylin_od_mean"][k]), 4),
                "hematoxylin_sd": round(float(stains["hematoxylin_od_sd"][k]), 4),
                "eosin": round(float(stains["eosin_od_mean"][k]), 4),
                "eosin_sd": round(float(stains["eosin_od_sd"][k]), 4),
                "confidence": round(float(found.confidence[k]), 4),
                "detection_peak": round(float(found.detection_peak[k]), 4),
                **({} if found.lymphocyte is None else {"lymphocyte": round(float(found.lymphocyte[k]), 4)}),
            }
        )
    return out

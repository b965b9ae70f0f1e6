"""QuPath's view of a nucleus: measurement names, classifications and one detection feature, for every command.

``segment`` (image pixels) and ``infer`` (level-0 slide pixels) build their GeoJSON features here, so both carry
the same names, classifications and colours.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

#: QuPath measurement names of the per-nucleus confidences (``segment`` and ``infer`` alike).
CONFIDENCE = "Confidence"
DETECTION_PEAK = "Detection peak"
#: QuPath measurement name of the class output's per-nucleus lymphocyte probability.
LYMPHOCYTE_PROBABILITY = "Lymphocyte probability"
#: QuPath classifications: a nucleus, or a nucleus called a lymphocyte (with their display colours, RGB).
NUCLEUS, LYMPHOCYTE = "Nucleus", "Lymphocyte"
CLASS_COLOURS = {NUCLEUS: (0, 255, 0), LYMPHOCYTE: (0, 160, 255)}


def valid_ring(ring: np.ndarray) -> np.ndarray:
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


def classification(name: str) -> dict[str, Any]:
    """A QuPath ``classification`` object: its name and display colour ``[r, g, b]``, as QuPath writes them."""
    r, g, b = CLASS_COLOURS[name]
    return {"name": name, "color": [r, g, b]}


def detection(
    ident: int,
    ring: Sequence[Sequence[float]],
    *,
    kind: str | None = None,
    measurements: dict[str, float] | None = None,
    properties: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One nucleus as a QuPath detection feature.

    Args:
        ident: The feature's ``id``.
        ring: The outline's vertices ``[[x, y], ...]``, not closed (the first is repeated at the end here).
        kind: ``NUCLEUS`` or ``LYMPHOCYTE`` for a model with a class output (classification with its colour);
            ``None``: a plain ``Nucleus`` classification without colour (models without classes).
        measurements: QuPath measurements (name to number); omitted when ``None``.
        properties: Further properties, placed before the measurements.
    """
    coords = [list(p) for p in ring]
    coords.append(list(ring[0]))
    props: dict[str, Any] = {
        "objectType": "detection",
        "classification": {"name": NUCLEUS} if kind is None else classification(kind),
        **(properties or {}),
    }
    if measurements is not None:
        props["measurements"] = measurements
    geometry = {"type": "Polygon", "coordinates": [coords]}
    return {"type": "Feature", "id": ident, "geometry": geometry, "properties": props}

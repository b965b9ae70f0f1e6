"""Placing candidate nuclei in order, refusing those that overlap earlier ones too much (C++ kernel + twin)."""

from __future__ import annotations

import numpy as np

from pysynth import _core


def _check(xy: np.ndarray, offsets: np.ndarray, shape_hw: tuple[int, int], max_overlap: float):
    xy = np.ascontiguousarray(xy, dtype=np.float64)
    offsets = np.ascontiguousarray(offsets, dtype=np.int64)
    if xy.ndim != 2 or xy.shape[1] != 2:
        raise ValueError(f"xy must have shape (V, 2), got {xy.shape}")
    if offsets.ndim != 1 or len(offsets) < 1 or offsets[0] != 0 or offsets[-1] != len(xy):
        raise ValueError(f"offsets must run from 0 to len(xy) = {len(xy)}, got {offsets[:3]}...{offsets[-1:]}")
    if np.any(np.diff(offsets) < 0):
        raise ValueError("offsets must not decrease")
    if not np.isfinite(xy).all():
        raise ValueError("xy must be finite")
    h, w = (int(v) for v in shape_hw)
    if h <= 0 or w <= 0:
        raise ValueError(f"shape_hw must be positive, got {shape_hw}")
    if not 0.0 <= max_overlap <= 1.0:
        raise ValueError(f"max_overlap must be in [0, 1], got {max_overlap}")
    return xy, offsets, h, w


def place_polygons(
    xy: np.ndarray,
    offsets: np.ndarray,
    shape_hw: tuple[int, int],
    *,
    max_overlap: float = 0.15,
    min_area: int = 8,
    max_accept: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Accept candidate polygons in order into an instance label map.

    A pixel belongs to a polygon when its centre ``(j + 0.5, i + 0.5)`` is inside (even-odd rule). A candidate is
    refused when it covers fewer than ``min_area`` pixels or when more than ``max_overlap`` of its pixels are
    already taken; an accepted one gets the next label on its pixels that are still free (earlier nuclei stay
    whole, so every label is final when written).

    Args:
        xy: Vertices of all candidates, ``(V, 2)`` as ``(x, y)`` px.
        offsets: ``(K + 1,)``: candidate k has vertices ``xy[offsets[k]:offsets[k + 1]]``.
        shape_hw: Label map ``(height, width)``.
        max_overlap: Largest taken fraction of a candidate's pixels.
        min_area: Fewest pixels of an accepted candidate.
        max_accept: Stop after this many (default: no limit).

    Returns:
        ``(labels, centres)``: int32 ``(h, w)`` numbered 1..n, and float32 ``(n, 2)`` pixel centroids ``(x, y)``
        of each label's pixels (NaN for a label left without pixels, possible only with ``max_overlap = 1``).

    Raises:
        ValueError: For malformed polygons or out-of-range arguments.
    """
    xy, offsets, h, w = _check(xy, offsets, shape_hw, max_overlap)
    k = len(offsets) - 1
    limit = k if max_accept is None else max(0, int(max_accept))
    labels = np.zeros((h, w), np.int32)
    stats = np.zeros((max(1, min(k, limit)), 3), np.float64)
    n = _core.place_polygons(xy, offsets, float(max_overlap), int(min_area), limit, labels, stats)
    counts = stats[:n, 0:1]
    with np.errstate(invalid="ignore", divide="ignore"):  # a label left with no pixel has no centre (NaN)
        centres = (stats[:n, 1:3] / counts).astype(np.float32)
    return labels, centres


def place_polygons_reference(
    xy: np.ndarray,
    offsets: np.ndarray,
    shape_hw: tuple[int, int],
    *,
    max_overlap: float = 0.15,
    min_area: int = 8,
    max_accept: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The specification of :func:`place_polygons`: one whole-image point-in-polygon test per candidate."""
    xy, offsets, h, w = _check(xy, offsets, shape_hw, max_overlap)
    labels = np.zeros((h, w), np.int32)
    centres = []
    limit = len(offsets) - 1 if max_accept is None else int(max_accept)
    for k in range(len(offsets) - 1):
        if len(centres) >= limit:
            break
        poly = xy[offsets[k] : offsets[k + 1]]
        if len(poly) < 3:
            continue
        inside = _inside(poly, (h, w))
        area = int(inside.sum())
        if area < min_area or np.count_nonzero(labels[inside]) > max_overlap * area:
            continue
        new = inside & (labels == 0)
        labels[new] = len(centres) + 1
        ii, jj = np.nonzero(new)
        centres.append((jj.mean() + 0.5, ii.mean() + 0.5) if len(ii) else (np.nan, np.nan))
    return labels, np.array(centres, np.float32).reshape(-1, 2)


def _inside(poly: np.ndarray, shape_hw: tuple[int, int]) -> np.ndarray:
    """Pixels whose centres are inside a polygon, by GEOS' point-in-polygon test (shapely).

    Independent of the kernel's scanline crossings: the two agree except for a pixel centre exactly on an edge
    (GEOS counts none of the boundary; the kernel's half-open rule counts some), which random real-valued
    vertices do not produce.
    """
    import shapely

    h, w = shape_hw
    ys, xs = np.mgrid[0:h, 0:w]
    polygon = shapely.Polygon(np.asarray(poly, np.float64))
    if not polygon.is_valid:  # a self-touching outline: the region its edges enclose (even-odd, as rasterised)
        polygon = shapely.make_valid(polygon)
    return shapely.contains_xy(polygon, xs.ravel() + 0.5, ys.ravel() + 0.5).reshape(h, w)


_MASK64 = (1 << 64) - 1


def _splitmix64(state: int) -> tuple[int, int]:
    state = (state + 0x9E3779B97F4A7C15) & _MASK64
    z = state
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return state, z ^ (z >> 31)


class _Stream:
    """The per-candidate splitmix64 stream of :func:`draw_nuclei`, in Python."""

    def __init__(self, seed: int, c: int) -> None:
        self.state = (seed ^ ((c * 0xD1B54A32D192ED03) & _MASK64)) & _MASK64

    def uniform(self) -> float:
        self.state, z = _splitmix64(self.state)
        return (z >> 11) * 2.0**-53


def _polygon_reference(
    stream: _Stream,
    radius: float,
    vertices: tuple[int, int],
    irregularity: float,
    spikiness: tuple[float, float],
    smooth_rounds: int,
) -> np.ndarray:
    uniform = stream.uniform
    span = vertices[1] - vertices[0] + 1
    n = vertices[0] + min(span - 1, int(uniform() * span))
    step = 2 * np.pi / n
    delta = irregularity * step
    angles = [(step - delta) + uniform() * (2 * delta) for _ in range(n)]
    total = sum(angles)
    phase = uniform() * 2 * np.pi
    spike = spikiness[0] + uniform() * (spikiness[1] - spikiness[0])
    xy, cum = [], 0.0
    for a in angles:
        cum += a * (2 * np.pi / total)
        u1 = 1.0 - uniform()
        u2 = uniform()
        r = min(max(radius + spike * radius * np.sqrt(-2 * np.log(u1)) * np.cos(2 * np.pi * u2), 0.0), 2 * radius)
        xy.append((r * np.cos(cum + phase), r * np.sin(cum + phase)))
    poly = np.array(xy)
    for _ in range(smooth_rounds):
        nxt = np.roll(poly, -1, axis=0)
        out = np.empty((2 * len(poly), 2))
        out[0::2] = 0.75 * poly + 0.25 * nxt
        out[1::2] = 0.25 * poly + 0.75 * nxt
        poly = out
    return poly


def homography_jacobian(h: np.ndarray, x: float, y: float) -> np.ndarray:
    """Jacobian ``(2, 2)`` of the perspective map ``h`` (3×3) at ``(x, y)``."""
    den = h[2, 0] * x + h[2, 1] * y + h[2, 2]
    u = (h[0, 0] * x + h[0, 1] * y + h[0, 2]) / den
    v = (h[1, 0] * x + h[1, 1] * y + h[1, 2]) / den
    return np.array(
        [
            [(h[0, 0] - u * h[2, 0]) / den, (h[0, 1] - u * h[2, 1]) / den],
            [(h[1, 0] - v * h[2, 0]) / den, (h[1, 1] - v * h[2, 1]) / den],
        ]
    )


_SHAPE_DEFAULTS = {
    "vertices": (10, 17),
    "irregularity": 1.0,
    "spikiness": (0.04, 0.24),
    "smooth_rounds": 2,
    "radius": (8.5, 13.0),
    "size_factor": 1.0,
    "margin": 4.0,
}


def draw_nuclei(
    seed: int,
    k: int,
    tissue: np.ndarray,
    homography: np.ndarray | None = None,
    *,
    vertices: tuple[int, int] = (10, 17),
    irregularity: float = 1.0,
    spikiness: tuple[float, float] = (0.04, 0.24),
    smooth_rounds: int = 2,
    radius: tuple[float, float] = (8.5, 13.0),
    size_factor: float = 1.0,
    margin: float = 4.0,
    max_overlap: float = 0.15,
    min_area: int = 8,
    max_accept: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``k`` random star-shaped candidate nuclei (docs/method.md §2) and place them as :func:`place_polygons`.

    Candidate ``c`` takes, in order, from a splitmix64 stream started at ``seed ^ (c · 0xD1B54A32D192ED03)``: its
    centre (uniform over the patch grown by ``margin``; a centre outside ``tissue`` ends the candidate), its mean
    radius ``U(radius) · size_factor``, ``N = U{vertices}`` vertices at angular steps ``U(2π/N ± irregularity·2π/N)``
    renormalised to 2π, a rotation, ``spike = U(spikiness)`` and per-vertex radii ``clip(Normal(r, spike·r), 0,
    2r)``; then ``smooth_rounds`` of Chaikin corner cutting and the local Jacobian of ``homography`` at the centre
    (a perspective warp of the whole patch: neighbours share a correlated change of shape and size).

    Args:
        seed: 64-bit seed of the candidates.
        k: Candidates to try.
        tissue: Bool or uint8 ``(h, w)``: where centres may fall; also the label map's shape.
        homography: 3×3 perspective map of the patch (identity if None).
        vertices: Vertex count range (inclusive, ≥ 3).
        irregularity: Angular irregularity in ``[0, 1]``.
        spikiness: Range of the radius spread.
        smooth_rounds: Chaikin rounds (0-4).
        radius: Range of mean radii (px).
        size_factor: Scale of radii.
        margin: How far outside the patch centres may fall (px).
        max_overlap: As :func:`place_polygons`.
        min_area: As :func:`place_polygons`.
        max_accept: As :func:`place_polygons`.

    Returns:
        ``(labels, centres)`` as :func:`place_polygons`.

    Raises:
        ValueError: For out-of-range parameters.
    """
    tissue = np.asarray(tissue)
    if tissue.ndim != 2:
        raise ValueError(f"tissue must be 2-D, got {tissue.shape}")
    tissue = tissue.view(np.uint8) if tissue.dtype == np.bool_ else tissue.astype(np.uint8, copy=False)
    if tissue.strides[1] != 1:
        tissue = np.ascontiguousarray(tissue)
    h3 = np.ascontiguousarray(np.eye(3) if homography is None else homography, dtype=np.float64).reshape(3, 3)
    if not (3 <= vertices[0] <= vertices[1]) or not 0 <= smooth_rounds <= 4 or not 0 <= irregularity <= 1:
        raise ValueError(
            f"bad polygon parameters: vertices={vertices}, smooth_rounds={smooth_rounds}, irregularity={irregularity}"
        )
    if not 0.0 <= max_overlap <= 1.0:
        raise ValueError(f"max_overlap must be in [0, 1], got {max_overlap}")
    if k < 0 or not radius[0] > 0 or size_factor <= 0:
        raise ValueError(f"bad candidates: k={k}, radius={radius}, size_factor={size_factor}")
    h, w = tissue.shape
    limit = k if max_accept is None else max(0, int(max_accept))
    labels = np.zeros((h, w), np.int32)
    stats = np.zeros((max(1, min(k, limit)), 3), np.float64)
    n = _core.draw_nuclei(
        int(seed) & _MASK64,
        int(k),
        tissue,
        h3,
        int(vertices[0]),
        int(vertices[1]),
        float(irregularity),
        float(spikiness[0]),
        float(spikiness[1]),
        int(smooth_rounds),
        float(radius[0]),
        float(radius[1]),
        float(size_factor),
        float(margin),
        float(max_overlap),
        int(min_area),
        limit,
        labels,
        stats,
    )
    with np.errstate(invalid="ignore", divide="ignore"):
        return labels, (stats[:n, 1:3] / stats[:n, 0:1]).astype(np.float32)


def draw_nuclei_reference(
    seed: int, k: int, tissue: np.ndarray, homography: np.ndarray | None = None, **kw: object
) -> tuple[np.ndarray, np.ndarray]:
    """The specification of :func:`draw_nuclei`: every candidate made in Python, placed by the reference."""
    shape_kw = _SHAPE_DEFAULTS | {key: kw.pop(key) for key in list(kw) if key in _SHAPE_DEFAULTS}
    h3 = np.eye(3) if homography is None else np.asarray(homography, float)
    tissue = np.asarray(tissue)
    h, w = tissue.shape
    margin = shape_kw["margin"]
    polys = []
    for c in range(k):
        stream = _Stream(seed, c)
        cx = -margin + stream.uniform() * (w + 2 * margin)
        cy = -margin + stream.uniform() * (h + 2 * margin)
        if not tissue[min(max(int(cy), 0), h - 1), min(max(int(cx), 0), w - 1)]:
            continue
        lo, hi = shape_kw["radius"]
        r = (lo + stream.uniform() * (hi - lo)) * shape_kw["size_factor"]
        local = _polygon_reference(
            stream, r, shape_kw["vertices"], shape_kw["irregularity"], shape_kw["spikiness"], shape_kw["smooth_rounds"]
        )
        polys.append(local @ homography_jacobian(h3, cx, cy).T + np.array([cx, cy]))
    offsets = np.concatenate([[0], np.cumsum([len(p) for p in polys])]).astype(np.int64)
    xy = np.concatenate(polys) if polys else np.zeros((0, 2))
    return place_polygons_reference(xy, offsets, (h, w), **kw)

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from pysynth.synth.raster import rasterize_polygons, rasterize_polygons_cv2, rasterize_polygons_reference


def star_polygon(rng: np.random.Generator, cx: float, cy: float, radius: float, n: int) -> np.ndarray:
    """A random star-shaped polygon (the nucleus generator's shape family), vertices counter-clockwise."""
    angles = np.sort(rng.uniform(0, 2 * np.pi, n))
    radii = rng.uniform(0.4 * radius, 1.4 * radius, n)
    return np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], axis=1)


def pack(polys: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    xy = np.concatenate(polys) if polys else np.zeros((0, 2))
    return xy, np.r_[0, np.cumsum([len(p) for p in polys])].astype(np.int64)


def random_scene(seed: int, n: int = 40, size: int = 120) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return pack(
        [
            star_polygon(rng, *rng.uniform(-15, size + 15, 2), rng.uniform(2, 18), int(rng.integers(3, 18)))
            for _ in range(n)
        ]
    )


def distance_to_outline(points: np.ndarray, poly: np.ndarray) -> np.ndarray:
    a, b = poly[None], np.roll(poly, -1, axis=0)[None]
    p = points[:, None]
    t = np.clip(((p - a) * (b - a)).sum(-1) / ((b - a) ** 2).sum(-1), 0, 1)
    return np.linalg.norm(p - (a + t[..., None] * (b - a)), axis=-1).min(axis=1)


def shoelace(p: np.ndarray) -> float:
    x, y = p[:, 0], p[:, 1]
    return 0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))


@pytest.mark.parametrize("seed", range(6))
def test_matches_reference(seed: int) -> None:
    xy, offsets = random_scene(seed)
    ids = np.random.default_rng(seed).integers(-5, 1000, len(offsets) - 1)
    labels, coverage = rasterize_polygons(xy, offsets, (120, 131), ids, coverage=True)
    ref_labels, ref_coverage = rasterize_polygons_reference(xy, offsets, (120, 131), ids, coverage=True)
    # Random float vertices put no pixel centre exactly on an edge: the two agree exactly.
    np.testing.assert_array_equal(labels, ref_labels)
    np.testing.assert_array_equal(coverage, ref_coverage)


def test_difference_from_cv2_fillpoly_is_its_outline() -> None:
    """cv2.fillPoly also paints the pixels its outline touches: (nearly) a superset; they differ on a rim."""
    rng = np.random.default_rng(7)
    n_rim = n_ours = n_missing = 0
    for _ in range(20):
        poly = star_polygon(rng, 40.0, 40.0, rng.uniform(6, 20), int(rng.integers(10, 18)))
        xy, offsets = pack([poly])
        ours = rasterize_polygons(xy, offsets, (80, 80)) > 0
        cv = rasterize_polygons_cv2(xy, offsets, (80, 80)) > 0
        # OpenCV's fixed-point edge stepping misses the odd pixel whose centre is just inside an edge.
        ii, jj = np.nonzero(ours & ~cv)
        if len(ii):
            assert distance_to_outline(np.stack([jj + 0.5, ii + 0.5], axis=1), poly).max() < 0.25
        n_missing += len(ii)
        extra = cv & ~ours
        # Every extra pixel's centre lies within a pixel of the outline.
        ii, jj = np.nonzero(extra)
        assert distance_to_outline(np.stack([jj + 0.5, ii + 0.5], axis=1), poly).max() <= 1.0
        n_rim += extra.sum()
        n_ours += ours.sum()
    # The rim is about half the perimeter: a few percent of a nucleus-sized polygon's area, < 25%.
    assert 0 < n_rim < 0.25 * n_ours
    assert n_missing < 0.002 * n_ours


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    radius=st.floats(3, 40),
    n=st.integers(3, 24),
    convex=st.booleans(),
)
def test_area_matches_shoelace(seed: int, radius: float, n: int, convex: bool) -> None:
    rng = np.random.default_rng(seed)
    if convex:
        angles = np.sort(rng.uniform(0, 2 * np.pi, n))
        poly = np.stack([50 + radius * np.cos(angles), 50 + radius * np.sin(angles)], axis=1)
    else:
        poly = star_polygon(rng, 50.0, 50.0, radius / 1.4, n)
    import shapely

    # The shoelace area is the enclosed area of simple polygons only: a star whose edges cross (seed 158, n 5)
    # covers its lobes' union (41 px) while its signed area nets to 23.
    assume(shapely.Polygon(poly).is_valid)
    xy, offsets = pack([poly])
    labels, coverage = rasterize_polygons(xy, offsets, (100, 100), coverage=True)
    area = shoelace(poly.astype(np.float32).astype(np.float64))
    perimeter = np.linalg.norm(poly - np.roll(poly, -1, axis=0), axis=1).sum()
    # Centre sampling: the error is a sum of boundary terms, well inside half a pixel per unit of perimeter.
    assert abs(labels.sum() - area) <= 0.5 * perimeter + 2
    # Coverage samples a 4x4 grid: an edge can move by up to a quarter pixel (thin spikes reach that bound).
    assert abs(coverage.sum() - area) <= 0.25 * perimeter + 1


def test_ids_order_and_existing_labels_kept() -> None:
    square = np.array([[10, 10], [30, 10], [30, 30], [10, 30]], np.float32)
    xy, offsets = pack([square, square + 10])
    labels = np.full((50, 50), -3, np.int32)
    out = rasterize_polygons(xy, offsets, (50, 50), np.array([7, 9]), labels=labels)
    assert out is labels
    assert (labels[10:20, 10:20] == 7).all()
    assert (labels[20:40, 20:40] == 9).all()  # the later polygon wins where they overlap
    assert labels[0, 0] == -3
    assert labels[45, 45] == -3
    assert rasterize_polygons(xy, offsets, (50, 50))[25, 25] == 2  # default ids 1..n


def test_clipped_outside_image() -> None:
    big = np.array([[-100, -50], [300, -50], [300, 400], [-100, 400]], np.float32)
    away = np.array([[500, 500], [600, 500], [600, 600]], np.float32)
    xy, offsets = pack([big, away])
    labels, coverage = rasterize_polygons(xy, offsets, (20, 30), coverage=True)
    assert (labels == 1).all()
    assert (coverage == 1).all()


def test_coverage_of_half_pixel_edge_and_union() -> None:
    # A rectangle from x = 2.5 covers columns 3.. fully and column 2 at half of its samples.
    rect = np.array([[2.5, 0], [8, 0], [8, 4], [2.5, 4]], np.float32)
    xy, offsets = pack([rect, rect])  # drawn twice: the union is the same
    _, coverage = rasterize_polygons(xy, offsets, (4, 10), coverage=True)
    np.testing.assert_array_equal(coverage[0], [0, 0, 0.5, 1, 1, 1, 1, 1, 0, 0])
    out = np.full((4, 10), 9.0, np.float32)
    assert rasterize_polygons(xy, offsets, (4, 10), coverage=out)[1] is out
    np.testing.assert_array_equal(out, coverage)


def test_degenerate_and_empty() -> None:
    xy = np.array([[1, 1], [5, 5], [2, 2], [8, 2], [8, 8]], np.float32)
    labels = rasterize_polygons(xy, np.array([0, 2, 2, 5]), (10, 10))
    assert set(np.unique(labels)) == {0, 3}  # 2 vertices and 0 vertices paint nothing
    assert not rasterize_polygons(np.zeros((0, 2)), np.array([0]), (5, 5)).any()


def test_non_contiguous_and_other_dtypes() -> None:
    xy, offsets = random_scene(3, n=10, size=60)
    wide = np.zeros((len(xy), 4), np.float64)
    wide[:, ::2] = xy
    strided = wide[:, ::2]
    assert not strided.flags.c_contiguous
    np.testing.assert_array_equal(
        rasterize_polygons(strided, offsets.astype(np.int32), (60, 60)),
        rasterize_polygons_reference(xy, offsets, (60, 60)),
    )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"xy": np.zeros((4, 3))}, r"xy must have shape \(V, 2\)"),
        ({"xy": np.array([[0, 0], [1, np.nan], [2, 0], [0, 2]])}, "finite"),
        ({"offsets": np.array([0, 5])}, "end at len"),
        ({"offsets": np.array([1, 4])}, "start at 0"),
        ({"offsets": np.array([0, 3, 2, 4])}, "never decrease"),
        ({"shape_hw": (0, 5)}, "positive"),
        ({"ids": np.array([1, 2])}, r"ids must have shape \(1,\)"),
        ({"ids": np.array([2**40])}, "int32"),
        ({"labels": np.zeros((10, 10), np.int64)}, "labels must be a int32"),
        ({"labels": np.zeros((10, 20), np.int32)[:, ::2]}, "C-contiguous"),
        ({"coverage": np.zeros((10, 9), np.float32)}, "coverage must be a float32"),
    ],
)
def test_rejects_bad_input(kwargs: dict, match: str) -> None:
    args = {"xy": np.array([[0, 0], [5, 0], [5, 5], [0, 5]], np.float32), "offsets": np.array([0, 4])}
    args["shape_hw"] = (10, 10)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        rasterize_polygons(**args)


def test_releases_gil(assert_releases_gil) -> None:
    xy, offsets = random_scene(0, n=3000, size=1500)
    assert_releases_gil(lambda: rasterize_polygons(xy * 1.5, offsets, (2300, 2300), coverage=True))

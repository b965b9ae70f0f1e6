"""Shape measurements (pysynth.shape) against analytic shapes and plain references, and their use in the outputs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest

from pysynth.shape import MEASUREMENT_NAMES, ShapeFeatures, shape_features

FIELDS = [
    "area_px",
    "area_um2",
    "perimeter_um",
    "circularity",
    "solidity",
    "eccentricity",
    "major_axis_um",
    "minor_axis_um",
    "orientation_deg",
]


def _disc(r: float, centre: tuple[float, float], size: int = 80) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    return ((xx - centre[0]) ** 2 + (yy - centre[1]) ** 2 <= r * r).astype(np.int32)


def _ellipse(a: float, b: float, degrees: float, centre: tuple[float, float], size: int = 100) -> np.ndarray:
    """Digital ellipse, semi-axes ``a`` ≥ ``b`` px, major axis ``degrees`` anticlockwise on screen from x (y down)."""
    yy, xx = np.mgrid[:size, :size]
    t = math.radians(degrees)
    dx, dy = xx - centre[0], yy - centre[1]
    u = dx * math.cos(t) - dy * math.sin(t)  # along the major axis, direction (cos t, −sin t) in image coordinates
    v = dx * math.sin(t) + dy * math.cos(t)
    return ((u / a) ** 2 + (v / b) ** 2 <= 1).astype(np.int32)


def _ramanujan(a: float, b: float) -> float:
    h = ((a - b) / (a + b)) ** 2
    return math.pi * (a + b) * (1 + 3 * h / (10 + math.sqrt(4 - 3 * h)))


def _one(labels: np.ndarray, mpp: float = 1.0) -> dict[str, float]:
    f = shape_features(labels, mpp)
    return {name: float(getattr(f, name)[1]) for name in FIELDS}


def _moments_reference(mask: np.ndarray) -> tuple[float, float, float]:
    """Major and minor axis (4·sqrt of the covariance's eigenvalues) and orientation, written plainly."""
    rows, cols = np.nonzero(mask)
    cov = np.cov(np.stack([cols, rows]).astype(float), bias=True)
    values, vectors = np.linalg.eigh(cov)
    vx, vy = vectors[:, 1]  # the larger eigenvalue's direction, in image coordinates (y down)
    angle = math.degrees(math.atan2(-vy, vx))  # anticlockwise on screen
    angle = (angle + 90) % 180 - 90
    return 4 * math.sqrt(max(values[1], 0)), 4 * math.sqrt(max(values[0], 0)), angle


def _angle_gap(a: float, b: float) -> float:
    return abs((a - b + 90) % 180 - 90)


# --- perimeter ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("r", [4, 5, 6, 8, 10, 15, 20, 30])
def test_disc_perimeter_is_that_of_the_circle(r: int) -> None:
    rng = np.random.default_rng(r)
    errors = []
    for _ in range(8):
        mask = _disc(r, (40 + rng.random(), 40 + rng.random()))
        errors.append(_one(mask)["perimeter_um"] / (2 * math.pi * r) - 1)
    errors = np.array(errors)
    assert abs(errors.mean()) < 0.015
    assert np.abs(errors).max() < (0.035 if r < 8 else 0.02)


def test_perimeter_scales_with_mpp_and_the_staircase_is_not_measured() -> None:
    mask = _disc(12, (40.3, 39.6))
    px = _one(mask)["perimeter_um"]
    assert _one(mask, 0.25)["perimeter_um"] == pytest.approx(px * 0.25)
    from pysynth.instances import trace_contours

    ring = trace_contours(mask)[0]
    staircase = np.hypot(*np.diff(np.vstack([ring, ring[:1]]), axis=0).T).sum()
    assert staircase / px > 1.2  # the pixel-edge outline's length, about 4/π of the circle's


@pytest.mark.parametrize(("h", "w"), [(10, 10), (15, 15), (12, 30), (30, 30), (6, 40)])
def test_rectangle_perimeter(h: int, w: int) -> None:
    mask = np.zeros((60, 60), np.int32)
    mask[7 : 7 + h, 9 : 9 + w] = 1
    got = _one(mask)
    assert got["perimeter_um"] == pytest.approx(2 * (h + w), rel=0.05)
    assert got["solidity"] == pytest.approx(1.0)


@pytest.mark.parametrize(("a", "b"), [(20, 10), (15, 6), (12, 9)])
def test_rotated_ellipse_perimeter_does_not_depend_on_rotation(a: float, b: float) -> None:
    perimeters = [_one(_ellipse(a, b, t, (50.3, 49.6)))["perimeter_um"] for t in range(0, 180, 15)]
    spread = (max(perimeters) - min(perimeters)) / np.mean(perimeters)
    assert spread < 0.03
    assert np.mean(perimeters) == pytest.approx(_ramanujan(a, b), rel=0.02)


# --- fitted ellipse -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("degrees", [0, 20, 45, 70, 90, 110, 135, 160])
def test_rotated_ellipse_axes_eccentricity_and_orientation(degrees: float) -> None:
    a, b, mpp = 20.0, 8.0, 0.5
    got = _one(_ellipse(a, b, degrees, (50.2, 49.7)), mpp)
    assert got["major_axis_um"] == pytest.approx(2 * a * mpp, rel=0.03)
    assert got["minor_axis_um"] == pytest.approx(2 * b * mpp, rel=0.03)
    assert got["eccentricity"] == pytest.approx(math.sqrt(1 - (b / a) ** 2), abs=0.01)
    assert -90 <= got["orientation_deg"] < 90
    assert _angle_gap(got["orientation_deg"], degrees) < 1.0


def test_orientation_convention_on_screen() -> None:
    # A bar from the bottom left to the top right of the screen (y grows downwards) is at +45°.
    bar = np.zeros((40, 40), np.int32)
    for i in range(30):
        bar[35 - i, 5 + i] = 1
    assert _one(bar)["orientation_deg"] == pytest.approx(45, abs=1e-6)
    assert _one(bar[:, ::-1].copy())["orientation_deg"] == pytest.approx(-45, abs=1e-6)
    horizontal, vertical = np.zeros((20, 20), np.int32), np.zeros((20, 20), np.int32)
    horizontal[9:11, 2:18] = 1
    vertical[2:18, 9:11] = 1
    assert _one(horizontal)["orientation_deg"] == 0
    assert _one(vertical)["orientation_deg"] == -90  # the range is [-90, 90)
    assert _one(_disc(8, (10, 10), 20))["orientation_deg"] == 0  # no direction: 0


def test_moments_match_a_plain_eigen_decomposition() -> None:
    rng = np.random.default_rng(3)
    labels = np.zeros((120, 120), np.int32)
    for k in range(1, 7):  # irregular blobs: unions of discs, in their own cells so they stay apart
        y0, x0 = divmod(k - 1, 3)
        for _ in range(4):
            cx, cy = 20 + 40 * x0 + rng.uniform(-8, 8), 30 + 60 * y0 + rng.uniform(-12, 12)
            labels[_disc(rng.uniform(3, 8), (cx, cy), 120) > 0] = k
    f = shape_features(labels, 0.3)
    for k in range(1, 7):
        major, minor, angle = _moments_reference(labels == k)
        assert f.major_axis_um[k] == pytest.approx(major * 0.3, rel=1e-9)
        assert f.minor_axis_um[k] == pytest.approx(minor * 0.3, rel=1e-9, abs=1e-9)
        assert f.eccentricity[k] == pytest.approx(math.sqrt(1 - (minor / major) ** 2), rel=1e-9)
        assert _angle_gap(f.orientation_deg[k], angle) < 1e-6
        assert f.area_px[k] == (labels == k).sum()


# --- solidity, circularity ------------------------------------------------------------------------------------------


def _hull_of_pixel_squares(mask: np.ndarray) -> float:
    rows, cols = np.nonzero(mask)
    corners = np.concatenate([np.stack([cols + dx, rows + dy], 1) for dx in (0, 1) for dy in (0, 1)])
    return cv2.contourArea(cv2.convexHull(corners.astype(np.int32)))


def test_solidity_of_a_convex_and_a_c_shaped_object() -> None:
    disc = _disc(15, (40.2, 39.7))
    c_shape = ((_disc(20, (40, 40)) - _disc(12, (40, 40))) > 0).astype(np.int32)
    c_shape[34:47, 40:] = 0  # open on the right
    for mask in (disc, c_shape):
        assert _one(mask)["solidity"] == pytest.approx(mask.sum() / _hull_of_pixel_squares(mask), rel=1e-9)
    assert _one(disc)["solidity"] > 0.95
    assert _one(c_shape)["solidity"] < 0.6


def test_circularity_of_a_disc_and_a_thin_rectangle() -> None:
    for r in (6, 12, 25):
        assert _one(_disc(r, (40.4, 40.1)))["circularity"] > 0.95
    thin = np.zeros((50, 50), np.int32)
    thin[20:23, 3:47] = 1
    assert _one(thin)["circularity"] < 0.3


# --- edge cases -----------------------------------------------------------------------------------------------------


def test_touching_labels_and_the_image_border_are_measured_as_alone() -> None:
    # Two half-discs sharing an edge, the left one cut by the image's left border.
    whole = _disc(14, (12.3, 30.2), 60)
    labels = whole.copy()
    labels[:, 12:] *= 2
    together = shape_features(labels, 0.5)
    for k in (1, 2):
        alone = np.zeros((80, 80), np.int32)
        alone[10:70, 10:70] = labels == k
        by_itself = shape_features(alone, 0.5)
        for name in FIELDS:
            assert getattr(together, name)[k] == pytest.approx(getattr(by_itself, name)[1], rel=1e-12), name


def test_empty_and_sparse_label_images() -> None:
    for empty in (np.zeros((0, 0), np.int32), np.zeros((30, 40), np.int32)):
        f = shape_features(empty, 0.25)
        for name in FIELDS:
            assert getattr(f, name).shape == (1,)
            assert getattr(f, name)[0] == 0
    labels = np.zeros((30, 30), np.int32)
    labels[5:12, 5:12] = 3  # labels 1 and 2 absent
    f = shape_features(labels, 1.0)
    for name in FIELDS:
        values = getattr(f, name)
        assert values.shape == (4,)
        assert np.all(values[:3] == 0), name
    assert f.area_px[3] == 49


def test_one_pixel_and_tiny_instances_are_finite() -> None:
    labels = np.zeros((10, 10), np.int32)
    labels[0, 0] = 1  # in a corner of the image
    labels[5, 5] = 2
    labels[7, 2:4] = 3  # two pixels
    labels[2:4, 8] = 4
    f = shape_features(labels, 0.25)
    for name in FIELDS:
        assert np.isfinite(getattr(f, name)).all(), name
    for k in (1, 2):
        assert f.perimeter_um[k] == pytest.approx(math.pi * 0.25)
        assert f.circularity[k] == 1.0
        assert f.solidity[k] == 1.0
        assert f.eccentricity[k] == 0
        assert f.major_axis_um[k] == f.minor_axis_um[k] == f.orientation_deg[k] == 0
    assert f.solidity[3] == f.solidity[4] == 1.0
    assert f.eccentricity[3] == f.eccentricity[4] == 1.0
    assert f.orientation_deg[3] == 0
    assert f.orientation_deg[4] == -90


def test_only_the_chosen_labels_are_measured() -> None:
    labels = np.zeros((60, 60), np.int32)
    labels[_disc(8, (15, 15), 60) > 0] = 1
    labels[_disc(10, (40, 40), 60) > 0] = 2
    labels[2:6, 40:55] = 3
    every, some = shape_features(labels, 0.5), shape_features(labels, 0.5, only=[2])
    for name in FIELDS:
        assert getattr(some, name)[2] == getattr(every, name)[2]
        assert getattr(some, name)[1] == getattr(some, name)[3] == 0


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="2-D"):
        shape_features(np.zeros((2, 2, 2), np.int32), 1.0)
    with pytest.raises(ValueError, match="non-negative"):
        shape_features(-np.ones((2, 2), np.int32), 1.0)
    with pytest.raises(ValueError, match="mpp"):
        shape_features(np.ones((2, 2), np.int32), 0.0)


# --- in the outputs -------------------------------------------------------------------------------------------------


def _nuclei_maps(size: int = 160) -> tuple[np.ndarray, np.ndarray, list[tuple[float, float]]]:
    """Detection and segmentation maps of a few ellipses, two of them touching."""
    centres = [(30.0, 30.0), (90.0, 35.0), (110.0, 35.0), (50.0, 110.0), (120.0, 115.0)]
    seg = np.zeros((size, size), np.float32)
    det = np.zeros((size, size), np.float32)
    for i, (cx, cy) in enumerate(centres):
        cv2.ellipse(seg, (int(cx), int(cy)), (14 - i, 9), 25.0 * i, 0, 360, 1.0, -1)
        det[int(cy), int(cx)] = 1.0
    det = cv2.GaussianBlur(det, (0, 0), 3.0)
    return det / det.max(), seg, centres


def test_region_nuclei_carry_the_shape_features_of_the_labels() -> None:
    from pysynth.infer import Region, feature, region_nuclei
    from pysynth.instances import InstanceConfig, find_instances

    det, seg, _ = _nuclei_maps()
    rgb = np.full((*seg.shape, 3), 180, np.uint8)
    config, mpp = InstanceConfig(), 0.25
    labels = find_instances(det, seg, config).labels
    expected = shape_features(labels, mpp)
    region = Region(0, 0, 0, seg.shape[1], seg.shape[0])
    nuclei = region_nuclei(rgb, det, seg, region, (0, 0), config, mpp, 1.0, seg.shape)
    assert len(nuclei) == labels.max() >= 4
    keys = ["perimeter_um", "circularity", "solidity", "eccentricity", "major_axis_um", "minor_axis_um"]
    for i, nuc in enumerate(nuclei):
        k = int(labels[int(nuc["centroid"][1]), int(nuc["centroid"][0])])
        assert nuc["area_px"] == expected.area_px[k]
        for key in keys:
            assert nuc[key] == pytest.approx(getattr(expected, key)[k], abs=1e-3), key
        assert nuc["orientation_deg"] == pytest.approx(expected.orientation_deg[k], abs=0.01)
        # A circle of the same area is at most a little longer than the (sub-pixel) perimeter's circle.
        assert nuc["perimeter_um"] >= 0.97 * 2 * math.sqrt(math.pi * nuc["area_um2"])
        measurements = feature(nuc, i + 1)["properties"]["measurements"]
        for key, name in MEASUREMENT_NAMES.items():
            assert measurements[name] == nuc[key]
        assert list(measurements)[:8] == list(MEASUREMENT_NAMES.values())


def test_segment_geojson_carries_the_measurements_given_mpp(tmp_path: Path) -> None:
    from pysynth.instances import Instances
    from pysynth.segment import CONFIDENCE, DETECTION_PEAK, STAIN_MEASUREMENTS, write_outputs

    stains = list(STAIN_MEASUREMENTS.values())  # always: they need only the image
    labels = np.zeros((60, 80), np.int32)
    labels[:, :60][_disc(9, (20, 20), 60) > 0] = 1
    labels[5:25, 45:75] = 2
    labels[40:55, 50:58] = 3
    rgb = np.full((60, 80, 3), 200, np.uint8)
    found = Instances(labels, np.array([0.0, 0.9, 0.8, 0.7]), np.array([0.0, 0.5, 0.6, 0.4]))
    expected: ShapeFeatures = shape_features(labels, 0.5)
    paths = write_outputs(tmp_path, "img", rgb, found, mpp=0.5)
    features = json.loads(paths.geojson.read_text())["features"]
    assert [f["id"] for f in features] == [1, 2, 3]
    for feat in features:
        k = feat["id"]
        m = feat["properties"]["measurements"]
        assert list(m) == [CONFIDENCE, DETECTION_PEAK, *MEASUREMENT_NAMES.values(), *stains]
        assert m["Hematoxylin OD sd"] == 0  # a flat grey image: no spread
        assert m[CONFIDENCE] == found.confidence[k]
        for key, name in MEASUREMENT_NAMES.items():
            assert m[name] == pytest.approx(float(getattr(expected, key)[k]), abs=1e-4)
    # Without mpp: the confidences and stains; plain labels: the stains only.
    plain = json.loads(write_outputs(tmp_path, "old", rgb, found).geojson.read_text())["features"]
    assert list(plain[0]["properties"]["measurements"]) == [CONFIDENCE, DETECTION_PEAK, *stains]
    bare = json.loads(write_outputs(tmp_path, "bare", rgb, labels).geojson.read_text())["features"]
    assert list(bare[0]["properties"]["measurements"]) == stains
    sized = json.loads(write_outputs(tmp_path, "sized", rgb, labels, mpp=0.5).geojson.read_text())["features"]
    assert list(sized[0]["properties"]["measurements"]) == [*MEASUREMENT_NAMES.values(), *stains]

"""Instances from the two output maps: the C++ watershed against its twins, and the post-processing contract."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pysynth.instances import (
    InstanceConfig,
    find_instances,
    instance_confidence,
    instances_from_maps,
    keep_instances,
    trace_contours,
    watershed,
    watershed_reference,
)


def _problem(seed: int, size: int, n_markers: int, plateaus: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    elevation = cv2.GaussianBlur(rng.random((size, size + 3)).astype(np.float32), (0, 0), 2)
    if plateaus:  # ties must be broken the same way as the reference
        elevation = np.round(elevation * 50) / 50
    markers = np.zeros(elevation.shape, np.int32)
    for k in range(1, n_markers + 1):
        markers[rng.integers(0, size), rng.integers(0, size + 3)] = k
    mask = elevation > np.percentile(elevation, 25)
    return elevation, markers, mask


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), size=st.integers(2, 40), n=st.integers(0, 12), conn=st.sampled_from([4, 8]))
def test_watershed_matches_reference(seed: int, size: int, n: int, conn: int) -> None:
    elevation, markers, mask = _problem(seed, size, n)
    np.testing.assert_array_equal(
        watershed(elevation, markers, mask, connectivity=conn),
        watershed_reference(elevation, markers, mask, connectivity=conn),
    )


@pytest.mark.parametrize("seed", range(5))
def test_watershed_matches_scikit_image(seed: int) -> None:
    # Without plateaus the flood order is unique; on plateaus scikit-image's heap may order ties otherwise.
    skimage_watershed = pytest.importorskip("skimage.segmentation").watershed
    elevation, markers, mask = _problem(seed, 120, 25, plateaus=False)
    ours = watershed(elevation, markers, mask)
    theirs = skimage_watershed(elevation.astype(np.float64), markers, mask=mask)
    np.testing.assert_array_equal(ours, theirs)
    ours8 = watershed(elevation, markers, mask, connectivity=8)
    theirs8 = skimage_watershed(elevation.astype(np.float64), markers, mask=mask, connectivity=2)
    np.testing.assert_array_equal(ours8, theirs8)


def test_watershed_rejects_bad_input() -> None:
    e = np.zeros((4, 4), np.float32)
    with pytest.raises(ValueError, match="shape"):
        watershed(e, np.zeros((3, 4), np.int32))
    with pytest.raises(ValueError, match="non-negative"):
        watershed(e, -np.ones((4, 4), np.int32))
    with pytest.raises(ValueError, match="connectivity"):
        watershed(e, np.zeros((4, 4), np.int32), connectivity=6)
    with pytest.raises(ValueError, match="finite"):
        watershed(np.full((4, 4), np.nan, np.float32), np.zeros((4, 4), np.int32))


def test_watershed_releases_the_gil(assert_releases_gil) -> None:
    elevation, markers, mask = _problem(0, 1200, 300)
    assert_releases_gil(lambda: watershed(elevation, markers, mask))


def _disk_maps() -> tuple[np.ndarray, np.ndarray]:
    seg = np.zeros((80, 120), np.float32)
    det = np.zeros_like(seg)
    cv2.circle(seg, (30, 40), 12, 1.0, -1)  # two touching nuclei, each with a centre
    cv2.circle(seg, (52, 40), 12, 1.0, -1)
    det[40, 30] = det[40, 52] = 1.0
    cv2.circle(seg, (95, 20), 8, 0.8, -1)  # a nucleus whose centre was missed: seeded at its maximum
    cv2.circle(seg, (95, 20), 2, 0.0, -1)  # with a hole
    cv2.circle(seg, (100, 70), 2, 1.0, -1)  # too small
    det = cv2.GaussianBlur(det, (0, 0), 1.5) * 30
    return det, seg


def test_instances_split_touching_nuclei_fill_holes_and_drop_specks() -> None:
    det, seg = _disk_maps()
    labels = instances_from_maps(det, seg, InstanceConfig(min_size=20))
    assert labels.max() == 3
    assert labels[40, 30] != labels[40, 52]
    assert labels[40, 30] > 0
    assert labels[40, 52] > 0
    assert labels[20, 95] > 0  # the hole is filled
    assert labels[70, 100] == 0  # the speck is dropped
    first = [labels[np.unravel_index(np.flatnonzero(labels == k)[0], labels.shape)] for k in (1, 2, 3)]
    assert first == [1, 2, 3]  # numbered in raster order
    areas = np.bincount(labels.ravel())[1:]
    assert areas.min() >= 20


def test_instance_config_is_validated() -> None:
    with pytest.raises(ValueError, match="foreground_threshold"):
        InstanceConfig(foreground_threshold=1.5)
    with pytest.raises(ValueError, match="connectivity"):
        InstanceConfig(connectivity=6)
    with pytest.raises(ValueError, match="one shape"):
        instances_from_maps(np.zeros((3, 3)), np.zeros((3, 4)))
    with pytest.raises(ValueError, match="min_confidence"):
        InstanceConfig(min_confidence=1.2)
    with pytest.raises(ValueError, match="min_confidence"):
        InstanceConfig(min_confidence=-0.1)


# --- per-nucleus confidence ----------------------------------------------------------------------------------------


def _random_maps(seed: int, shape: tuple[int, int] = (90, 130)) -> tuple[np.ndarray, np.ndarray]:
    """Blobby probability maps giving a few dozen instances of varied confidence."""
    rng = np.random.default_rng(seed)
    seg = cv2.GaussianBlur(rng.random(shape).astype(np.float32), (0, 0), 3)
    seg = (seg - seg.min()) / (seg.max() - seg.min())
    det = cv2.GaussianBlur(rng.random(shape).astype(np.float32), (0, 0), 2)
    det = (det - det.min()) / (det.max() - det.min())
    return det, seg


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(0, 40), gaps=st.booleans())
def test_instance_confidence_matches_a_per_label_loop(seed: int, n: int, gaps: bool) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, n + 1, (23, 31)).astype(np.int32)
    if gaps and n:
        labels[labels == max(1, n // 2)] = 0  # an absent label keeps its entry, 0
    det = rng.random(labels.shape).astype(np.float32)
    seg = rng.random(labels.shape).astype(np.float32)
    mean_seg, peak = instance_confidence(labels, det, seg)
    assert mean_seg.shape == peak.shape == (int(labels.max()) + 1,)
    assert mean_seg[0] == peak[0] == 0
    for k in range(1, int(labels.max()) + 1):
        inside = labels == k
        if not inside.any():
            assert mean_seg[k] == peak[k] == 0
            continue
        assert mean_seg[k] == pytest.approx(float(np.mean(seg[inside], dtype=np.float64)), abs=1e-9)
        assert peak[k] == float(det[inside].max())


def test_instance_confidence_on_real_instances() -> None:
    det, seg = _random_maps(3)
    labels = instances_from_maps(det, seg, InstanceConfig(detection_threshold=0.6, foreground_threshold=0.5))
    assert labels.max() > 5
    mean_seg, peak = instance_confidence(labels, det, seg)
    for k in range(1, int(labels.max()) + 1):
        assert mean_seg[k] == pytest.approx(seg[labels == k].mean(), rel=1e-6)
        assert peak[k] == det[labels == k].max()
    assert np.all(mean_seg[1:] > 0.5)  # the foreground lies above the threshold (before smoothing, mostly)
    with pytest.raises(ValueError, match="one shape"):
        instance_confidence(labels[:-1], det, seg)


def test_min_confidence_drops_exactly_the_nuclei_below_it() -> None:
    det, seg = _random_maps(7)
    base = InstanceConfig(detection_threshold=0.6, foreground_threshold=0.45, min_size=4)
    everything = find_instances(det, seg, base)
    n = everything.count
    assert n > 10
    conf = everything.confidence[1:]
    threshold = float(np.median(conf))
    kept = find_instances(det, seg, InstanceConfig(**{**base.__dict__, "min_confidence": threshold}))
    expected = np.flatnonzero(conf >= threshold) + 1  # old ids of the nuclei that stay, in order
    assert 0 < kept.count == len(expected) < n
    # Ids renumbered consecutively in the old order, pixels unchanged, confidences carried along.
    assert set(np.unique(kept.labels)) == set(range(kept.count + 1))
    for new, old in enumerate(expected, start=1):
        np.testing.assert_array_equal(kept.labels == new, everything.labels == old)
    np.testing.assert_array_equal(kept.confidence[1:], conf[conf >= threshold])
    np.testing.assert_array_equal(kept.detection_peak[1:], everything.detection_peak[expected])
    assert np.all(kept.confidence[1:] >= threshold)
    # instances_from_maps honours the same setting.
    np.testing.assert_array_equal(
        instances_from_maps(det, seg, InstanceConfig(**{**base.__dict__, "min_confidence": threshold})), kept.labels
    )
    # A threshold above every nucleus leaves none; 0 keeps all.
    assert find_instances(det, seg, InstanceConfig(**{**base.__dict__, "min_confidence": 1.0})).count == 0
    assert everything.above(0.0) is everything


def test_keep_instances_renumbers_in_order() -> None:
    labels = np.array([[0, 3, 3], [1, 0, 2], [4, 4, 0]], np.int32)
    out = keep_instances(labels, np.array([True, True, False, True, False]))
    np.testing.assert_array_equal(out, [[0, 2, 2], [1, 0, 0], [0, 0, 0]])


def _shoelace(poly: np.ndarray) -> float:
    x, y = poly[:, 0].astype(float), poly[:, 1].astype(float)
    return 0.5 * (np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), size=st.integers(1, 40), n=st.integers(1, 10))
def test_contours_match_reference_and_enclose_each_instance(seed: int, size: int, n: int) -> None:
    from pysynth.instances import trace_contours, trace_contours_reference

    elevation, markers, mask = _problem(seed, size, n)
    labels = watershed(elevation, markers, mask)
    fast, slow = trace_contours(labels), trace_contours_reference(labels)
    assert len(fast) == len(slow) == labels.max()
    for k, (a, b) in enumerate(zip(fast, slow, strict=True), start=1):
        np.testing.assert_array_equal(a, b)
        if not (labels == k).any():
            assert len(a) == 0
            continue
        # Clockwise on screen with y down: positive shoelace area, covering the component's pixels.
        n_components, parts = cv2.connectedComponents((labels == k).astype(np.uint8), connectivity=4)
        first = parts.ravel()[np.flatnonzero(labels.ravel() == k)[0]]
        component = parts == first
        outside_pieces = cv2.connectedComponents((~component).astype(np.uint8), connectivity=8)[0] - 1
        area = _shoelace(a)
        assert area >= component.sum()
        if n_components == 2 and outside_pieces <= 1:  # one piece, no holes: the outline is exact
            assert area == component.sum()


def test_contour_of_known_shapes() -> None:
    from pysynth.instances import trace_contours

    labels = np.zeros((4, 5), np.int32)
    labels[1, 1] = 1
    labels[1:3, 3] = 2
    labels[2, 3:5] = 2
    square, ell = trace_contours(labels)
    assert square.tolist() == [[1, 1], [2, 1], [2, 2], [1, 2]]
    assert ell.tolist() == [[3, 1], [4, 1], [4, 2], [5, 2], [5, 3], [3, 3]]
    assert _shoelace(ell) == 3


def _largest_parts_reference(labels: np.ndarray) -> np.ndarray:
    """Breadth-first search of every 4-connected part of equal labels; each label keeps its largest, then first."""
    from collections import deque

    h, w = labels.shape
    out = labels.copy()
    seen = np.zeros(labels.shape, bool)
    parts: dict[int, list[list[tuple[int, int]]]] = {}
    for i in range(h):
        for j in range(w):
            k = int(labels[i, j])
            if k == 0 or seen[i, j]:
                continue
            queue, part = deque([(i, j)]), []
            seen[i, j] = True
            while queue:
                y, x = queue.popleft()
                part.append((y, x))
                for yy, xx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                    if 0 <= yy < h and 0 <= xx < w and not seen[yy, xx] and labels[yy, xx] == k:
                        seen[yy, xx] = True
                        queue.append((yy, xx))
            parts.setdefault(k, []).append(part)  # parts are found in raster order of their first pixel
    for group in parts.values():
        keep = max(range(len(group)), key=lambda c: (len(group[c]), -c))
        for c, part in enumerate(group):
            if c != keep:
                for y, x in part:
                    out[y, x] = 0
    return out


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 14), st.integers(1, 14), st.integers(1, 5))
def test_largest_parts_matches_a_breadth_first_search(seed: int, h: int, w: int, n: int) -> None:
    from pysynth.instances import largest_parts

    labels = np.random.default_rng(seed).integers(0, n + 1, (h, w)).astype(np.int32)
    expected = _largest_parts_reference(labels)
    np.testing.assert_array_equal(largest_parts(labels), expected)


def _ring_area(ring: np.ndarray) -> float:
    x, y = ring[:, 0].astype(np.float64), ring[:, 1].astype(np.float64)
    return 0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))


def test_outlines_agree_with_pixel_counts_under_8_connectivity() -> None:
    # Two blobs joined only at a corner are one 8-connected seed region: the instance keeps its larger part, so
    # its outline's area is its pixel count (before, the outline covered the first part and the count both).
    det = np.zeros((40, 40), np.float32)
    det[5:15, 5:15] = 1.0
    det[15:19, 15:19] = 1.0  # touches the first block only at the corner (15, 15)
    seg = (det > 0).astype(np.float32)
    config = InstanceConfig(connectivity=8, detection_sigma=0.0, segmentation_sigma=0.0, min_size=1)
    found = find_instances(det, seg, config)
    counts = np.bincount(found.labels.ravel(), minlength=found.count + 1)
    assert found.count == 1
    for k, ring in enumerate(trace_contours(found.labels), start=1):
        assert _ring_area(ring) == counts[k]
    assert counts[1] == 100


def test_segment_on_a_coarser_image_gives_outlines_that_agree_with_pixel_counts(tissue_rgb) -> None:
    # A 20x image through the 40x model: labels mapped back to the coarser grid may break at corners; every
    # instance is one part, and its outline's area equals its pixel count.
    from pysynth.models.io import load_model
    from pysynth.segment import segment_image

    model, info = load_model()
    found = segment_image(model, info, tissue_rgb[:256, :320], 0.499)
    labels = found.labels
    counts = np.bincount(labels.ravel(), minlength=int(labels.max()) + 1)
    rings = trace_contours(labels)
    present = [k for k in range(1, len(counts)) if counts[k]]
    assert len(present) > 20
    for k in present:
        assert _ring_area(rings[k - 1]) == counts[k], k


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31 - 1), st.floats(0.5, 3.0))
def test_4_connected_instances_come_in_one_part_each(seed: int, sigma: float) -> None:
    # Why find_instances reduces instances to one part only under 8-connectivity: a 4-connected watershed (and
    # its hole filling) cannot split one.
    from pysynth.instances import largest_parts

    rng = np.random.default_rng(seed)
    det, seg = (cv2.GaussianBlur(rng.random((60, 70)).astype(np.float32), (0, 0), sigma) for _ in range(2))
    det, seg = ((m - m.min()) / (np.ptp(m) + 1e-9) for m in (det, seg))
    found = find_instances(det, seg, InstanceConfig(min_size=1, detection_sigma=0.0, segmentation_sigma=0.0))
    np.testing.assert_array_equal(largest_parts(found.labels), found.labels)


def _fill_enclosed_reference(labels: np.ndarray) -> np.ndarray:
    """Instance by instance: flood the padded image from its corner around the instance; what is not reached is
    enclosed by it and becomes it (repeated until nothing changes, so nested ones end in the outermost)."""
    out = labels.copy()
    changed = True
    while changed:
        changed = False
        for k in np.unique(out[out > 0]):
            free = np.pad((out != k).astype(np.uint8), 1, constant_values=1)
            flood = np.zeros((free.shape[0] + 2, free.shape[1] + 2), np.uint8)
            cv2.floodFill(free, flood, (0, 0), 2, flags=4)
            enclosed = (free == 1)[1:-1, 1:-1]
            if enclosed.any():
                out[enclosed] = k
                changed = True
    return out


def test_an_instance_inside_another_joins_it() -> None:
    from pysynth.instances import fill_enclosed

    labels = np.zeros((40, 60), np.int32)
    labels[5:25, 5:25] = 1
    labels[12:16, 12:16] = 2  # inside 1: joins it
    labels[5:25, 30:50] = 3
    labels[10:14, 35:39] = 4  # inside 3 ...
    labels[11:13, 36:38] = 5  # ... and 5 inside 4: both join 3
    labels[0:6, 52:60] = 6
    labels[2:4, 55:60] = 7  # inside 6 but on the image's edge: kept
    labels[28:38, 5:25] = 8
    labels[30:34, 5:9] = 9  # inside 8 but touching the background at a side: kept
    labels[28:38, 30:40] = 10
    labels[28:38, 40:50] = 11
    labels[32:34, 39:41] = 12  # between 10 and 11: kept
    merged = fill_enclosed(labels)
    assert merged[13, 13] == 1
    assert merged[12, 37] == 3
    assert merged[11, 36] == 3
    assert merged[3, 57] == 7
    assert merged[31, 6] == 9
    assert merged[33, 40] == 12
    np.testing.assert_array_equal(merged, _fill_enclosed_reference(labels))
    no_change = labels.copy()
    no_change[labels == 2] = 1
    no_change[(labels == 4) | (labels == 5)] = 3
    np.testing.assert_array_equal(merged, no_change)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31 - 1), st.floats(0.6, 2.5))
def test_no_instance_lies_inside_another_and_outlines_do_not_overlap(seed: int, sigma: float) -> None:
    # After find_instances no instance is enclosed by a single other one, and it matches the object-by-object
    # reference on the labels before the merge; so no two outlines overlap and each covers its own pixels only.
    import shapely

    from pysynth.instances import fill_enclosed

    rng = np.random.default_rng(seed)
    det, seg = (cv2.GaussianBlur(rng.random((60, 70)).astype(np.float32), (0, 0), sigma) for _ in range(2))
    det, seg = ((m - m.min()) / (np.ptp(m) + 1e-9) for m in (det, seg))
    seg = np.clip(seg * 1.6, 0, 1)  # large foreground: rings around other seeds happen
    found = find_instances(det, seg, InstanceConfig(min_size=1, detection_sigma=0.0, segmentation_sigma=0.0))
    labels = found.labels
    np.testing.assert_array_equal(fill_enclosed(labels), labels)  # nothing left to merge
    np.testing.assert_array_equal(_fill_enclosed_reference(labels), labels)
    polygons = [shapely.Polygon(ring + 0.0) for ring in trace_contours(labels) if len(ring) >= 3]
    counts = np.bincount(labels.ravel())[1:]
    assert [round(p.area) for p in polygons] == [int(c) for c in counts if c]
    tree = shapely.STRtree(polygons)
    a, b = tree.query(polygons, predicate="contains")
    assert not np.any(a != b), "an outline contains another"


def test_fill_enclosed_matches_the_reference_on_random_labels() -> None:
    from pysynth.instances import fill_enclosed

    rng = np.random.default_rng(7)
    for _ in range(30):
        labels = np.zeros((30, 40), np.int32)
        for k in range(1, 9):
            y, x = rng.integers(0, 30), rng.integers(0, 40)
            hh, ww = rng.integers(2, 16, size=2)
            labels[y : y + hh, x : x + ww] = k  # later rectangles overwrite: nesting, rings and cuts
        np.testing.assert_array_equal(fill_enclosed(labels), _fill_enclosed_reference(labels))


def _clean_reference(labels: np.ndarray, min_size: int, connectivity: int) -> np.ndarray:
    """The post-processing as first written: holes (background parts whose 8-neighbours are all one instance)
    filled from a pass over the whole image, then fill_enclosed, largest parts, sizes and raster renumbering."""
    from pysynth.instances import fill_enclosed, largest_parts

    out = labels.copy()
    n_bg, bg_parts = cv2.connectedComponents((out == 0).astype(np.uint8), connectivity=4, ltype=cv2.CV_32S)
    if n_bg > 1:
        border = np.unique(np.concatenate([bg_parts[0], bg_parts[-1], bg_parts[:, 0], bg_parts[:, -1]]))
        owners: dict[int, set[int]] = {}
        h, w = out.shape
        for y, x in zip(*np.nonzero(bg_parts), strict=True):
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    if 0 <= y + dy < h and 0 <= x + dx < w and out[y + dy, x + dx] > 0:
                        owners.setdefault(int(bg_parts[y, x]), set()).add(int(out[y + dy, x + dx]))
        for part, around in owners.items():
            if len(around) == 1 and part not in border:
                out[bg_parts == part] = next(iter(around))
    out = fill_enclosed(out)
    if connectivity == 8:
        out = largest_parts(out)
    sizes = np.bincount(out.ravel())
    out[~(sizes >= min_size)[out]] = 0
    flat = out.ravel()
    present, first = np.unique(flat[flat > 0], return_index=True)
    new = np.zeros(int(out.max()) + 1, np.int32)
    new[present[np.argsort(first)]] = np.arange(1, present.size + 1)
    return new[out]


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    conn=st.sampled_from([4, 8]),
    min_size=st.integers(0, 30),
    thresholds=st.tuples(st.floats(0.3, 0.8), st.floats(0.3, 0.7)),
)
def test_post_processing_equals_its_first_version(seed: int, conn: int, min_size: int, thresholds) -> None:
    """Hole filling is left to fill_enclosed: the instances are those of the whole-image hole pass before it."""
    from pysynth.instances import _clean, watershed

    rng = np.random.default_rng(seed)
    h, w = rng.integers(30, 120, 2)
    det = cv2.GaussianBlur(rng.random((h, w)).astype(np.float32), (0, 0), rng.uniform(1.5, 4))
    seg = cv2.GaussianBlur(rng.random((h, w)).astype(np.float32), (0, 0), rng.uniform(1, 3))
    det, seg = (det - det.min()) / np.ptp(det), (seg - seg.min()) / np.ptp(seg)
    foreground = seg > thresholds[1]
    _, seeds = cv2.connectedComponents(
        ((det > thresholds[0]) & foreground).astype(np.uint8), connectivity=conn, ltype=cv2.CV_32S
    )
    labels = watershed(-seg, seeds, foreground, connectivity=conn)
    np.testing.assert_array_equal(_clean(labels, min_size, conn), _clean_reference(labels, min_size, conn))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(0, 30), shape=st.tuples(st.integers(1, 40), st.integers(1, 40)))
def test_label_moments_match_numpy(seed: int, n: int, shape: tuple[int, int]) -> None:
    from pysynth.instances import label_moments, label_moments_reference

    labels = np.random.default_rng(seed).integers(0, n + 1, shape).astype(np.int32)
    for ours, ref in zip(label_moments(labels), label_moments_reference(labels), strict=True):
        np.testing.assert_array_equal(ours, ref)
    with pytest.raises(ValueError, match="non-negative"):
        label_moments(np.full_like(labels, -1))

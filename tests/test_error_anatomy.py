"""Error anatomy (false, missed, split, merged, matched objects), its overlay, dot matching and ``pysynth evaluate``
with ``--errors`` and ``--dots``, on hand-built cases with known answers and against brute-force references."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from pysynth import error_anatomy as ea
from pysynth.detection import centroids, detection_scores, match_points, pool, read_dots
from pysynth.errors import PysynthError


def _case() -> tuple[np.ndarray, np.ndarray]:
    """A 40×40 pair with one of each verdict (labels deliberately not 1..n)."""
    gt = np.zeros((40, 40), np.int32)
    pred = np.zeros((40, 40), np.int32)
    gt[2:8, 2:8] = 10  # A: matched exactly by pred 11
    pred[2:8, 2:8] = 11
    gt[2:8, 12:18] = 20  # B: missed (no prediction)
    pred[12:18, 2:8] = 21  # C: false (no ground truth)
    gt[12:18, 12:24] = 30  # D: split into preds 31 and 32, 50 % each (IoU 0.5 each: not matched)
    pred[12:18, 12:18] = 31
    pred[12:18, 18:24] = 32
    gt[22:28, 2:8] = 40  # E: gt 40 and 50 merged by pred 41 (IoU 0.5 each: not matched)
    gt[22:28, 8:14] = 50
    pred[22:28, 2:14] = 41
    gt[30:36, 2:8] = 60  # F: matched with a 1-px shift (IoU 30/42)
    pred[30:36, 3:9] = 61
    gt[30:36, 20:26] = 70  # G: gt 70 touched by pred 71 on 6 px: pred false (6/60), gt missed (6/36)
    pred[30:36, 25:35] = 71
    return gt, pred


def test_hand_built_case_counts_and_rates() -> None:
    gt, pred = _case()
    e = ea.object_errors(gt, pred)
    s = ea.summarise(e)
    assert (s.gt_objects, s.pred_objects) == (7, 7)
    assert s.matched == 2
    assert list(e.pred_ids[e.pred_matched]) == [11, 61]
    assert list(e.gt_ids[e.gt_matched]) == [10, 60]
    assert s.false_objects == 2
    assert list(e.pred_ids[e.pred_false]) == [21, 71]
    assert s.missed_nuclei == 2
    assert list(e.gt_ids[e.gt_missed]) == [20, 70]
    assert s.splits == 1
    assert list(e.gt_ids[e.gt_split]) == [30]
    assert s.merges == 1
    assert list(e.pred_ids[e.pred_merge]) == [41]
    assert s.false_share == pytest.approx(2 / 7)
    assert s.missed_share == pytest.approx(2 / 7)
    # Foreground: gt 288 px, pred 312 px, shared 36 + 72 + 72 + 30 + 6 = 216.
    assert (s.gt_pixels, s.pred_pixels, s.overlap_pixels) == (288, 312, 216)
    assert s.pixel_precision == pytest.approx(216 / 312)
    assert s.pixel_recall == pytest.approx(0.75)
    assert s.median_area_false == 48.0  # 36 and 60
    assert s.median_area_matched == 36.0
    assert s.median_area_missed == 36.0
    assert math.isnan(s.median_hema_od_false)  # no image given
    assert s.to_dict()["median_hema_od_false"] is None


def test_perfect_and_empty_maps() -> None:
    gt, _ = _case()
    s = ea.summarise(ea.object_errors(gt, gt))
    assert s.matched == s.gt_objects == s.pred_objects == 7
    assert s.false_objects == s.missed_nuclei == s.splits == s.merges == 0
    assert s.pixel_precision == s.pixel_recall == 1.0
    empty = ea.summarise(ea.object_errors(np.zeros((5, 5), int), np.zeros((5, 5), int)))
    assert empty.gt_objects == empty.pred_objects == 0
    assert math.isnan(empty.pixel_precision)
    assert math.isnan(empty.false_share)
    only_gt = ea.summarise(ea.object_errors(gt, np.zeros_like(gt)))
    assert only_gt.missed_nuclei == 7
    assert only_gt.pixel_recall == 0.0
    assert math.isnan(only_gt.pixel_precision)


def test_cover_threshold_is_twenty_percent() -> None:
    gt = np.zeros((10, 20), int)
    gt[0:10, 0:10] = 1  # 100 px
    pred = np.zeros_like(gt)
    pred[0:10, 8:18] = 2  # 100 px, 20 px inside gt: exactly 20 %, so neither false nor missed
    s = ea.summarise(ea.object_errors(gt, pred))
    assert s.false_objects == 0
    assert s.missed_nuclei == 0
    pred[:, 8] = 0  # 10 px overlap of 90: below 20 % of each
    s = ea.summarise(ea.object_errors(gt, pred))
    assert s.false_objects == 1
    assert s.missed_nuclei == 1


def test_pooled_summary_sums_counts() -> None:
    gt, pred = _case()
    e = ea.object_errors(gt, pred)
    gt2 = np.zeros_like(gt)
    gt2[0:10, 0:10] = 1
    e2 = ea.object_errors(gt2, gt2)  # 100 px, perfect
    s = ea.summarise([e, e2])
    assert s.images == 2
    assert (s.gt_objects, s.pred_objects, s.matched, s.false_objects) == (8, 8, 3, 2)
    assert s.pixel_precision == pytest.approx((216 + 100) / (312 + 100))
    assert s.false_share == pytest.approx(2 / 8)


def _reference(gt: np.ndarray, pred: np.ndarray) -> dict[str, int]:
    """The rules applied object by object with boolean masks (slow and obvious)."""
    gts, preds = [g for g in np.unique(gt) if g], [p for p in np.unique(pred) if p]
    out = dict.fromkeys(["false", "missed", "split", "merge", "matched"], 0)
    for p in preds:
        m = pred == p
        out["false"] += (m & (gt > 0)).sum() < 0.2 * m.sum()
        held = sum((m & (gt == g)).sum() >= 0.2 * (gt == g).sum() and (m & (gt == g)).any() for g in gts)
        out["merge"] += held >= 2
        out["matched"] += any((m & (gt == g)).sum() / (m | (gt == g)).sum() > 0.5 for g in gts)
    for g in gts:
        m = gt == g
        out["missed"] += (m & (pred > 0)).sum() < 0.2 * m.sum()
        out["split"] += sum((m & (pred == p)).sum() >= 0.2 * m.sum() and (m & (pred == p)).any() for p in preds) >= 2
    return out


def _random_map(rng: np.random.Generator, n: int) -> np.ndarray:
    labels = np.zeros((48, 48), np.int32)
    for k in range(1, n + 1):
        y, x = rng.integers(0, 42, 2)
        h, w = rng.integers(2, 9, 2)
        labels[y : y + h, x : x + w] = rng.integers(1, 1000) * 10 + k  # later boxes overwrite earlier ones
    return labels


def test_vectorised_rules_agree_with_object_by_object_reference(rng: np.random.Generator) -> None:
    for _ in range(25):
        gt, pred = _random_map(rng, 12), _random_map(rng, 14)
        s = ea.summarise(ea.object_errors(gt, pred))
        got = {"false": s.false_objects, "missed": s.missed_nuclei, "split": s.splits, "merge": s.merges}
        got["matched"] = s.matched
        assert got == _reference(gt, pred)


def test_hematoxylin_density_of_false_and_matched_objects() -> None:
    gt, pred = _case()
    rgb = np.full((*gt.shape, 3), 235, np.uint8)
    rgb[pred == 21] = (90, 40, 150)  # dark purple false object
    rgb[pred == 11] = (60, 30, 120)
    s = ea.summarise(ea.object_errors(gt, pred, rgb))
    h = ea.hematoxylin_od(rgb)
    expected_false = np.median([h[pred == 21].mean(), h[pred == 71].mean()])
    expected_matched = np.median([h[pred == 11].mean(), h[pred == 61].mean()])
    assert s.median_hema_od_false == pytest.approx(expected_false, rel=1e-6)
    assert s.median_hema_od_matched == pytest.approx(expected_matched, rel=1e-6)
    assert h[pred == 11].mean() > h[0, 0] + 0.5  # dark purple has far more hematoxylin than the near-white glass


def test_shape_mismatch_is_refused() -> None:
    with pytest.raises(ValueError, match="shape"):
        ea.object_errors(np.zeros((4, 4), int), np.zeros((4, 5), int))
    with pytest.raises(ValueError, match="image"):
        ea.object_errors(np.zeros((4, 4), int), np.zeros((4, 4), int), np.zeros((4, 5, 3), np.uint8))


def test_overlay_colours_at_known_pixels() -> None:
    gt, pred = _case()
    out = ea.error_overlay(gt, pred)
    grey = (ea.GREY,) * 3
    assert tuple(out[0, 0]) == grey  # background
    assert tuple(out[2, 4]) == ea.MATCHED_COLOUR  # outline of matched pred 11
    assert tuple(out[4, 4]) == grey  # its inside is left alone
    assert tuple(out[12, 4]) == ea.FALSE_COLOUR  # outline of false pred 21
    a = ea.FALSE_FILL_ALPHA
    fill = tuple(round(ea.GREY * (1 - a) + c * a) for c in ea.FALSE_COLOUR)
    assert tuple(out[14, 4]) == fill  # filled semi-transparent
    assert tuple(out[2, 14]) == ea.MISSED_COLOUR  # outline of missed gt 20
    assert tuple(out[4, 14]) == grey
    assert tuple(out[12, 14]) == ea.OTHER_COLOUR  # split piece 31
    colours = {ea.MATCHED_COLOUR, ea.FALSE_COLOUR, ea.MISSED_COLOUR, ea.OTHER_COLOUR}
    assert len(colours) == 4
    rgb = np.zeros((*gt.shape, 3), np.uint8)
    rgb[..., 2] = 77
    on_image = ea.error_overlay(gt, pred, rgb)
    assert tuple(on_image[0, 0]) == (0, 0, 77)  # drawn on the image
    assert tuple(on_image[2, 4]) == ea.MATCHED_COLOUR
    assert rgb.max() == 77  # the input is not modified


# --- dot matching ---------------------------------------------------------------------------------------------


def _brute_force(pred: np.ndarray, gt: np.ndarray, radius: float) -> tuple[int, float]:
    """(most pairs, least total distance among those) over every one-to-one matching within radius."""
    d = np.linalg.norm(pred[:, None] - gt[None], axis=2) if len(pred) and len(gt) else np.zeros((len(pred), len(gt)))
    best = (0, 0.0)
    for choice in itertools.product(range(-1, len(pred)), repeat=len(gt)):
        used = [c for c in choice if c >= 0]
        if len(used) != len(set(used)) or any(d[c, g] > radius for g, c in enumerate(choice) if c >= 0):
            continue
        total = sum(d[c, g] for g, c in enumerate(choice) if c >= 0)
        if len(used) > best[0] or (len(used) == best[0] and total < best[1]):
            best = (len(used), total)
    return best


def test_match_points_is_optimal_against_brute_force(rng: np.random.Generator) -> None:
    for _ in range(150):
        pred = rng.uniform(0, 8, (rng.integers(0, 7), 2))
        gt = rng.uniform(0, 8, (rng.integers(0, 6), 2))
        radius = float(rng.uniform(1.0, 4.0))
        p, g = match_points(pred, gt, radius)
        assert len(set(p.tolist())) == len(p)
        assert len(set(g.tolist())) == len(g)
        distances = np.linalg.norm(pred[p] - gt[g], axis=1) if len(p) else np.zeros(0)
        assert (distances <= radius).all()  # nothing beyond the radius
        count, total = _brute_force(pred, gt, radius)
        assert len(p) == count
        assert distances.sum() == pytest.approx(total, abs=1e-9)


def test_match_points_prefers_more_pairs_over_greedy_nearest() -> None:
    # Greedy nearest-first pairs P-A (0.9) and leaves Q alone; the optimum pairs P-B and Q-A.
    pred = np.array([[0.0, 0.0], [0.0, 1.9]])  # P, Q
    gt = np.array([[0.0, 0.9], [0.0, -1.0]])  # A, B
    p, g = match_points(pred, gt, 1.0)
    assert sorted(zip(p.tolist(), g.tolist(), strict=True)) == [(0, 1), (1, 0)]
    p, g = match_points(pred, gt, 0.95)
    assert list(zip(p.tolist(), g.tolist(), strict=True)) == [(0, 0)]
    p, g = match_points(np.zeros((0, 2)), gt, 1.0)
    assert p.size == g.size == 0


def test_match_points_in_a_crowded_group_drops_forced_pairs() -> None:
    # One group of 3 + 3 points whose best matching has only 2 pairs: the third is never paired out of range.
    pred = np.array([[0.0, 0.9], [0.0, -0.9], [-0.9, 0.0]])  # hub near all three dots; two near dot 0 only
    gt = np.array([[0.0, 0.0], [0.0, 1.8], [0.6, 1.5]])
    p, g = match_points(pred, gt, 1.0)
    assert len(p) == 2
    assert (np.linalg.norm(pred[p] - gt[g], axis=1) <= 1.0).all()
    assert np.linalg.norm(pred[p] - gt[g], axis=1).sum() == pytest.approx(0.9 + np.hypot(0.6, 0.6))
    assert (0, 2) in set(zip(p.tolist(), g.tolist(), strict=True))


def test_centroids_and_detection_scores() -> None:
    labels = np.zeros((30, 30), np.int32)
    labels[4:7, 4:7] = 9  # centroid (5, 5)
    labels[10:12, 20:24] = 3  # centroid (10.5, 21.5)
    assert np.allclose(centroids(labels), [[10.5, 21.5], [5, 5]])  # increasing label order
    dots = np.array([[5.0, 6.0], [12.0, 21.5], [25.0, 25.0]])
    s = detection_scores(centroids(labels), dots, np.array([1, 2, 3]), radius=2.0)
    assert (s.dots, s.predicted, s.matched) == (3, 2, 2)
    assert s.precision == 1.0
    assert s.recall == pytest.approx(2 / 3)
    assert s.f1 == pytest.approx(0.8)
    assert s.recall_per_class() == {"lymphocyte": 1.0, "tumour": 1.0, "stromal": 0.0}
    pooled = pool([s, s])
    assert (pooled.dots, pooled.matched, pooled.images) == (6, 4, 2)
    assert pooled.recall == pytest.approx(2 / 3)


def test_read_dots_refuses_bad_files(tmp_path: Path) -> None:
    good = tmp_path / "a_gt_class_coords.txt"
    good.write_text("1 2 1\n3 4 3\n\n")
    yx, cls = read_dots(good, (10, 10))
    assert yx.tolist() == [[1, 2], [3, 4]]
    assert cls.tolist() == [1, 3]
    empty = tmp_path / "e.txt"
    empty.write_text("")
    assert read_dots(empty)[0].shape == (0, 2)
    with pytest.raises(PysynthError, match=r"a_gt_class_coords\.txt: dot .* outside"):
        read_dots(good, (10, 4))
    bad = tmp_path / "b.txt"
    bad.write_text("1 2 4\n")
    with pytest.raises(PysynthError, match=r"b\.txt: class 4 outside 1\.\.3"):
        read_dots(bad)
    bad.write_text("1 2\n")
    with pytest.raises(PysynthError, match=r"b\.txt: line 1"):
        read_dots(bad)


# --- the command line -----------------------------------------------------------------------------------------


def _write_labels(path: Path, labels: np.ndarray) -> None:
    assert cv2.imwrite(str(path), labels.astype(np.uint16))


def _label_folders(tmp_path: Path) -> tuple[Path, Path, Path]:
    gt, pred = _case()
    dirs = [tmp_path / n for n in ("gt", "pred", "img")]
    for d in dirs:
        d.mkdir()
    for stem in ("one", "two"):
        _write_labels(dirs[0] / f"{stem}.png", gt)
        _write_labels(dirs[1] / f"{stem}_labels.png", pred)
        rgb = np.full((*gt.shape, 3), 200, np.uint8)
        assert cv2.imwrite(str(dirs[2] / f"{stem}.png"), rgb)
    return dirs[0], dirs[1], dirs[2]


def test_cli_errors_end_to_end(tmp_path: Path) -> None:
    from pysynth.cli import cli

    gt_dir, pred_dir, img_dir = _label_folders(tmp_path)
    out = tmp_path / "err"
    args = ["evaluate", "--pred", pred_dir, "--gt", gt_dir, "--errors", out, "--images", img_dir]
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    assert "mean of 2" in result.stdout
    assert "errors, pooled over 2 image(s)" in result.stdout
    assert "14 predicted, 4 false (share 0.2857)" in result.stdout
    assert sorted(p.name for p in out.iterdir()) == ["errors.csv", "errors.json", "one_errors.png", "two_errors.png"]
    rows = (out / "errors.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert len(rows) == 3
    assert header[0] == "image"
    one = dict(zip(header, rows[1].split(","), strict=True))
    assert one["image"] == "one"
    assert (one["false_objects"], one["missed_nuclei"], one["splits"], one["merges"], one["matched"]) == (
        "2",
        "2",
        "1",
        "1",
        "2",
    )
    assert float(one["pixel_recall"]) == 0.75
    assert float(one["median_hema_od_false"]) > 0  # measured on the images
    doc = json.loads((out / "errors.json").read_text())
    assert doc["pooled"]["false_objects"] == 4
    assert doc["pooled"]["splits"] == 2
    assert doc["pooled"]["pixel_precision"] == pytest.approx(216 / 312)
    assert doc["images"]["two"]["merges"] == 1
    picture = cv2.cvtColor(cv2.imread(str(out / "one_errors.png")), cv2.COLOR_BGR2RGB)
    assert tuple(picture[0, 0]) == (200, 200, 200)  # the image
    assert tuple(picture[2, 4]) == ea.MATCHED_COLOUR
    assert tuple(picture[12, 4]) == ea.FALSE_COLOUR
    assert tuple(picture[2, 14]) == ea.MISSED_COLOUR

    # Without --images: grey background; with --split: only the listed image.
    split = tmp_path / "split.txt"
    split.write_text("two.png\n")
    out2 = tmp_path / "err2"
    args = ["evaluate", "--pred", pred_dir, "--gt", gt_dir, "--errors", out2, "--split", split]
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out2.iterdir()) == ["errors.csv", "errors.json", "two_errors.png"]
    picture = cv2.imread(str(out2 / "two_errors.png"))
    assert tuple(picture[0, 0]) == (ea.GREY,) * 3
    assert json.loads((out2 / "errors.json").read_text())["pooled"]["median_hema_od_false"] is None


def _dot_folders(tmp_path: Path) -> tuple[Path, Path]:
    pred_dir, dots_dir = tmp_path / "pred", tmp_path / "dots"
    pred_dir.mkdir()
    dots_dir.mkdir()
    labels = np.zeros((40, 50), np.int32)
    labels[4:7, 4:7] = 1  # centroid (5, 5)
    labels[4:7, 29:32] = 2  # centroid (5, 30)
    labels[24:27, 4:7] = 3  # centroid (25, 5): no dot near
    for stem in ("a", "b"):
        _write_labels(pred_dir / f"{stem}_labels.png", labels)
    # Dots: 1 px from centroid 1 (lymphocyte), 5 px from centroid 2 (tumour), far from everything (stromal).
    (dots_dir / "a_gt_class_coords.txt").write_text("5 6 1\n10 27 2\n35 45 3\n")
    (dots_dir / "b_gt_class_coords.txt").write_text("5 5 1\n")
    return pred_dir, dots_dir


def test_cli_dots_end_to_end(tmp_path: Path) -> None:
    from pysynth.cli import cli

    pred_dir, dots_dir = _dot_folders(tmp_path)
    report = tmp_path / "det.json"
    base = ["evaluate", "--pred", str(pred_dir), "--dots", str(dots_dir), "--mpp", "0.5", "--json", str(report)]
    result = CliRunner().invoke(cli, [*base, "--radius-um", "3"])  # 6 px: both near dots of image a match
    assert result.exit_code == 0, result.output
    assert "pooled (2)" in result.stdout
    doc = json.loads(report.read_text())
    a = doc["images"]["a"]
    assert (a["dots"], a["predicted"], a["matched"]) == (3, 3, 2)
    assert a["recall_per_class"] == {"lymphocyte": 1.0, "tumour": 1.0, "stromal": 0.0}
    assert doc["pooled"]["matched"] == 3
    assert doc["pooled"]["dots"] == 4
    assert doc["pooled"]["predicted"] == 6
    assert doc["pooled"]["precision"] == pytest.approx(0.5)
    assert doc["pooled"]["recall"] == pytest.approx(0.75)
    assert doc["pooled"]["f1"] == pytest.approx(0.6)
    assert doc["radius_px"] == 6.0

    result = CliRunner().invoke(cli, [*base, "--radius-um", "2"])  # 4 px: the tumour dot (5 px) is out of range
    assert result.exit_code == 0, result.output
    assert json.loads(report.read_text())["images"]["a"]["matched"] == 1

    split = tmp_path / "split.txt"
    split.write_text("b.png\n")
    result = CliRunner().invoke(cli, [*base, "--split", str(split)])
    assert result.exit_code == 0, result.output
    doc = json.loads(report.read_text())
    assert list(doc["images"]) == ["b"]
    assert doc["pooled"]["recall"] == 1.0
    assert doc["pooled"]["recall_per_class"]["tumour"] is None  # no tumour dot in b


def _break(kind: str, tmp_path: Path) -> list[str]:
    if kind in ("missing folder", "unreadable image", "shape mismatch", "image size", "no image"):
        gt_dir, pred_dir, img_dir = _label_folders(tmp_path)
        args = ["--pred", pred_dir, "--gt", gt_dir, "--errors", tmp_path / "e", "--images", img_dir]
        if kind == "missing folder":
            args[3] = tmp_path / "nowhere"
        elif kind == "unreadable image":
            (img_dir / "two.png").write_bytes(b"not a png at all")
        elif kind == "shape mismatch":
            _write_labels(pred_dir / "one_labels.png", np.zeros((40, 41)))
        elif kind == "image size":
            cv2.imwrite(str(img_dir / "one.png"), np.zeros((40, 39, 3), np.uint8))
        else:
            (img_dir / "one.png").unlink()
        return ["evaluate", *map(str, args)]
    pred_dir, dots_dir = _dot_folders(tmp_path)
    args = ["evaluate", "--pred", str(pred_dir), "--dots", str(dots_dir), "--mpp", "0.5"]
    if kind == "dot class":
        (dots_dir / "b_gt_class_coords.txt").write_text("5 5 1\n6 6 7\n")
    elif kind == "dot outside":
        (dots_dir / "b_gt_class_coords.txt").write_text("5 5 1\n40 3 2\n")  # the map is 40 px high
    elif kind == "no mpp":
        args = args[:-2]
    elif kind == "both modes":
        args += ["--gt", str(dots_dir)]
    elif kind == "split lists unknown image":
        (tmp_path / "split.txt").write_text("c.png\n")
        args += ["--split", str(tmp_path / "split.txt")]
    elif kind == "no prediction":
        (pred_dir / "b_labels.png").unlink()
    return args


@pytest.mark.parametrize(
    ("kind", "code", "says"),
    [
        ("missing folder", 2, "nowhere"),
        ("unreadable image", 1, "two.png: cannot read the image"),
        ("shape mismatch", 1, "one_labels.png: shape"),
        ("image size", 1, "one.png: image size 39×40"),
        ("no image", 1, "no image <stem>.png/.tif/.jpg for one"),
        ("dot class", 1, "b_gt_class_coords.txt: class 7 outside 1..3"),
        ("dot outside", 1, "b_gt_class_coords.txt: dot (y 40, x 3) lies outside"),
        ("no mpp", 2, "--dots needs --mpp"),
        ("both modes", 2, "exactly one of --gt"),
        ("split lists unknown image", 1, "split.txt: no dot files"),
        ("no prediction", 1, "no prediction for b (1 of 2 image(s) with dots"),
    ],
)
def test_bad_input_gives_one_error_line(run_cli, tmp_path: Path, kind: str, code: int, says: str) -> None:
    result = run_cli(*_break(kind, tmp_path))
    assert result.code == code, result.err
    assert len(result.error_lines()) == 1, result.err
    assert says in result.error_lines()[0]
    assert "Traceback" not in result.err

"""The lymphocyte-classification bench (pysynth.bench.classes): AUROC, the hand-made rule, the CLI end to end."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest

from pysynth.bench import classes
from pysynth.detection import centroids

BACKGROUND = (236, 214, 226)  # pale pink
DARK = (70, 40, 120)  # dense hematoxylin
PALE = (175, 140, 200)


def brute_auroc(scores, truth) -> float:
    pos = [s for s, t in zip(scores, truth, strict=True) if t]
    neg = [s for s, t in zip(scores, truth, strict=True) if not t]
    if not pos or not neg:
        return math.nan
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(20))
def test_auroc_matches_the_pairwise_count_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 40))
    scores = rng.integers(0, 5, n).astype(float)  # few values: many ties
    truth = rng.random(n) < 0.4
    truth[0], truth[1] = True, False
    assert classes.auroc(scores, truth) == pytest.approx(brute_auroc(scores, truth), abs=1e-12)


@pytest.mark.parametrize("seed", range(20))
def test_best_f1_is_the_best_of_every_cut(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 40))
    scores = rng.integers(0, 6, n).astype(float)  # ties: a cut never splits equal scores
    truth = rng.random(n) < 0.4
    truth[0] = True
    cuts = [-math.inf, *np.unique(scores)]
    brute = max(classes.classification_scores(scores > t, truth).f1 for t in cuts)
    assert classes.best_f1(scores, truth) == pytest.approx(brute, abs=1e-12)


def test_best_f1_edge_cases():
    assert classes.best_f1([1, 2, 3, 4], [False, False, True, True]) == 1.0
    assert classes.best_f1([2, 2, 2, 2], [False, True, False, True]) == pytest.approx(2 / 3)  # all or nothing
    assert math.isnan(classes.best_f1([1, 2], [False, False]))


def test_auroc_edge_cases():
    assert classes.auroc([1, 2, 3, 4], [False, False, True, True]) == 1.0
    assert classes.auroc([4, 3, 2, 1], [False, False, True, True]) == 0.0
    assert classes.auroc([2, 2, 2, 2], [False, True, False, True]) == 0.5
    assert math.isnan(classes.auroc([1, 2, 3], [True, True, True]))
    assert math.isnan(classes.auroc([1, 2, 3], [False, False, False]))
    assert math.isnan(classes.auroc([], []))
    with pytest.raises(ValueError, match="finite"):
        classes.auroc([1.0, math.nan], [True, False])


def test_classification_scores_and_share_threshold():
    s = classes.classification_scores([True, True, False, False, True], [True, False, True, False, True])
    assert (s.tp, s.fp, s.fn, s.tn) == (2, 1, 1, 1)
    assert s.precision == pytest.approx(2 / 3)
    assert s.recall == pytest.approx(2 / 3)
    assert s.f1 == pytest.approx(2 / 3)
    assert math.isnan(classes.classification_scores([False], [False]).precision)
    scores = np.array([5.0, 1.0, 3.0, 4.0, 2.0])
    assert (scores > classes.share_threshold(scores, 0.4)).sum() == 2
    assert (scores > classes.share_threshold(scores, 1.0)).sum() == 5
    assert (scores > classes.share_threshold(scores, 0.0)).sum() == 0
    tied = np.array([3.0, 3.0, 3.0, 1.0])
    assert (tied > classes.share_threshold(tied, 0.5)).sum() == 0  # ties straddling the cut all stay below


def test_combined_scores_add_the_models_log_odds_to_the_rule():
    model = np.array([0.5, 0.75, 0.25, 0.0, 1.0])
    rule = np.array([0.0, 0.0, 1.0, 2.0, -3.0])
    got = classes.combined_scores(model, rule)
    assert got[:3] == pytest.approx([0.0, math.log(3.0), 1.0 - math.log(3.0)])
    assert np.isfinite(got).all()  # p = 0 and 1 are clipped
    assert got[3] == pytest.approx(2.0 + math.log(1e-6 / (1 - 1e-6)))
    # The zero moves with the model's threshold: a nucleus at the threshold and average in the rule scores 0.
    assert classes.combined_scores(np.array([0.3]), np.array([0.0]), 0.3)[0] == pytest.approx(0.0)


def _matched(model, rule, truth) -> classes.MatchedNuclei:
    n = len(rule)
    return classes.MatchedNuclei(
        image=np.full(n, "a", dtype=object), label=np.arange(1, n + 1), dot_class=np.where(truth, 1, 2),
        rule=np.asarray(rule, float), area_px=np.full(n, 30.0), hematoxylin=np.full(n, 0.2),
        circularity=np.full(n, 0.9), model=None if model is None else np.asarray(model, float),
    )  # fmt: skip


def test_model_plus_rule_row_ranks_what_each_alone_misranks():
    # Two lymphocytes: one the model doubts but the rule is sure of, one the other way round.
    truth = np.array([True, True, False, False, False])
    model = [0.3, 0.95, 0.6, 0.1, 0.4]  # the first lymphocyte below a non-lymphocyte (0.6)
    rule = [2.5, -0.5, -1.0, 0.0, 0.2]  # the second lymphocyte below a non-lymphocyte (0.0, 0.2)
    table = classes.score_table(_matched(model, rule, truth))
    assert table["model"]["auroc"] < 1.0
    assert table["rule"]["auroc"] < 1.0
    row = table["model+rule"]
    assert row["auroc"] == 1.0
    assert row["threshold"] == 0.0
    expected = classes.combined_scores(np.array(model), np.array(rule)) > 0
    assert row["share"] == pytest.approx(expected.mean())
    assert row["f1"] == pytest.approx(classes.classification_scores(expected, truth).f1)
    assert classes.score_table(_matched(None, rule, truth))["model+rule"] is None


def _blank(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    return np.full((h, w, 3), BACKGROUND, np.uint8), np.zeros((h, w), np.int32)


def _disc(rgb, labels, label, centre, radius, colour) -> None:
    mask = np.zeros(labels.shape, np.uint8)
    cv2.circle(mask, centre, radius, 1, -1)
    rgb[mask > 0], labels[mask > 0] = colour, label


def _blob(rgb, labels, label, centre, colour) -> None:
    """A large irregular nucleus: an ellipse with a bulge and a notch."""
    mask = np.zeros(labels.shape, np.uint8)
    cx, cy = centre
    cv2.ellipse(mask, centre, (13, 8), 20, 0, 360, 1, -1)
    cv2.circle(mask, (cx + 10, cy + 7), 6, 1, -1)
    cv2.circle(mask, (cx - 4, cy - 8), 4, 0, -1)
    rgb[mask > 0], labels[mask > 0] = colour, label


def test_rule_ranks_a_small_dark_round_disc_above_a_large_pale_irregular_blob():
    rgb, labels = _blank(80, 120)
    _disc(rgb, labels, 1, (25, 40), 5, DARK)
    _blob(rgb, labels, 2, (80, 40), PALE)
    _disc(rgb, labels, 3, (55, 65), 7, ((DARK[0] + PALE[0]) // 2, (DARK[1] + PALE[1]) // 2, 160))
    r = classes.rule_scores(labels, rgb, 0.5)
    assert r.area_px[1] < r.area_px[3] < r.area_px[2]
    assert r.hematoxylin[1] > r.hematoxylin[2]
    assert r.circularity[1] > r.circularity[2]
    assert r.rule[1] > r.rule[3] > r.rule[2]
    assert math.isnan(r.rule[0])
    assert np.nansum(r.rule) == pytest.approx(0.0, abs=1e-9)  # a sum of z-scores


def test_rule_scores_skip_labels_without_pixels_and_a_lone_nucleus():
    rgb, labels = _blank(40, 40)
    _disc(rgb, labels, 2, (20, 20), 5, DARK)  # label 1 holds no pixel
    r = classes.rule_scores(labels, rgb, 0.5)
    assert math.isnan(r.rule[1])
    assert r.rule[2] == 0.0  # one nucleus: no spread, z = 0


# ---------------------------------------------------------------------------------------------- end to end

LYMPH = [(20, 20), (50, 24), (90, 20)]  # (x, y) centres of small dark discs
OTHER = [(25, 65), (70, 70), (105, 62)]  # large pale blobs; the last one gets no dot (a false detection)


def _tile(tmp_path: Path, name: str = "tile") -> tuple[Path, Path, np.ndarray, np.ndarray]:
    """A 96×128 tile with 3 lymphocyte-like discs and 3 large pale blobs, and its dots folder."""
    rgb, labels = _blank(96, 128)
    for k, c in enumerate(LYMPH, 1):
        _disc(rgb, labels, k, c, 4, DARK)
    for k, c in enumerate(OTHER, len(LYMPH) + 1):
        _blob(rgb, labels, k, c, PALE)
    images, dots = tmp_path / "images", tmp_path / "labels"
    images.mkdir(exist_ok=True)
    dots.mkdir(exist_ok=True)
    cv2.imwrite(str(images / f"{name}.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    yx = centroids(labels)
    rows = [f"{y:.0f} {x:.0f} 1" for y, x in yx[:3]]
    rows += [f"{y:.0f} {x:.0f} {c}" for (y, x), c in zip(yx[3:5], (2, 3), strict=True)]
    rows.append("90 120 3")  # a dot far from every nucleus (a missed cell)
    (dots / f"{name}_gt_class_coords.txt").write_text("\n".join(rows) + "\n")
    return images, dots, rgb, labels


@pytest.fixture
def fake_model(monkeypatch):
    """The segment step replaced: each image's nuclei are the drawn labels, with perfect lymphocyte probabilities."""
    state = {"labels": {}, "lymphocyte": True}

    def load(spec, device="auto"):
        return None, SimpleNamespace(lymphocyte_threshold=0.5)

    def segment(model, info, rgb, mpp, tta=1):
        labels = state["labels"][rgb.shape]
        found = SimpleNamespace(labels=labels, confidence=np.ones(7), detection_peak=np.ones(7))
        if state["lymphocyte"]:
            found.lymphocyte = np.array([0.0, 0.9, 0.8, 0.7, 0.2, 0.1, 0.6])  # the unmatched 6th is above 0.5
        return found

    monkeypatch.setattr(classes, "load_segmenter", load)
    monkeypatch.setattr(classes, "segment", segment)
    return state


def test_end_to_end_with_a_model_class_output(tmp_path, fake_model, capsys):
    images, dots, rgb, labels = _tile(tmp_path)
    fake_model["labels"][rgb.shape] = labels
    out = tmp_path / "out.json"
    rc = classes.main([str(images), str(dots), "--input-mpp", "0.5", "--json", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0
    doc = json.loads(out.read_text())
    det = doc["detection"]
    assert (det["images"], det["dots"], det["predicted"], det["matched"]) == (1, 6, 6, 5)
    assert det["matched_per_class"] == {"lymphocyte": 3, "tumour": 1, "stromal": 1}
    assert (doc["matched"], doc["matched_lymphocytes"]) == (5, 3)
    assert doc["model_has_lymphocyte"] is True
    s = doc["scores"]
    assert s["model"]["auroc"] == 1.0
    assert (s["model"]["precision"], s["model"]["recall"]) == (1.0, 1.0)
    assert s["model"]["share"] == pytest.approx(0.6)
    assert s["rule"]["auroc"] == 1.0
    assert s["rule"]["share"] == pytest.approx(0.6)  # the model's share
    assert s["rule"]["f1"] == 1.0
    assert s["area"]["auroc"] == 1.0
    assert doc["images"]["tile"]["auroc"] == {"rule": 1.0, "area": 1.0, "model": 1.0, "model+rule": 1.0}
    assert doc["nuclei"]["label"] == [1, 2, 3, 4, 5]
    assert doc["nuclei"]["model"] == [0.9, 0.8, 0.7, 0.2, 0.1]
    assert "| model | 1.000 | 1.000 | 1.000 | 1.000 |" in printed
    assert "6 dots, 6 predicted, 5 matched" in printed


def test_end_to_end_without_a_model_class_output(tmp_path, fake_model, capsys):
    images, dots, rgb, labels = _tile(tmp_path)
    fake_model["labels"][rgb.shape] = labels
    fake_model["lymphocyte"] = False
    out = tmp_path / "out.json"
    assert classes.main([str(images), str(dots), "--input-mpp", "0.5", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["scores"]["model"] is None
    assert doc["scores"]["model+rule"] is None
    assert doc["model_has_lymphocyte"] is False
    assert doc["scores"]["rule"]["threshold"] == 0.0
    assert doc["scores"]["rule"]["auroc"] == 1.0
    assert "model" not in doc["nuclei"]
    assert "| model | n/a |" in capsys.readouterr().out


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    return lines[0]


@pytest.mark.parametrize(
    ("dot_rows", "message"),
    [("10 10 7\n", "class 7 outside 1..3"), ("10 10 1\n500 20 2\n", "lies outside the 128×96 px image")],
)
def test_bad_dots_exit_1_with_one_line(tmp_path, fake_model, capsys, dot_rows, message):
    images, dots, rgb, labels = _tile(tmp_path)
    fake_model["labels"][rgb.shape] = labels
    (dots / "tile_gt_class_coords.txt").write_text(dot_rows)
    assert classes.main([str(images), str(dots), "--input-mpp", "0.5"]) == 1
    assert message in _one_error_line(capsys)


def test_bad_inputs_exit_1_with_one_line(tmp_path, fake_model, capsys):
    images, dots, rgb, labels = _tile(tmp_path)
    _tile(tmp_path, "second")
    fake_model["labels"][rgb.shape] = labels
    (dots / "second_gt_class_coords.txt").unlink()
    assert classes.main([str(images), str(dots), "--input-mpp", "0.5"]) == 1
    line = _one_error_line(capsys)
    assert "no dot file" in line
    assert "second" in line

    split = tmp_path / "split.txt"
    split.write_text("other.png\nmore.png\n")
    assert classes.main([str(images), str(dots), "--input-mpp", "0.5", "--split", str(split)]) == 1
    assert "for any of its 2 image(s)" in _one_error_line(capsys)

    split.write_text("tile.png\n")  # the split leaves out the image without dots: fine
    assert classes.main([str(images), str(dots), "--input-mpp", "0.5", "--split", str(split)]) == 0
    capsys.readouterr()

    assert classes.main([str(tmp_path / "nowhere"), str(dots), "--input-mpp", "0.5"]) == 1
    assert "no such images folder" in _one_error_line(capsys)
    assert classes.main([str(images), str(dots), "--input-mpp", "0"]) == 1
    assert "--input-mpp must be a positive number" in _one_error_line(capsys)


def test_a_folder_that_is_not_a_model_exits_1(tmp_path, capsys):
    images, dots, _, _ = _tile(tmp_path)
    not_a_model = tmp_path / "model"
    not_a_model.mkdir()
    assert classes.main([str(images), str(dots), "--input-mpp", "0.5", "--model", str(not_a_model)]) == 1
    assert "not a model folder" in _one_error_line(capsys)


def test_real_brca_images_with_the_shipped_model(tmp_path, shared_data, capsys):
    """Two BRCA-M2C test tiles with the shipped model (no class output yet: the rule and area rows only)."""
    brca = shared_data / "brca-m2c"
    if not brca.is_dir():
        pytest.skip("BRCA-M2C not in the shared data")
    split = tmp_path / "two.txt"
    split.write_text("\n".join((brca / "brca_ds_test.txt").read_text().split()[:2]) + "\n")
    out = tmp_path / "brca.json"
    argv = [str(brca / "images"), str(brca / "labels"), "--input-mpp", "0.5", "--split", str(split)]
    assert classes.main([*argv, "--model", "default", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert len(doc["images"]) == 2
    det = doc["detection"]
    assert det["matched"] == doc["matched"] == len(doc["nuclei"]["label"])
    assert 0.5 < det["f1"] <= 1
    assert doc["scores"]["model"] is None or doc["model_has_lymphocyte"]
    assert doc["scores"]["rule"]["auroc"] > 0.7  # the rule is a real baseline on real nuclei
    assert 0.5 < doc["scores"]["area"]["auroc"] <= 1
    assert "| rule |" in capsys.readouterr().out


def test_pictures_show_the_calls_and_the_dots(tmp_path, fake_model):
    from pysynth.qupath import CLASS_COLOURS, LYMPHOCYTE, NUCLEUS

    images, dots, rgb, labels = _tile(tmp_path)
    fake_model["labels"][rgb.shape] = labels
    pictures = tmp_path / "pictures"
    assert classes.main([str(images), str(dots), "--input-mpp", "0.5", "--pictures", str(pictures)]) == 0
    picture = cv2.cvtColor(cv2.imread(str(pictures / "tile_classes.png")), cv2.COLOR_BGR2RGB)
    assert picture.shape == rgb.shape
    yx = centroids(labels)
    # the dots, each in its class's colour: three lymphocytes, a tumour and a stromal nucleus, the missed cell
    for (y, x), c in zip(yx[:5], (1, 1, 1, 2, 3), strict=True):
        assert tuple(picture[round(y), round(x)]) == classes.DOT_COLOURS[c]
    assert tuple(picture[90, 120]) == classes.DOT_COLOURS[3]
    # outlines: label 6 (probability 0.6 ≥ 0.5) in the lymphocyte colour, label 5 (0.1) in the nucleus colour
    from pysynth.synth.store import outline_mask

    edge = outline_mask(labels)
    # (the small discs' outlines lie under their dots)
    for label, kind in ((6, LYMPHOCYTE), (5, NUCLEUS), (4, NUCLEUS)):
        pixels = picture[edge & (labels == label)]
        # outline pixels away from the dots keep the call's colour
        assert (pixels == CLASS_COLOURS[kind]).all(axis=1).mean() > 0.5


def test_pictures_into_a_file_exit_1_with_one_line(tmp_path, fake_model, capsys, monkeypatch):
    images, dots, rgb, labels = _tile(tmp_path)
    fake_model["labels"][rgb.shape] = labels
    blocker = tmp_path / "file"
    blocker.write_text("")
    segmented = []
    segment = classes.segment
    monkeypatch.setattr(classes, "segment", lambda *a, **k: segmented.append(1) or segment(*a, **k))
    rc = classes.main([str(images), str(dots), "--input-mpp", "0.5", "--pictures", str(blocker)])
    err = capsys.readouterr().err.strip().splitlines()
    assert not segmented  # refused before any work
    assert rc == 1
    assert len(err) == 1
    assert err[0].startswith("error:")
    assert "cannot write" in err[0]

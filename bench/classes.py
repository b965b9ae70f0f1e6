"""Lymphocyte classification on dot-annotated tiles: the hand-made rule against the model's class output.

Usage::

    python -m pysynth.bench.classes IMAGES DOTS --input-mpp 0.5 [--model default] [--split FILE] [--radius-um 3]
        [--tta 1] [--device auto] [--json OUT] [--pictures DIR]

``IMAGES`` holds the tiles (``<stem>.png``/``.tif``/``.jpg``), ``DOTS`` their dot files ``<stem>_gt_class_coords.txt``
(``y x class`` rows: 1 lymphocyte, 2 tumour/epithelial, 3 stromal; BRCA-M2C's layout, ``images/`` and ``labels/``).
``--split`` restricts the run to the images a split file lists (one file name per line, as BRCA-M2C's
``brca_ds_test.txt``). The dots only measure: nothing here trains or tunes on them.

For each image:

1. the model segments it (:func:`pysynth.segment.segment_image`, the model's own post-processing, what ``pysynth
   segment`` does);
2. predicted centroids are matched one-to-one to the dots within ``--radius-um`` (:func:`pysynth.detection.
   match_points`), which gives detection precision/recall/F1 per image and pooled, as ``pysynth evaluate --dots``;
3. every matched nucleus gets its truth (lymphocyte: dot class 1, or not: 2 or 3) and its scores: the hand-made
   rule (:func:`rule_scores`: ``−z(area) + z(hematoxylin) + z(circularity)``, z-scores over the image's
   predicted nuclei), area alone (``−area``, a second baseline) and, when the model has a class output, its
   per-nucleus lymphocyte probability (``Instances.lymphocyte``) and ``model+rule`` (:func:`combined_scores`: the
   model's log-odds against its threshold plus the rule; both label-free, neither weighted by the dots).

All scores are compared on the same matched nuclei, pooled over the images: AUROC (:func:`auroc`), and precision,
recall and F1 of "lymphocyte" at a threshold (:func:`thresholds`): the model at its own
``lymphocyte_threshold`` (0.5 when its description has none), the baselines at the threshold that puts the same
share of nuclei above it (without a model class output: the rule at score > 0, area at the rule's share), and
``model+rule`` at 0 (a nucleus at the model's threshold and average in the rule's three z-scores). Prints a
Markdown table and the pooled detection; ``--json`` writes everything, per image and per nucleus too.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from pysynth.detection import DetectionScores, centroids, detection_scores, match_points, pool, read_dots
from pysynth.errors import PysynthError
from pysynth.lymphocyte import call_scores as combined_scores  # the call segment and infer make
from pysynth.metrics import auroc

#: Dot class of a lymphocyte (:data:`pysynth.detection.DOT_CLASSES`).
LYMPHOCYTE = 1

#: The score rows of the table, in order.
SCORES = ("rule", "area", "model", "model+rule")


# --------------------------------------------------------------------------------------------------- measures


@dataclass(frozen=True)
class ClassificationScores:
    """Confusion counts of a yes/no lymphocyte call against the truth, with precision, recall and F1."""

    tp: int
    fp: int
    fn: int
    tn: int

    @property
    def precision(self) -> float:
        """``tp / (tp + fp)``, NaN without calls."""
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else math.nan

    @property
    def recall(self) -> float:
        """``tp / (tp + fn)``, NaN without positives."""
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else math.nan

    @property
    def f1(self) -> float:
        """``2 tp / (2 tp + fp + fn)``, NaN when there is nothing to call or find."""
        return 2 * self.tp / (2 * self.tp + self.fp + self.fn) if self.tp + self.fp + self.fn else math.nan

    def to_dict(self) -> dict[str, float]:
        """Counts and rates, JSON-able (NaN as None)."""
        out: dict[str, float] = {"tp": self.tp, "fp": self.fp, "fn": self.fn, "tn": self.tn}
        for name in ("precision", "recall", "f1"):
            value = getattr(self, name)
            out[name] = None if math.isnan(value) else round(value, 4)
        return out


def classification_scores(predicted: np.ndarray, truth: np.ndarray) -> ClassificationScores:
    """Confusion counts of the yes/no prediction ``predicted`` against ``truth`` (True: lymphocyte).

    Raises:
        ValueError: If the shapes differ.
    """
    predicted = np.asarray(predicted, bool).ravel()
    truth = np.asarray(truth, bool).ravel()
    if predicted.shape != truth.shape:
        raise ValueError(f"predicted and truth differ in length: {predicted.size} and {truth.size}")
    return ClassificationScores(
        tp=int((predicted & truth).sum()),
        fp=int((predicted & ~truth).sum()),
        fn=int((~predicted & truth).sum()),
        tn=int((~predicted & ~truth).sum()),
    )


def share_threshold(scores: np.ndarray, share: float) -> float:
    """The threshold ``t`` that puts ``share`` of ``scores`` strictly above it (``scores > t``).

    With ``k = round(share · n)``, ``t`` is the ``(k+1)``-th largest score (``−inf`` for ``k = n``): exactly ``k``
    scores lie above it unless ties straddle it, in which case fewer do (the tied ones all stay below).
    """
    s = np.sort(np.asarray(scores, np.float64).ravel())[::-1]
    if s.size == 0:
        return math.nan
    k = round(min(max(share, 0.0), 1.0) * s.size)
    return -math.inf if k >= s.size else float(s[k])


def best_f1(scores: np.ndarray, truth: np.ndarray) -> float:
    """The largest F1 of ``scores > t`` over every threshold ``t``: a ceiling that reads the labels.

    Measuring only: it says how well a score *could* call lymphocytes at the best cut for these very nuclei, so it
    separates a score's ranking from the cut a label-free method chose. Tied scores are called together. NaN
    without positives.
    """
    s = np.asarray(scores, np.float64).ravel()
    t = np.asarray(truth, bool).ravel()
    positives = int(t.sum())
    if positives == 0 or s.size == 0:
        return math.nan
    order = np.argsort(-s, kind="stable")
    s, t = s[order], t[order]
    tp = np.cumsum(t)
    called = np.arange(1, s.size + 1)
    last = np.r_[s[1:] != s[:-1], True]  # the cut falls only between distinct scores
    f1 = 2 * tp[last] / (called[last] + positives)
    return float(f1.max())


# ---------------------------------------------------------------------------------------------- per-nucleus


@dataclass(frozen=True)
class RuleScores:
    """Per-label measurements of one image's predicted nuclei and the rule's score (arrays indexed by label).

    Entry 0 (background), and labels without a pixel, hold NaN.

    Attributes:
        area_px: Pixel count.
        hematoxylin: Mean hematoxylin optical density over the nucleus pixels (``rgb_to_hed`` channel 0).
        circularity: ``4π·area / perimeter²`` (:func:`pysynth.shape.shape_features`).
        rule: ``−z(area) + z(hematoxylin) + z(circularity)``, each z-score over the image's nuclei (a feature
            with no spread, e.g. a single nucleus, has z = 0).
    """

    area_px: np.ndarray
    hematoxylin: np.ndarray
    circularity: np.ndarray
    rule: np.ndarray


def rule_scores(labels: np.ndarray, rgb: np.ndarray, mpp: float) -> RuleScores:
    """The hand-made lymphocyte rule on one image: small, dark and round nuclei score high.

    Args:
        labels: ``(h, w)`` instance labels, 0 background.
        rgb: ``(h, w, 3)`` uint8 RGB image of the same pixels.
        mpp: µm/px (for the shape measurements; the area is in px).

    Returns:
        :class:`RuleScores`; z-scores are taken over the labels that hold at least one pixel.

    Raises:
        ValueError: If the shapes of ``labels`` and ``rgb`` differ.
    """
    from pysynth.lymphocyte import rule_scores as lymphocyte_rule
    from pysynth.shape import shape_features
    from pysynth.synth.deconv import rgb_to_hed

    labels = np.asarray(labels)
    rgb = np.asarray(rgb)
    if rgb.shape[:2] != labels.shape or rgb.ndim != 3:
        raise ValueError(f"labels {labels.shape} and rgb {rgb.shape} are not of the same pixels")
    n = int(labels.max()) if labels.size else 0
    ids = labels.ravel().astype(np.int64)
    count = np.bincount(ids, minlength=n + 1).astype(np.float64)
    hema = rgb_to_hed(np.ascontiguousarray(rgb, dtype=np.uint8))[..., 0].ravel()
    mean_h = np.bincount(ids, weights=hema, minlength=n + 1) / np.maximum(count, 1)
    circ = np.zeros(n + 1, np.float64)
    if n:
        circ[:] = shape_features(labels.astype(np.int32, copy=False), mpp).circularity[: n + 1]
    present = count > 0
    present[0] = False
    area = np.full(n + 1, np.nan)
    h = np.full(n + 1, np.nan)
    c = np.full(n + 1, np.nan)
    rule = np.full(n + 1, np.nan)
    area[present], h[present], c[present] = count[present], mean_h[present], circ[present]
    rule[present] = lymphocyte_rule(area[present], h[present], c[present])
    return RuleScores(area, h, c, rule)


@dataclass(frozen=True)
class MatchedNuclei:
    """The matched nuclei of one or more images: one row per (predicted nucleus, dot) pair, parallel arrays.

    Attributes:
        image: Image stem of each row.
        label: The nucleus' label in its image's prediction.
        dot_class: The matched dot's class (1 lymphocyte, 2 tumour, 3 stromal).
        rule: The rule's score (:func:`rule_scores`).
        area_px: The nucleus' pixel count.
        hematoxylin: Its mean hematoxylin density.
        circularity: Its circularity.
        model: The model's lymphocyte probability, or None (no class output).
    """

    image: np.ndarray
    label: np.ndarray
    dot_class: np.ndarray
    rule: np.ndarray
    area_px: np.ndarray
    hematoxylin: np.ndarray
    circularity: np.ndarray
    model: np.ndarray | None

    @property
    def truth(self) -> np.ndarray:
        """True where the dot is a lymphocyte."""
        return self.dot_class == LYMPHOCYTE

    def __len__(self) -> int:
        return int(self.label.size)

    def score(self, name: str, model_threshold: float = 0.5) -> np.ndarray | None:
        """The scores of row ``name`` of the table (:data:`SCORES`; ``area`` is ``−area_px``), None when absent.

        ``model_threshold`` (the model's own) is where ``model+rule`` puts its zero; it does not change a ranking.
        """
        if name == "rule":
            return self.rule
        if name == "area":
            return -self.area_px
        if name == "model":
            return self.model
        if name == "model+rule":
            return None if self.model is None else combined_scores(self.model, self.rule, model_threshold)
        raise KeyError(name)

    @staticmethod
    def concatenate(parts: Sequence[MatchedNuclei]) -> MatchedNuclei:
        """One table of the rows of all ``parts``; ``model`` only when every part has it."""
        if not parts:
            raise ValueError("no matched nuclei to concatenate")
        with_model = all(p.model is not None for p in parts)
        cat = {
            f.name: np.concatenate([getattr(p, f.name) for p in parts])
            for f in fields(MatchedNuclei)
            if f.name != "model"
        }
        model = np.concatenate([p.model for p in parts]) if with_model else None  # type: ignore[misc]
        return MatchedNuclei(**cat, model=model)

    def to_columns(self) -> dict[str, list]:
        """The rows as JSON-ready columns (floats rounded to 6 digits)."""
        out: dict[str, list] = {"image": [str(s) for s in self.image], "label": self.label.tolist()}
        out["dot_class"] = self.dot_class.tolist()
        for name in ("rule", "area_px", "hematoxylin", "circularity", "model"):
            values = getattr(self, name)
            if values is not None:
                out[name] = [round(float(v), 6) for v in values]
        return out


def match_nuclei(
    image: str,
    labels: np.ndarray,
    rgb: np.ndarray,
    dots_yx: np.ndarray,
    classes: np.ndarray,
    radius_px: float,
    mpp: float,
    lymphocyte: np.ndarray | None = None,
) -> tuple[DetectionScores, MatchedNuclei]:
    """Detection scores of one image and the table of its matched nuclei with their scores.

    Args:
        image: The image's stem (kept in each row).
        labels: ``(h, w)`` predicted instance labels.
        rgb: ``(h, w, 3)`` uint8 image.
        dots_yx: ``(m, 2)`` dots ``(y, x)`` in px (:func:`pysynth.detection.read_dots`).
        classes: ``(m,)`` their classes.
        radius_px: Largest centroid-to-dot distance of a match, px.
        mpp: µm/px of the image.
        lymphocyte: The model's per-label lymphocyte probability (entry 0 background), or None.

    Returns:
        ``(detection, matched)``: :func:`pysynth.detection.detection_scores` of the image's centroids, and
        one row per matched pair.

    Raises:
        ValueError: If ``lymphocyte`` is shorter than the largest label needs.
    """
    labels = np.asarray(labels)
    ids = np.unique(labels)
    ids = ids[ids != 0]  # centroids() lists the labels holding a pixel, in this order
    pred_yx = centroids(labels)
    detection = detection_scores(pred_yx, dots_yx, classes, radius_px)
    p, g = match_points(pred_yx, dots_yx, radius_px)
    matched_ids = ids[p].astype(np.int64)
    rule = rule_scores(labels, rgb, mpp)
    model = None
    if lymphocyte is not None:
        lymphocyte = np.asarray(lymphocyte, np.float64).ravel()
        if ids.size and lymphocyte.size <= ids[-1]:
            raise ValueError(
                f"{image}: lymphocyte probabilities for {lymphocyte.size - 1} labels, labels up to {ids[-1]}"
            )
        model = lymphocyte[matched_ids]
    matched = MatchedNuclei(
        image=np.full(matched_ids.size, image, dtype=object),
        label=matched_ids,
        dot_class=np.asarray(classes, np.int64)[g],
        rule=rule.rule[matched_ids],
        area_px=rule.area_px[matched_ids],
        hematoxylin=rule.hematoxylin[matched_ids],
        circularity=rule.circularity[matched_ids],
        model=model,
    )
    return detection, matched


def thresholds(matched: MatchedNuclei, model_threshold: float = 0.5) -> dict[str, float]:
    """The threshold of each score: "lymphocyte" where the score is above it (strictly; the model: ``>=``).

    The model (when present) at ``model_threshold``; rule and area at :func:`share_threshold` of the share of
    nuclei the model calls lymphocytes. Without a model class output: the rule at 0 and area at the share of
    nuclei the rule puts above 0.
    """
    out: dict[str, float] = {}
    if matched.model is not None:
        out["model"] = float(model_threshold)
        share = float(np.mean(matched.model >= model_threshold)) if len(matched) else math.nan
        out["rule"] = share_threshold(matched.rule, share)
    else:
        out["rule"] = 0.0
        share = float(np.mean(matched.rule > 0)) if len(matched) else math.nan
    out["area"] = share_threshold(-matched.area_px, share)
    if matched.model is not None:
        out["model+rule"] = 0.0
    return out


def score_table(matched: MatchedNuclei, model_threshold: float = 0.5) -> dict[str, dict[str, Any] | None]:
    """AUROC and classification scores of each row of :data:`SCORES` on the pooled matched nuclei.

    Returns:
        ``name -> {"auroc", "threshold", "share", "tp", ..., "f1"}`` (NaN as ``None``), ``None`` for a score
        that is absent (the model without a class output).
    """
    truth = matched.truth
    cuts = thresholds(matched, model_threshold)
    table: dict[str, dict[str, Any] | None] = {}
    for name in SCORES:
        s = matched.score(name, model_threshold)
        if s is None:
            table[name] = None
            continue
        predicted = s >= cuts[name] if name == "model" else s > cuts[name]
        row = {
            "auroc": auroc(s, truth),
            "best_f1": best_f1(s, truth),
            "threshold": cuts[name],
            "share": float(predicted.mean()) if s.size else None,
        }
        table[name] = _clean(row) | classification_scores(predicted, truth).to_dict()
    return table


# ------------------------------------------------------------------------------------------------------ CLI


def _clean(value: Any) -> Any:
    """NaN and infinities → None, numpy scalars → Python ones, recursively (strict JSON)."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(value) else None
    return value


def _auroc_or_none(scores: np.ndarray | None, truth: np.ndarray) -> float | None:
    return None if scores is None else auroc(scores, truth)


def load_segmenter(spec: str, device: str = "auto") -> tuple[Any, Any]:
    """The model named ``spec`` (a folder or a shipped name, as ``--model``) on ``device``, and its description.

    Raises:
        PysynthError: If it is not a usable model, or the device is not available.
    """
    from pysynth.infer import inference_model
    from pysynth.models.io import resolve_model_dir
    from pysynth.segment import resolve_device

    dev = resolve_device(device)
    model, info = inference_model(str(resolve_model_dir(spec)))  # BatchNorm folded, channels-last
    return model.to(dev), info


def segment(model: Any, info: Any, rgb: np.ndarray, mpp: float, tta: int = 1) -> Any:
    """The nuclei of one image (:func:`pysynth.segment.segment_image`, the model's own post-processing)."""
    from pysynth.segment import segment_image

    return segment_image(model, info, rgb, mpp, tta=tta)


def _read_rgb(path: Path) -> np.ndarray:
    import cv2

    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise PysynthError(f"{path}: cannot read the image")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def collect(images_dir: Path, dots_dir: Path, split: Path | None) -> list[tuple[str, Path, Path]]:
    """``(stem, image, dot file)`` of the images to measure: all of ``images_dir``, or those ``split`` lists.

    Raises:
        PysynthError: If a folder is missing, no image is left, a split name has no image, or an image has no dot
            file.
    """
    from pysynth.cli.evaluate import _DOT_SUFFIX, _IMAGE_SUFFIXES, _index, listed, split_stems

    for what, folder in (("images", images_dir), ("dots", dots_dir)):
        if not folder.is_dir():
            raise PysynthError(f"{folder}: no such {what} folder")
    images = _index(str(images_dir), "", _IMAGE_SUFFIXES)
    stems = split_stems(split, images, "an image (.png, .tif, .jpg)", str(images_dir))
    missing = [s for s in stems if not (dots_dir / f"{s}{_DOT_SUFFIX}").is_file()]
    if missing:
        raise PysynthError(
            f"{dots_dir}: no dot file <stem>{_DOT_SUFFIX} for {len(missing)} of {len(stems)} image(s): "
            f"{listed(missing, 3)}"
        )
    return [(s, images[s], dots_dir / f"{s}{_DOT_SUFFIX}") for s in stems]


def measure(
    items: Sequence[tuple[str, Path, Path]],
    model: Any,
    info: Any,
    mpp: float,
    radius_um: float,
    *,
    tta: int = 1,
    segmenter: Callable[..., Any] | None = None,
    progress: Callable[[str], None] | None = None,
    pictures: Path | None = None,
) -> dict[str, Any]:
    """Segment, match and score every image; the whole result as a JSON-ready document.

    Images and dot files are all read and checked before the first image is segmented. With ``pictures``, each
    image's :func:`class_picture` is written there as ``<stem>_classes.png``.

    Raises:
        PysynthError: If an image or dot file cannot be used.
    """
    segmenter = segmenter or segment
    radius_px = radius_um / mpp
    loaded = []
    for stem, image_path, dot_path in items:
        rgb = _read_rgb(image_path)
        yx, classes = read_dots(dot_path, rgb.shape[:2])
        loaded.append((stem, rgb, yx, classes))
    threshold = float(getattr(info, "lymphocyte_threshold", 0.5))
    per_image: dict[str, dict[str, Any]] = {}
    detections, parts = [], []
    for stem, rgb, yx, classes in loaded:
        found = segmenter(model, info, rgb, mpp, tta=tta)
        detection, matched = match_nuclei(
            stem, found.labels, rgb, yx, classes, radius_px, mpp, getattr(found, "lymphocyte", None)
        )
        detections.append(detection)
        parts.append(matched)
        if pictures is not None:
            write_class_picture(pictures / f"{stem}_classes.png", rgb, found, yx, classes, threshold)
        truth = matched.truth
        per_image[stem] = _clean(
            {
                "detection": detection.to_dict(),
                "matched": len(matched),
                "matched_lymphocytes": int(truth.sum()),
                "auroc": {n: _auroc_or_none(matched.score(n), truth) for n in SCORES},
            }
        )
        if progress:
            d = detection
            progress(f"{stem}: {d.predicted} predicted, {d.dots} dots, {d.matched} matched ({int(truth.sum())} lymph.)")
    pooled = pool(detections)
    matched = MatchedNuclei.concatenate(parts)
    return _clean(
        {
            "input_mpp": mpp,
            "radius_um": radius_um,
            "radius_px": radius_px,
            "tta": tta,
            "model_has_lymphocyte": matched.model is not None,
            "model_threshold": threshold if matched.model is not None else None,
            "matched": len(matched),
            "matched_lymphocytes": int(matched.truth.sum()),
            "scores": score_table(matched, threshold),
            "detection": pooled.to_dict(),
            "images": per_image,
            "nuclei": matched.to_columns(),
        }
    )


#: Dot colours of :func:`class_picture` by dot class (the dataset's own: lymphocyte blue, tumour red, stromal
#: yellow).
DOT_COLOURS = {1: (0, 0, 255), 2: (255, 0, 0), 3: (255, 220, 0)}


def class_picture(
    rgb: np.ndarray,
    labels: np.ndarray,
    called: np.ndarray | None,
    dots_yx: np.ndarray,
    classes: np.ndarray,
    radius_px: int = 1,
) -> np.ndarray:
    """The image with the model's calls and the annotated classes, to look at where they disagree.

    Nucleus outlines as :func:`pysynth.segment.overlay` draws them (the model's lymphocytes in their own colour,
    every outline green without a class output); each annotated dot a filled disc in its class's
    :data:`DOT_COLOURS` with a black rim.

    Args:
        rgb: ``(h, w, 3)`` uint8 image.
        labels: ``(h, w)`` predicted instance labels.
        called: bool indexed by label (entry 0 background): the model calls it a lymphocyte; or None.
        dots_yx: ``(m, 2)`` dots ``(y, x)`` in px.
        classes: ``(m,)`` their classes.
        radius_px: Disc radius of a dot, px (small, to leave a lymphocyte's outline visible).
    """
    import cv2

    from pysynth.segment import overlay

    out = np.ascontiguousarray(overlay(rgb, labels, lymphocyte=called))
    for (y, x), c in zip(np.round(np.asarray(dots_yx)).astype(int), np.asarray(classes, int), strict=True):
        colour = DOT_COLOURS.get(int(c), (255, 255, 255))
        cv2.circle(out, (int(x), int(y)), radius_px + 1, (0, 0, 0), -1)
        cv2.circle(out, (int(x), int(y)), radius_px, colour, -1)
    return out


def write_class_picture(
    path: Path, rgb: np.ndarray, found: Any, dots_yx: np.ndarray, classes: np.ndarray, threshold: float
) -> None:
    """:func:`class_picture` of one segmented image (its calls at ``threshold``), written atomically as PNG."""
    import cv2

    from pysynth.fsutil import atomic_write_bytes

    probability = getattr(found, "lymphocyte", None)
    called = None if probability is None else np.asarray(probability, np.float64) >= threshold
    picture = class_picture(rgb, found.labels, called, dots_yx, classes)
    ok, encoded = cv2.imencode(".png", cv2.cvtColor(picture, cv2.COLOR_RGB2BGR))
    if not ok:
        raise PysynthError(f"{path}: cannot encode the picture")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, encoded.tobytes())
    except OSError as exc:
        raise PysynthError(f"{path}: cannot write ({exc.strerror or exc})") from exc


def markdown(document: dict[str, Any]) -> str:
    """The score table, the pooled detection and the counts of a :func:`measure` document, as Markdown."""

    def fmt(v: float | None) -> str:
        return "–" if v is None else f"{v:.3f}"

    lines = [
        "| score | AUROC | P | R | F1 | threshold | share | best F1 (labels' cut) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in SCORES:
        row = document["scores"][name]
        if row is None:
            lines.append(f"| {name} | n/a | n/a | n/a | n/a | | | n/a |")
            continue
        t = row["threshold"]
        cut = ("≥ " if name == "model" else "> ") + ("−inf" if t is None else f"{t:.4g}")
        lines.append(
            f"| {name} | {fmt(row['auroc'])} | {fmt(row['precision'])} | {fmt(row['recall'])} | {fmt(row['f1'])} "
            f"| {cut} | {fmt(row['share'])} | {fmt(row.get('best_f1'))} |"
        )
    d = document["detection"]
    lines.append("")
    lines.append(
        f"detection pooled over {d['images']} image(s) within {document['radius_um']:g} µm "
        f"({document['radius_px']:g} px): P {fmt(d['precision'])}, R {fmt(d['recall'])}, F1 {fmt(d['f1'])}; "
        f"{d['dots']} dots, {d['predicted']} predicted, {d['matched']} matched"
    )
    lines.append(
        f"classified: {document['matched']} matched nuclei, {document['matched_lymphocytes']} of them lymphocytes "
        f"(share {fmt(document['matched_lymphocytes'] / document['matched'] if document['matched'] else None)}); "
        + (
            f"model at its threshold {document['model_threshold']:g}, rule and area at the model's share"
            if document["model_has_lymphocyte"]
            else "the model has no lymphocyte output: rule at > 0, area at the rule's share"
        )
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: 0 on success, 1 (one ``error:`` line on stderr) on unusable input."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("images", type=Path, metavar="IMAGES", help="folder of the tiles")
    parser.add_argument("dots", type=Path, metavar="DOTS", help="folder of the <stem>_gt_class_coords.txt files")
    parser.add_argument("--input-mpp", type=float, required=True, help="µm/px of the tiles (BRCA-M2C: 0.5)")
    parser.add_argument("--model", default="default", help="model folder or shipped name [default: default]")
    parser.add_argument("--split", type=Path, default=None, help="only the images this split file lists")
    parser.add_argument("--radius-um", type=float, default=3.0, help="largest centroid-to-dot distance [3 µm]")
    parser.add_argument("--tta", type=int, default=1, choices=(1, 2, 4, 8))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", type=Path, default=None, metavar="OUT")
    parser.add_argument(
        "--pictures", type=Path, default=None, metavar="DIR", help="write each image's calls and dots there"
    )
    args = parser.parse_args(argv)
    try:
        for name, value in (("--input-mpp", args.input_mpp), ("--radius-um", args.radius_um)):
            if not (math.isfinite(value) and value > 0):
                raise PysynthError(f"{name} must be a positive number, got {value:g}")
        items = collect(args.images, args.dots, args.split)
        if args.pictures is not None:  # refused before any image is segmented
            try:
                args.pictures.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise PysynthError(f"{args.pictures}: cannot write pictures there ({exc.strerror or exc})") from exc
        model, info = load_segmenter(args.model, args.device)
        document = measure(
            items,
            model,
            info,
            args.input_mpp,
            args.radius_um,
            tta=args.tta,
            pictures=args.pictures,
            progress=lambda line: print(line, file=sys.stderr, flush=True),
        )
    except PysynthError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    document = {
        "images_dir": str(args.images),
        "dots_dir": str(args.dots),
        "split": None if args.split is None else str(args.split),
        "model": args.model,
        **document,
    }
    print(markdown(document))
    if args.json is not None:
        from pysynth.fsutil import atomic_write_text

        try:
            atomic_write_text(args.json, json.dumps(document, indent=1) + "\n")
        except OSError as exc:
            print(f"error: {args.json}: cannot write ({exc.strerror or exc})", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Dev scores of one or more models on both dev sets, in one table (measuring only: labels never train anything).

Usage::

    python -m pysynth.bench.dev_scores MODEL [MODEL ...] [--tta 1] [--min-confidence C] [--precision fp32|bf16]
        [--json OUT]
        [--monuseg ../shared/data/monuseg-train] [--brca ../shared/data/brca-m2c]

``MODEL`` is a model folder or ``default`` (the shipped model). For each model:

- MoNuSeg (40x, instance labels of 13 tiles): per-image means of DICE avg, AJI and PQ (``pysynth evaluate``'s
  definitions), and pooled pixel precision/recall and false-object share (``pysynth evaluate --errors``' rules);
- BRCA-M2C (20x, the authors' test split of 30 patches, a dot on every annotated cell): pooled detection
  precision/recall/F1, predicted centroids matched one-to-one to dots within 3 µm (``pysynth evaluate --dots``).

Each image goes through :func:`pysynth.segment.segment_rgb` with the model's own post-processing (what ``pysynth
segment`` does), optionally with ``--tta``, a ``--min-confidence`` override and the network in bf16 autocast
(``--precision bf16``, as ``segment --precision bf16`` runs it).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _rgb(path: Path) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def score_model(
    folder: str,
    monuseg: Path,
    brca: Path,
    *,
    tta: int = 1,
    min_confidence: float | None = None,
    precision: str = "fp32",
) -> dict[str, float]:
    """The dev scores of one model (see the module's docstring)."""
    from pysynth.detection import centroids, detection_scores, pool, read_dots
    from pysynth.error_anatomy import object_errors, summarise
    from pysynth.infer import inference_model
    from pysynth.metrics import mean_scores, score
    from pysynth.models.io import resolve_model_dir
    from pysynth.segment import segment_rgb

    model, info = inference_model(str(resolve_model_dir(folder)))
    instances = info.instances if min_confidence is None else replace(info.instances, min_confidence=min_confidence)
    started = time.perf_counter()
    scores, errors = [], []
    for label_path in sorted((monuseg / "labels").glob("*.png")):
        rgb = _rgb(monuseg / "images" / label_path.name)
        gt = cv2.imread(str(label_path), cv2.IMREAD_UNCHANGED).astype(np.int32)
        pred = segment_rgb(model, info, rgb, 0.25, instances, tta=tta, precision=precision)
        scores.append(score(gt, pred))
        errors.append(object_errors(gt, pred))
    mean, pooled = mean_scores(scores), summarise(errors)
    dots = []
    for name in (brca / "brca_ds_test.txt").read_text().split():
        rgb = _rgb(brca / "images" / name)
        pred = segment_rgb(model, info, rgb, 0.5, instances, tta=tta, precision=precision)
        yx, classes = read_dots(brca / "labels" / f"{Path(name).stem}_gt_class_coords.txt", rgb.shape[:2])
        dots.append(detection_scores(centroids(pred), yx, classes, 3.0 / 0.5))
    detection = pool(dots)
    return {
        "model": folder,
        "tta": tta,
        "min_confidence": instances.min_confidence,
        **({"precision": precision} if precision != "fp32" else {}),
        "dice1": mean.dice1,
        "dice2": mean.dice2,
        "dice_avg": mean.dice_avg,
        "aji": mean.aji,
        "pq": mean.pq,
        "pixel_precision": pooled.pixel_precision,
        "pixel_recall": pooled.pixel_recall,
        "false_share": pooled.false_share,
        "brca_precision": detection.precision,
        "brca_recall": detection.recall,
        "brca_f1": detection.f1,
        "brca_lymphocyte_recall": detection.recall_per_class().get("lymphocyte", float("nan")),
        "seconds": round(time.perf_counter() - started, 1),
    }


COLUMNS = [
    ("dice_avg", "DICE avg"),
    ("aji", "AJI"),
    ("pq", "PQ"),
    ("pixel_precision", "pixel P"),
    ("pixel_recall", "pixel R"),
    ("false_share", "false share"),
    ("brca_precision", "BRCA P"),
    ("brca_recall", "BRCA R"),
    ("brca_f1", "BRCA F1"),
]


def markdown(rows: list[dict[str, float]]) -> str:
    """The rows as a Markdown table."""
    head = "| model | tta | min conf | " + " | ".join(t for _, t in COLUMNS) + " | s |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 4)]
    for r in rows:
        values = " | ".join(f"{r[k]:.3f}" for k, _ in COLUMNS)
        name = r["model"] + (f" ({r['precision']})" if "precision" in r else "")
        lines.append(f"| {name} | {r['tta']} | {r['min_confidence']:g} | {values} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--tta", type=int, default=1)
    parser.add_argument("--min-confidence", type=float, default=None)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--monuseg", type=Path, default=SHARED / "monuseg-train")
    parser.add_argument("--brca", type=Path, default=SHARED / "brca-m2c")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    rows = []
    for folder in args.models:
        kwargs = {"tta": args.tta, "min_confidence": args.min_confidence, "precision": args.precision}
        rows.append(score_model(folder, args.monuseg, args.brca, **kwargs))
        print(markdown(rows[-1:]).splitlines()[-1], flush=True)
    print(markdown(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()

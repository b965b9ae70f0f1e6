"""How often the marking-dye test (:mod:`pysynth.dye`) fires on the dev sets and on the bundled slide.

Usage::

    python -m pysynth.bench.dye [--model M] [--monuseg DIR] [--brca DIR] [--json OUT]

Measuring only (no label decides anything): the largest red/green OD ratio of MoNuSeg's annotated nuclei, and for
the model's objects (found with the dye test off, ``segment_image(drop_dye=False)``) on MoNuSeg's labelled tiles,
all of BRCA-M2C's tiles and the bundled slide, how many there are and how many reach
:data:`pysynth.dye.RED_GREEN_LIMIT`, with their largest ratio.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from pysynth.bench.dev_scores import SHARED


def _rgb(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise FileNotFoundError(f"{path}: not an image")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def object_counts(model, info, images: list[tuple[np.ndarray, float]]) -> dict[str, Any]:
    """The model's objects on ``(rgb, µm/px)`` images with the dye test off: count, at or above the limit, largest."""
    from pysynth.dye import RED_GREEN_LIMIT, red_green_od
    from pysynth.segment import segment_image

    total, dye, largest = 0, 0, 0.0
    for rgb, mpp in images:
        labels = segment_image(model, info, rgb, mpp, drop_dye=False).labels
        ratio = red_green_od(labels, rgb)[1:]
        ratio = ratio[np.bincount(labels.ravel(), minlength=len(ratio) + 1)[1:] > 0]  # labels with pixels
        total += len(ratio)
        dye += int((ratio >= RED_GREEN_LIMIT).sum())
        largest = max(largest, float(ratio.max()) if len(ratio) else 0.0)
    return {"objects": total, "at_or_above_limit": dye, "largest_ratio": round(largest, 3)}


def measure(model_name: str, monuseg: Path, brca: Path) -> dict[str, Any]:
    """Every figure of the module's docstring."""
    from pysynth import data_path
    from pysynth.dye import RED_GREEN_LIMIT, red_green_od
    from pysynth.infer import inference_model
    from pysynth.io import open_slide, read_region
    from pysynth.models.io import resolve_model_dir

    model, info = inference_model(str(resolve_model_dir(model_name)))
    labelled = sorted((monuseg / "labels").glob("*.png"))
    if not labelled or not (brca / "images").is_dir():
        raise FileNotFoundError(f"dev sets not found in {monuseg} and {brca}")
    tiles = [(_rgb(monuseg / "images" / p.name), p) for p in labelled]
    annotated = 0.0
    for rgb, path in tiles:
        gt = cv2.imread(str(path), cv2.IMREAD_UNCHANGED).astype(np.int64)
        annotated = max(annotated, float(red_green_od(gt, rgb)[1:].max()))
    with open_slide(data_path("CMU-1-Small-Region.svs")) as slide:
        h, w = slide.level_shapes_hw[0]
        bundled = read_region(slide, 0, 0, (h, w), slide.mpp), slide.mpp
    return {
        "model": model_name,
        "limit": RED_GREEN_LIMIT,
        "monuseg_annotated_largest_ratio": round(annotated, 3),
        "monuseg": object_counts(model, info, [(rgb, 0.25) for rgb, _ in tiles]),
        "brca_all_tiles": object_counts(model, info, [(_rgb(p), 0.5) for p in sorted((brca / "images").glob("*.png"))]),
        "bundled_slide": object_counts(model, info, [bundled]),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--monuseg", type=Path, default=SHARED / "monuseg-train")
    parser.add_argument("--brca", type=Path, default=SHARED / "brca-m2c")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    try:
        result = measure(args.model, args.monuseg, args.brca)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    text = json.dumps(result, indent=1, ensure_ascii=False)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

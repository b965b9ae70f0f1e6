"""Accuracy of whole-slide inference on labelled tiles: each tile is run through ``infer_slide`` as a slide.

Usage: ``python -m pysynth.bench.infer_dev IMAGES LABELS [--mpp 0.25] [--normalise reinhard,macenko,none]
[--core 2048] [--model DIR]``.

For each normalisation, every labelled tile goes through the same engine as ``pysynth infer`` (regions, colour
normalisation fitted on the tile, network, instances, polygons); its GeoJSON is rasterised back onto the tile
and scored against the labels (Dice1, Dice2, DICE avg, AJI, PQ). Prints one line per normalisation. The labels
are read only to score.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import cv2


def main(argv: list[str] | None = None) -> None:
    """Score ``infer`` on labelled tiles with each normalisation."""
    from pysynth.infer import GEOJSON, InferConfig, infer_slide, inference_model, rasterise
    from pysynth.io import ArrayReader, load_rgb
    from pysynth.metrics import mean_scores, score
    from pysynth.models.io import default_model_dir

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("images", type=Path)
    parser.add_argument("labels", type=Path)
    parser.add_argument("--mpp", type=float, default=0.25, help="µm/px of the tiles")
    parser.add_argument("--normalise", default="reinhard,macenko,none")
    parser.add_argument("--core", type=int, default=2048)
    parser.add_argument("--model", type=Path, default=None)
    args = parser.parse_args(argv)

    model, info = inference_model(str(args.model or default_model_dir()))
    pairs = []
    for label_path in sorted(args.labels.iterdir()):
        image_path = args.images / f"{label_path.stem}.png"
        if image_path.exists():
            pairs.append((label_path.stem, load_rgb(image_path), cv2.imread(str(label_path), cv2.IMREAD_UNCHANGED)))
    results = {}
    for method in args.normalise.split(","):
        config = InferConfig(core=args.core, normalise=method)
        scores = []
        with tempfile.TemporaryDirectory() as tmp:
            for stem, rgb, gt in pairs:
                out = Path(tmp) / stem
                infer_slide(ArrayReader(rgb, args.mpp, name=stem), model, info, out, config=config, model_id="dev")
                features = json.loads((out / GEOJSON).read_text())["features"]
                scores.append(score(gt, rasterise(features, gt.shape)))
        s = mean_scores(scores)
        results[method] = s.to_dict()
        print(
            f"{method:9s} Dice1 {s.dice1:.4f}  Dice2 {s.dice2:.4f}  DICE avg {s.dice_avg:.4f}  AJI {s.aji:.4f}  "
            f"PQ {s.pq:.4f}  ({len(pairs)} tiles)",
            flush=True,
        )
    print(json.dumps(results))


if __name__ == "__main__":
    main()

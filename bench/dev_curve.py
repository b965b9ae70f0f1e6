"""Dev metrics as training proceeds: every weight snapshot of a `pysynth train` run, scored on labelled images.

Usage: ``python -m pysynth.bench.dev_curve RUN_DIR IMAGES_DIR LABELS_DIR [--mpp 0.25]``.

For each ``RUN_DIR/snapshots/step_*.pt`` (and the final model) the post-processing thresholds are chosen the way
training chooses them, on held-out synthetic patches, never on the labels; the labels are read only to score.
Writes ``RUN_DIR/dev_curve.json`` and ``RUN_DIR/dev_curve.png`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import cv2
import numpy as np
import torch


def main(argv: list[str] | None = None) -> None:
    """Score each snapshot of a run on the labelled images."""
    from pysynth.fsutil import atomic_write_bytes, atomic_write_text
    from pysynth.instances import InstanceConfig
    from pysynth.io import load_rgb
    from pysynth.metrics import mean_scores, score
    from pysynth.models.io import load_model
    from pysynth.models.unet import UNet
    from pysynth.segment import segment_rgb
    from pysynth.train.config import TrainConfig
    from pysynth.train.loop import VAL_OFFSET, ItemMaker, choose_thresholds, make_source, predict_batch
    from pysynth.viz import line_plot

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("images", type=Path)
    parser.add_argument("labels", type=Path)
    parser.add_argument("--mpp", type=float, default=0.25, help="µm/px of the images")
    parser.add_argument("--val", type=int, default=48, help="held-out synthetic patches for the thresholds")
    args = parser.parse_args(argv)

    import yaml

    from pysynth.models.io import ModelInfo

    config = TrainConfig.from_dict(yaml.safe_load((args.run / "config.yaml").read_text()))
    finished = (args.run / "model.json").exists()
    info = load_model(args.run)[1] if finished else ModelInfo(config.model, config.synth.mpp, InstanceConfig(), {})
    maker = ItemMaker(make_source(config, args.run), config)
    val = [maker(VAL_OFFSET + k) for k in range(args.val)]
    pairs = []
    for label_path in sorted(args.labels.iterdir()):
        image_path = args.images / f"{label_path.stem}.png"
        if image_path.exists():
            pairs.append((load_rgb(image_path), cv2.imread(str(label_path), cv2.IMREAD_UNCHANGED)))
    snapshots = sorted((args.run / "snapshots").glob("step_*.pt"))
    rows = []
    for path in [*snapshots, *([args.run / "model.pt"] if finished else [])]:
        model = UNet(info.unet).eval()
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        if path.name == "model.pt":
            step, chosen = int(info.extra["steps"]), info.instances
        else:
            step = int(path.stem.split("_")[1])
            maps = np.concatenate(
                [predict_batch(model, np.stack([v["image"] for v in val[k : k + 16]])) for k in range(0, len(val), 16)]
            )
            chosen, _ = choose_thresholds(maps, [v["labels"] for v in val], InstanceConfig())
        s = mean_scores([score(gt, segment_rgb(model, info, rgb, args.mpp, chosen)) for rgb, gt in pairs])
        row = {
            "step": step,
            "detection_threshold": chosen.detection_threshold,
            "foreground_threshold": chosen.foreground_threshold,
            "detection_sigma": chosen.detection_sigma,
            "min_size": chosen.min_size,
            **s.to_dict(),
        }
        rows.append(row)
        print(
            f"step {step:6d}  Dice1 {s.dice1:.4f}  Dice2 {s.dice2:.4f}  DICE avg {s.dice_avg:.4f}  AJI {s.aji:.4f}  "
            f"PQ {s.pq:.4f}  (seed {chosen.detection_threshold}, fg {chosen.foreground_threshold}, "
            f"sigma {chosen.detection_sigma}, min {chosen.min_size})",
            flush=True,
        )
    atomic_write_text(args.run / "dev_curve.json", json.dumps(rows, indent=1) + "\n")
    steps = np.array([r["step"] for r in rows], np.float64)
    plot = line_plot(
        steps,
        {k: np.array([r[k] for r in rows]) for k in ("dice1", "dice_avg", "aji", "pq")},
        title=f"dev metrics ({len(pairs)} labelled images) as training proceeds",
        xlabel="step",
    )
    atomic_write_bytes(
        args.run / "dev_curve.png", cv2.imencode(".png", cv2.cvtColor(plot, cv2.COLOR_RGB2BGR))[1].tobytes()
    )


if __name__ == "__main__":
    main()

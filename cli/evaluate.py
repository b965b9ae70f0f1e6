"""``pysynth evaluate``: Dice1, Dice2, DICE avg, AJI and PQ of predicted label maps against ground truth."""

from __future__ import annotations

import click

_SUFFIXES = (".png", ".tif", ".tiff")


@click.command("evaluate")
@click.option(
    "--pred",
    "pred_dir",
    type=click.Path(exists=True, file_okay=False),
    required=True,
    metavar="DIR",
    help="Predictions: <stem>_labels.png/.tif (as `pysynth segment` writes them).",
)
@click.option(
    "--gt",
    "gt_dir",
    type=click.Path(exists=True, file_okay=False),
    required=True,
    metavar="DIR",
    help="Ground truth: <stem>.png/.tif instance label maps (0 = background).",
)
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Also write scores here.")
def evaluate_command(pred_dir: str, gt_dir: str, json_path: str | None) -> int:
    """Score predicted instance label maps against ground-truth ones, image by image, and their means.

    Every ground-truth map needs a prediction; predictions without ground truth are left out (with a note).
    """
    import json
    from pathlib import Path

    import cv2

    from pysynth.errors import PysynthError
    from pysynth.fsutil import atomic_write_text
    from pysynth.metrics import mean_scores, score

    def index(folder: str, strip: str) -> dict[str, Path]:
        found = {}
        for path in sorted(Path(folder).iterdir()):
            if path.suffix.lower() in _SUFFIXES and path.stem.endswith(strip):
                found[path.stem[: len(path.stem) - len(strip)] if strip else path.stem] = path
        return found

    preds, gts = index(pred_dir, "_labels"), index(gt_dir, "")
    missing, extra = sorted(set(gts) - set(preds)), sorted(set(preds) - set(gts))
    if not gts:
        raise PysynthError(f"{gt_dir}: no label maps (<stem>.png or .tif)")
    if missing:
        listed = f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}"
        raise PysynthError(f"{pred_dir} and {gt_dir} do not pair up: no prediction for {listed}")
    if extra:  # predictions of unlabelled images (e.g. a whole folder was segmented): not scored, said once
        click.echo(f"note: {len(extra)} prediction(s) without ground truth are not scored", err=True)

    def load(path: Path):
        image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if image is None or image.ndim != 2:
            raise PysynthError(f"{path}: not a single-channel label map")
        return image

    rows, per_image = [], {}
    for stem in sorted(gts):
        gt, pred = load(gts[stem]), load(preds[stem])
        if gt.shape != pred.shape:
            raise PysynthError(f"{preds[stem]}: shape {pred.shape} differs from the ground truth's {gt.shape}")
        s = score(gt, pred)
        per_image[stem] = s.to_dict()
        rows.append((stem, s))
    mean = mean_scores([s for _, s in rows])
    header = ["image", "Dice1", "Dice2", "DICE avg", "AJI", "PQ"]
    table = [[stem, *(f"{v:.4f}" for v in (s.dice1, s.dice2, s.dice_avg, s.aji, s.pq))] for stem, s in rows]
    table.append(
        [f"mean of {len(rows)}", *(f"{v:.4f}" for v in (mean.dice1, mean.dice2, mean.dice_avg, mean.aji, mean.pq))]
    )
    widths = [max(len(r[i]) for r in [header, *table]) for i in range(len(header))]
    for row in [header, *table]:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
    if json_path:
        atomic_write_text(json_path, json.dumps({"images": per_image, "mean": mean.to_dict()}, indent=2))
    return 0

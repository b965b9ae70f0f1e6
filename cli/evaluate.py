"""``pysynth evaluate``: segmentation scores against label maps (with an error anatomy), or detection against dots."""

from __future__ import annotations

from pathlib import Path

import click

from pysynth.cli._options import FiniteFloatRange

_SUFFIXES = (".png", ".tif", ".tiff")
_IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg")
_DOT_SUFFIX = "_gt_class_coords.txt"


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
    default=None,
    metavar="DIR",
    help="Ground truth: <stem>.png/.tif instance label maps (0 = background).",
)
@click.option(
    "--errors",
    "errors_dir",
    type=click.Path(file_okay=False),
    default=None,
    metavar="DIR",
    help="With --gt: write the error anatomy here: <stem>_errors.png overlays (green matched, red false objects, "
    "cyan missed nuclei, yellow other predictions), errors.csv and errors.json.",
)
@click.option(
    "--images",
    "images_dir",
    type=click.Path(exists=True, file_okay=False),
    default=None,
    metavar="DIR",
    help="With --errors: the RGB images (<stem>.png/.tif/.jpg) to draw on and to measure hematoxylin density "
    "in [default: a grey background, no densities].",
)
@click.option(
    "--dots",
    "dots_dir",
    type=click.Path(exists=True, file_okay=False),
    default=None,
    metavar="DIR",
    help=f"Instead of --gt: score detection against dot files <stem>{_DOT_SUFFIX} ('y x class' rows, class "
    "1 lymphocyte, 2 tumour, 3 stromal), one-to-one within --radius-um of the predictions' centroids.",
)
@click.option(
    "--mpp",
    type=FiniteFloatRange(min=0, min_open=True),
    default=None,
    metavar="UM",
    help="With --dots: resolution of the images, dots and label maps in µm/px (BRCA-M2C: 0.5).",
)
@click.option(
    "--radius-um",
    type=FiniteFloatRange(min=0, min_open=True),
    default=None,
    metavar="UM",
    help="With --dots: largest centroid-to-dot distance of a match, in µm [default: 3].",
)
@click.option(
    "--split",
    "split_file",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    metavar="FILE",
    help="Score only the images listed here, one file name per line (e.g. brca_ds_test.txt).",
)
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Also write scores here.")
def evaluate_command(
    pred_dir: str,
    gt_dir: str | None,
    errors_dir: str | None,
    images_dir: str | None,
    dots_dir: str | None,
    mpp: float | None,
    radius_um: float | None,
    split_file: str | None,
    json_path: str | None,
) -> int:
    """Score predicted instance label maps against ground-truth maps (--gt) or dot annotations (--dots).

    With --gt: Dice1, Dice2, DICE avg, AJI and PQ image by image and their means; --errors adds the error
    anatomy (false objects, missed nuclei, splits, merges, pixel precision and recall). With --dots: detection
    precision, recall and F1 per image and pooled, and recall per dot class. Every annotated image (of --split,
    if given) needs a prediction; predictions without annotation are left out (with a note).
    """
    if (gt_dir is None) == (dots_dir is None):
        raise click.UsageError("give exactly one of --gt (label maps) and --dots (dot annotations)")
    if dots_dir is not None:
        for name, value in (("--errors", errors_dir), ("--images", images_dir)):
            if value is not None:
                raise click.UsageError(f"{name} goes with --gt, not --dots")
        if mpp is None:
            raise click.UsageError("--dots needs --mpp, the images' resolution in µm/px (BRCA-M2C: 0.5)")
        return _evaluate_dots(pred_dir, dots_dir, mpp, 3.0 if radius_um is None else radius_um, split_file, json_path)
    for name, value in (("--mpp", mpp), ("--radius-um", radius_um)):
        if value is not None:
            raise click.UsageError(f"{name} goes with --dots, not --gt")
    if images_dir is not None and errors_dir is None:
        raise click.UsageError("--images goes with --errors (the overlays are drawn on them)")
    return _evaluate_labels(pred_dir, gt_dir, errors_dir, images_dir, split_file, json_path)


def _index(folder: str, strip: str, suffixes: tuple[str, ...] = _SUFFIXES) -> dict[str, Path]:
    """``stem -> file`` of the files in ``folder`` ending in ``strip`` + one of ``suffixes`` (first suffix wins)."""
    found: dict[str, Path] = {}
    for path in sorted(Path(folder).iterdir(), key=lambda p: (p.name.lower(), p.name)):
        if path.suffix.lower() in suffixes and path.stem.endswith(strip):
            stem = path.stem[: len(path.stem) - len(strip)] if strip else path.stem
            best = found.get(stem)
            if best is None or suffixes.index(path.suffix.lower()) < suffixes.index(best.suffix.lower()):
                found[stem] = path
    return found


def _read_split(path: str) -> list[str]:
    """Stems of the images listed in a split file (one file name per line; blank lines and ``#`` ignored)."""
    from pysynth.errors import PysynthError

    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise PysynthError(f"{path}: cannot read split file ({getattr(exc, 'strerror', None) or exc})") from None
    stems = []
    for line in lines:
        name = line.strip()
        if not name or name.startswith("#"):
            continue
        name = Path(name).name
        stems.append(name[: -len(Path(name).suffix)] if Path(name).suffix.lower() in _IMAGE_SUFFIXES else name)
    if not stems:
        raise PysynthError(f"{path}: split file lists no images")
    return stems


def listed(names: list[str], most: int = 5) -> str:
    """Up to ``most`` names joined by commas, ``...`` when there are more (for one-line errors)."""
    return f"{', '.join(names[:most])}{' ...' if len(names) > most else ''}"


def split_stems(split_file: str | Path | None, available: dict[str, Path], what: str, where: str) -> list[str]:
    """The stems to use: those a split file lists (each must be in ``available``), or all of ``available``.

    Raises:
        PysynthError: If a listed stem is not available (none of them: said so), or nothing is available.
    """
    from pysynth.errors import PysynthError

    if split_file is not None:
        stems = sorted(set(_read_split(str(split_file))))
        lacking = [s for s in stems if s not in available]
        if lacking and len(lacking) == len(stems):
            raise PysynthError(f"{split_file}: no {what} in {where} for any of its {len(stems)} image(s)")
        if lacking:
            raise PysynthError(f"{split_file}: no {what} in {where} for {listed(lacking)}")
        return stems
    stems = sorted(available)
    if not stems:
        raise PysynthError(f"{where}: no {what}")
    return stems


def _select(
    annotated: dict[str, Path],
    preds: dict[str, Path],
    what: str,
    noun: str,
    where: str,
    pred_dir: str,
    split_file: str | None,
) -> list[str]:
    """The stems to score: every annotated one (of the split), each of which must have a prediction."""
    from pysynth.errors import PysynthError

    stems = split_stems(split_file, annotated, what, where)
    missing = [s for s in stems if s not in preds]
    if missing:
        raise PysynthError(
            f"{pred_dir} and {where} do not pair up: no prediction for {listed(missing)} ({len(missing)} of "
            f"{len(stems)} image(s) with {noun}{'' if split_file else '; --split FILE scores a subset'})"
        )
    extra = sorted(set(preds) - set(stems))
    if extra:  # predictions of unlabelled images (e.g. a whole folder was segmented): not scored, said once
        why = f"outside the split or without {noun}" if split_file is not None else f"without {noun}"
        click.echo(f"note: {len(extra)} prediction(s) {why} are not scored", err=True)
    return stems


def _load_labels(path: Path):
    import cv2

    from pysynth.errors import PysynthError

    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None or image.ndim != 2:
        raise PysynthError(f"{path}: not a single-channel label map")
    return image


def _load_rgb(path: Path, shape: tuple[int, ...]):
    import cv2

    from pysynth.errors import PysynthError

    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise PysynthError(f"{path}: cannot read the image")
    if image.shape[:2] != tuple(shape):
        raise PysynthError(
            f"{path}: image size {image.shape[1]}×{image.shape[0]} differs from the label maps' {shape[1]}×{shape[0]}"
        )
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def _fmt(value: float) -> str:
    return "-" if value != value else f"{value:.4f}"  # NaN: no denominator


def _echo_table(header: list[str], table: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in [header, *table]) for i in range(len(header))]
    for row in [header, *table]:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def _evaluate_labels(
    pred_dir: str,
    gt_dir: str,
    errors_dir: str | None,
    images_dir: str | None,
    split_file: str | None,
    json_path: str | None,
) -> int:
    import json

    from pysynth.errors import PysynthError
    from pysynth.fsutil import atomic_write_text
    from pysynth.metrics import mean_scores, score

    preds, gts = _index(pred_dir, "_labels"), _index(gt_dir, "")
    stems = _select(gts, preds, "label maps (<stem>.png or .tif)", "ground truth", gt_dir, pred_dir, split_file)
    images: dict[str, Path] = {}
    if images_dir is not None:
        images = _index(images_dir, "", _IMAGE_SUFFIXES)
        lacking = [s for s in stems if s not in images]
        if lacking:
            raise PysynthError(f"{images_dir}: no image <stem>.png/.tif/.jpg for {', '.join(lacking[:5])}")
    out_dir = None
    if errors_dir is not None:
        from pysynth.fsutil import prepare_output_dir

        out_dir = prepare_output_dir(errors_dir)

    rows, per_image, anatomy = [], {}, {}
    for stem in stems:
        gt, pred = _load_labels(gts[stem]), _load_labels(preds[stem])
        if gt.shape != pred.shape:
            raise PysynthError(f"{preds[stem]}: shape {pred.shape} differs from the ground truth's {gt.shape}")
        s = score(gt, pred)
        per_image[stem] = s.to_dict()
        rows.append((stem, s))
        if out_dir is not None:
            rgb = _load_rgb(images[stem], gt.shape) if stem in images else None
            anatomy[stem] = _write_overlay(out_dir, stem, gt, pred, rgb)
    mean = mean_scores([s for _, s in rows])
    header = ["image", "Dice1", "Dice2", "DICE avg", "AJI", "PQ"]
    table = [[stem, *(f"{v:.4f}" for v in (s.dice1, s.dice2, s.dice_avg, s.aji, s.pq))] for stem, s in rows]
    table.append(
        [f"mean of {len(rows)}", *(f"{v:.4f}" for v in (mean.dice1, mean.dice2, mean.dice_avg, mean.aji, mean.pq))]
    )
    _echo_table(header, table)
    if out_dir is not None:
        _write_anatomy(out_dir, anatomy)
    if json_path:
        atomic_write_text(json_path, json.dumps({"images": per_image, "mean": mean.to_dict()}, indent=2))
    return 0


def _write_overlay(out_dir: Path, stem: str, gt, pred, rgb):
    """Error overlay of one image into ``out_dir``; returns the image's per-object verdicts."""
    import cv2

    from pysynth.error_anatomy import error_overlay, object_errors
    from pysynth.fsutil import atomic_write_bytes

    errors = object_errors(gt, pred, rgb)
    picture = cv2.cvtColor(error_overlay(gt, pred, rgb, errors), cv2.COLOR_RGB2BGR)
    atomic_write_bytes(out_dir / f"{stem}_errors.png", cv2.imencode(".png", picture)[1].tobytes())
    return errors


def _csv_value(value) -> str:
    if value is None:  # NaN: no denominator, or no image for the densities
        return ""
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def _write_anatomy(out_dir: Path, anatomy: dict) -> None:
    """errors.csv (one row per image), errors.json (per image and pooled) and the pooled summary line."""
    import csv
    import io
    import json

    from pysynth import error_anatomy as ea
    from pysynth.fsutil import atomic_write_text

    per_image = {stem: ea.summarise(errors) for stem, errors in anatomy.items()}
    pooled = ea.summarise(list(anatomy.values()))
    fields = [k for k in pooled.to_dict() if k != "images"]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["image", *fields])
    for stem, summary in per_image.items():
        values = summary.to_dict()
        writer.writerow([stem, *(_csv_value(values[k]) for k in fields)])
    atomic_write_text(out_dir / "errors.csv", buffer.getvalue())
    document = {
        "rules": {
            "cover": ea.COVER,
            "false_object": "prediction overlapping ground-truth foreground for < cover of its own area",
            "missed_nucleus": "ground-truth object covered by predicted foreground for < cover of its area",
            "split": "ground-truth object of which >= 2 predictions each hold >= cover of its area",
            "merge": "prediction holding >= cover of the area of each of >= 2 ground-truth objects",
            "matched": "one-to-one pairs at IoU > 0.5 (as PQ)",
            "pooled": "counts summed over images; rates and medians of the sums (micro-averages)",
        },
        "overlay_colours": {"matched": "green", "false": "red (filled)", "missed": "cyan", "other": "yellow"},
        "images": {stem: summary.to_dict() for stem, summary in per_image.items()},
        "pooled": pooled.to_dict(),
    }
    atomic_write_text(out_dir / "errors.json", json.dumps(document, indent=2))
    p = pooled
    click.echo(
        f"errors, pooled over {p.images} image(s): pixel precision {_fmt(p.pixel_precision)}, recall "
        f"{_fmt(p.pixel_recall)}; {p.pred_objects} predicted, {p.false_objects} false (share {_fmt(p.false_share)}), "
        f"{p.matched} matched; {p.missed_nuclei} of {p.gt_objects} nuclei missed; {p.splits} splits, "
        f"{p.merges} merges; overlays, errors.csv and errors.json in {out_dir}"
    )


def _evaluate_dots(
    pred_dir: str, dots_dir: str, mpp: float, radius_um: float, split_file: str | None, json_path: str | None
) -> int:
    import json

    import numpy as np

    from pysynth.detection import DOT_CLASSES, centroids, detection_scores, pool, read_dots
    from pysynth.fsutil import atomic_write_text

    preds = _index(pred_dir, "_labels")
    dots = {
        p.name[: -len(_DOT_SUFFIX)]: p
        for p in sorted(Path(dots_dir).iterdir())
        if p.name.endswith(_DOT_SUFFIX) and p.is_file()
    }
    stems = _select(dots, preds, f"dot files (<stem>{_DOT_SUFFIX})", "dots", dots_dir, pred_dir, split_file)
    radius_px = radius_um / mpp
    per_image = {}
    for stem in stems:
        labels = _load_labels(preds[stem])
        yx, classes = read_dots(dots[stem], labels.shape)
        per_image[stem] = detection_scores(centroids(labels), yx, classes, radius_px)
    pooled = pool(list(per_image.values()))
    names = list(DOT_CLASSES.values())
    header = ["image", "dots", "pred", "matched", "P", "R", "F1", *(f"R {n}" for n in names)]

    def row(name: str, s) -> list[str]:
        per_class = s.recall_per_class()
        counts = (str(s.dots), str(s.predicted), str(s.matched))
        return [name, *counts, *(_fmt(v) for v in (s.precision, s.recall, s.f1, *(per_class[n] for n in names)))]

    table = [row(stem, s) for stem, s in per_image.items()]
    table.append(row(f"pooled ({len(per_image)})", pooled))
    _echo_table(header, table)
    click.echo(f"detection within {radius_um:g} µm ({radius_px:g} px at {mpp:g} µm/px); pooled = counts summed")
    if json_path:

        def mean(key: str) -> float | None:
            values = [getattr(s, key) for s in per_image.values()]
            values = [v for v in values if v == v]
            return float(np.mean(values)) if values else None

        document = {
            "radius_um": radius_um,
            "mpp": mpp,
            "radius_px": radius_px,
            "images": {stem: s.to_dict() for stem, s in per_image.items()},
            "pooled": pooled.to_dict(),
            "mean_per_image": {k: mean(k) for k in ("precision", "recall", "f1")},
        }
        atomic_write_text(json_path, json.dumps(document, indent=2))
    return 0

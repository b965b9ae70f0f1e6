"""``pysynth segment``: nucleus instances in images (labels, GeoJSON polygons, overlay) with a trained model."""

from __future__ import annotations

import click

from pysynth.cli._options import (
    device_option,
    input_mpp_option,
    keep_dye_option,
    lymphocyte_call_option,
    lymphocyte_threshold_option,
    min_confidence_option,
    model_option,
    out_option,
    precision_option,
    resolve_precision,
    setup_logging,
    tta_option,
)


@click.command("segment")
@click.argument("images", nargs=-1, required=True, metavar="IMAGES...")
@model_option
@input_mpp_option
@out_option
@tta_option
@min_confidence_option
@lymphocyte_threshold_option
@lymphocyte_call_option
@keep_dye_option
@device_option
@precision_option
@click.option(
    "--overwrite",
    is_flag=True,
    help="Redo results in --out made from other input content, with another model or other settings, or that "
    "the folder has no record of (without it they are kept and refused).",
)
def segment_command(
    images: tuple[str, ...],
    model_dir: str | None,
    input_mpp: float | None,
    out_dir: str,
    tta: int,
    min_confidence: float | None,
    lymphocyte_threshold: float | None,
    lymphocyte_call: str,
    keep_dye: bool,
    device: str,
    precision: str,
    overwrite: bool,
) -> int:
    """Segment nuclei in images or small slides; writes <stem>_labels.png, <stem>.geojson, <stem>_overlay.png.

    Labels are 16-bit PNGs at the input's own size (32-bit TIFF above 65,535 nuclei); polygons are in the
    input's pixel coordinates, each with the measurements Confidence (mean segmentation probability over the
    nucleus) and Detection peak (its highest detection probability). The network sees each image as `pysynth
    infer` sees a slide (one pass up to 2,048 px at the model's resolution, beyond that 2,048 px cores with
    128 px of context), so both give the same nuclei. --out records what made each result
    (.pysynth-ledger.jsonl): a rerun keeps results of the same input content and settings, makes missing ones, and
    refuses (exit 1, results kept) or with --overwrite redoes the others. Images that share a stem are named by
    their folders (case17/HE.png -> case17_HE), the same whatever the order on the command line.
    """
    import time
    from dataclasses import replace

    from tqdm import tqdm

    from pysynth.dye import RED_GREEN_LIMIT
    from pysynth.errors import PysynthError, SlideError
    from pysynth.fsutil import prepare_output_dir
    from pysynth.infer import inference_model, keep_freed_memory
    from pysynth.io import open_slide, read_region
    from pysynth.ledger import Ledger, file_identity
    from pysynth.models.io import model_digest, resolve_model_dir
    from pysynth.segment import MAX_PIXELS, output_paths, resolve_device, segment_image, write_outputs
    from pysynth.sources import collect_sources
    from pysynth.table import TABLE_VERSION

    setup_logging()
    keep_freed_memory()  # the network's large activations are reused, not mapped afresh (infer does the same)
    paths = collect_sources(images)
    folder = resolve_model_dir(model_dir)
    model, info = inference_model(str(folder))  # loaded, BatchNorm folded and channels-last, as infer runs it
    dev = resolve_device(device)
    model = model.to(dev)
    precision = resolve_precision(precision, dev.type)
    instances = info.instances if min_confidence is None else replace(info.instances, min_confidence=min_confidence)
    if lymphocyte_threshold is not None and not info.has_classes:
        raise click.UsageError(f"--lymphocyte-threshold: the model {folder} has no class output (lymphocytes)")
    if lymphocyte_call != "probability" and not info.has_classes:
        raise click.UsageError(f"--lymphocyte-call: the model {folder} has no class output (lymphocytes)")
    threshold = info.lymphocyte_threshold if lymphocyte_threshold is None else lymphocyte_threshold
    run_settings = {
        "model": model_digest(folder),
        "tta": tta,
        "min_confidence": instances.min_confidence,
        "precision": precision,
        # The per-nucleus table's version: images segmented before the table (or with another) are redone with
        # --overwrite, not kept without one.
        "table": TABLE_VERSION,
    }
    if info.has_classes:  # recorded only for models with a class output, so earlier folders still match
        run_settings["lymphocyte_threshold"] = threshold
    if lymphocyte_call != "probability":  # recorded only when not the default, so earlier folders still match
        run_settings["lymphocyte_call"] = lymphocyte_call
    if keep_dye:  # likewise
        run_settings["keep_dye"] = True
    else:  # images segmented before the dye filter are redone with --overwrite, not mixed with these
        run_settings["dye_red_green_limit"] = RED_GREEN_LIMIT
    out = prepare_output_dir(out_dir)

    failures, refused, done, skipped, nuclei, pixels, seconds = [], [], 0, 0, 0, 0, 0.0
    lymphocytes = 0
    with Ledger(out, "segment", {**run_settings, "input_mpp": input_mpp}) as ledger:
        names = ledger.names(paths)
        for path, stem in tqdm(list(zip(paths, names, strict=True)), desc="segment", unit="image", dynamic_ncols=True):
            candidates = [f for n in (0, 70000) for f in output_paths(out, stem, n)]
            try:
                identity = file_identity(path)
                with open_slide(path, input_mpp) as reader:
                    settings = {**run_settings, "input_mpp": reader.mpp}  # the µm/px the image was read at
                    verdict = ledger.verdict(stem, identity, settings, candidates, overwrite=overwrite)
                    if verdict.action == "keep":
                        skipped += 1
                        continue
                    if verdict.action == "refuse":
                        refused.append(f"{path}: {verdict.reason}")
                        continue
                    h, w = reader.level_shapes_hw[0]
                    if h * w * (reader.mpp / info.mpp) ** 2 > MAX_PIXELS:
                        raise SlideError(path, f"{w}×{h} px is a whole slide: too large for segment (use infer)")
                    rgb = read_region(reader, 0, 0, (h, w), reader.mpp)
                    mpp = reader.mpp
                started = time.perf_counter()
                found = segment_image(
                    model, info, rgb, mpp, instances, precision=precision, tta=tta, drop_dye=not keep_dye
                )
                seconds += time.perf_counter() - started
            except SlideError as exc:
                failures.append(str(exc))
                continue
            except PysynthError as exc:
                failures.append(f"{path}: {exc}")
                continue
            stale = ledger.outputs_of(stem)
            written = write_outputs(
                out, stem, rgb, found, mpp=mpp, lymphocyte_threshold=threshold, lymphocyte_call=lymphocyte_call
            )
            for old in set(stale) - set(written):  # e.g. a 16-bit PNG replaced by a 32-bit TIFF on a redo
                old.unlink(missing_ok=True)
            ledger.record(stem, identity, settings, written, nuclei=found.count)
            done += 1
            nuclei += found.count
            if found.lymphocyte is not None:
                lymphocytes += int((found.lymphocyte[1:] >= threshold).sum())
            pixels += found.labels.size * (mpp / info.mpp) ** 2  # pixels the network saw, at the model's resolution
        ledger.run.update(done=done, kept=skipped, refused=len(refused), failed=len(failures))
    rate = f", {pixels / seconds / 1e6:.2f} Mpx/s at {info.mpp:g} µm/px" if seconds > 0 else ""
    click.echo(
        f"segmented {done} image(s), {nuclei} nuclei"
        + (f" ({lymphocytes} lymphocytes)" if info.has_classes else "")
        + rate
        + (f"; {skipped} already done" if skipped else "")
        + f"; results in {out}"
    )
    for message in refused + failures:
        click.echo(f"error: {message}", err=True)
    if refused:
        click.echo(f"error: {len(refused)} of {len(paths)} input(s) refused (results kept as they are)", err=True)
    if failures:
        click.echo(f"error: {len(failures)} of {len(paths)} input(s) failed", err=True)
    return 1 if failures or refused else 0

"""``pysynth segment``: nucleus instances in images (labels, GeoJSON polygons, overlay) with a trained model."""

from __future__ import annotations

import click

from pysynth.cli._options import (
    device_option,
    input_mpp_option,
    out_option,
    precision_option,
    resolve_precision,
    setup_logging,
)

_SETTINGS = ".pysynth-segment.json"


@click.command("segment")
@click.argument("images", nargs=-1, required=True, metavar="IMAGES...")
@click.option(
    "--model",
    "model_dir",
    type=click.Path(file_okay=False),
    default=None,
    metavar="DIR",
    help="Model folder from `pysynth train` [default: the model shipped with pysynth].",
)
@input_mpp_option
@out_option
@device_option
@precision_option
@click.option("--overwrite", is_flag=True, help="Replace results in --out made with another model.")
def segment_command(
    images: tuple[str, ...],
    model_dir: str | None,
    input_mpp: float | None,
    out_dir: str,
    device: str,
    precision: str,
    overwrite: bool,
) -> int:
    """Segment nuclei in images or small slides; writes <stem>_labels.png, <stem>.geojson, <stem>_overlay.png.

    Labels are 16-bit PNGs at the input's own size (32-bit TIFF above 65,535 nuclei); polygons are in the
    input's pixel coordinates. Images already finished in --out by the same model are skipped.
    """
    import json
    import time

    import torch
    from tqdm import tqdm

    from pysynth.errors import PysynthError, SlideError
    from pysynth.fsutil import atomic_write_text, prepare_output_dir
    from pysynth.io import open_slide, read_region
    from pysynth.models.io import default_model_dir, load_model, model_digest
    from pysynth.models.unet import fold_batchnorm
    from pysynth.segment import MAX_PIXELS, output_paths, resolve_device, segment_rgb, write_outputs
    from pysynth.sources import collect_sources, unique_names

    setup_logging()
    paths = collect_sources(images)
    folder = default_model_dir() if model_dir is None else model_dir
    model, info = load_model(folder)
    dev = resolve_device(device)
    model = fold_batchnorm(model).to(dev).to(memory_format=torch.channels_last)
    precision = resolve_precision(precision, dev.type)
    settings = {"model": model_digest(folder)}
    out = prepare_output_dir(out_dir)
    settings_path = out / _SETTINGS
    if settings_path.exists() and not overwrite:
        try:
            old = json.loads(settings_path.read_text())
        except ValueError:
            old = None
        if old != settings:
            raise PysynthError(
                f"{out}: holds results of another model; use another --out, or --overwrite to replace them"
            )
    atomic_write_text(settings_path, json.dumps(settings) + "\n")

    failures, done, skipped, nuclei, pixels, seconds = [], 0, 0, 0, 0, 0.0
    for path, stem in tqdm(
        list(zip(paths, unique_names(paths), strict=True)), desc="segment", unit="image", dynamic_ncols=True
    ):
        finished = [output_paths(out, stem, n) for n in (0, 70000)]
        if not overwrite and any(p.labels.exists() and p.geojson.exists() and p.overlay.exists() for p in finished):
            skipped += 1
            continue
        try:
            with open_slide(path, input_mpp) as reader:
                h, w = reader.level_shapes_hw[0]
                if h * w * (reader.mpp / info.mpp) ** 2 > MAX_PIXELS:
                    raise SlideError(path, f"{w}×{h} px is a whole slide: too large for segment (use infer)")
                rgb = read_region(reader, 0, 0, (h, w), reader.mpp)
                mpp = reader.mpp
            started = time.perf_counter()
            labels = segment_rgb(model, info, rgb, mpp, precision=precision)
            seconds += time.perf_counter() - started
        except SlideError as exc:
            failures.append(str(exc))
            continue
        except PysynthError as exc:
            failures.append(f"{path}: {exc}")
            continue
        write_outputs(out, stem, rgb, labels)
        done += 1
        nuclei += int(labels.max())
        pixels += labels.size * (mpp / info.mpp) ** 2  # pixels the network saw, at the model's resolution
    rate = f", {pixels / seconds / 1e6:.2f} Mpx/s at {info.mpp:g} µm/px" if seconds > 0 else ""
    click.echo(
        f"segmented {done} image(s), {nuclei} nuclei{rate}"
        + (f"; {skipped} already done" if skipped else "")
        + f"; results in {out}"
    )
    for message in failures:
        click.echo(f"error: {message}", err=True)
    if failures:
        click.echo(f"error: {len(failures)} of {len(paths)} input(s) failed", err=True)
        return 1
    return 0

"""``pysynth infer``: every nucleus of whole slides, as QuPath GeoJSON, CSV polygons, a summary and an overlay."""

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


@click.command("infer")
@click.argument("slides", nargs=-1, required=True, metavar="SLIDES...")
@out_option
@model_option
@input_mpp_option
@click.option(
    "--normalise",
    type=click.Choice(["none", "reinhard", "macenko"]),
    default="none",
    show_default=True,
    help="Colour normalisation to the model's reference, fitted once per slide on its tissue. none (the "
    "default): the slide's own colours, as `segment` sees images; Reinhard lowered accuracy on held-out real "
    "tissue, Macenko washes out slides with many dark nuclei.",
)
@click.option("--core", type=click.IntRange(min=64), default=2048, show_default=True, help="Region side (model px).")
@click.option(
    "--margin",
    type=click.IntRange(min=128),
    default=128,
    show_default=True,
    help="Context around each region (model px); at least 128, or nuclei on region seams are cut, moved or "
    "found twice.",
)
@click.option(
    "--tile",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="0: the network sees each region in one pass. N: cut each region's window into near-equal cores of about "
    "N px (a multiple of 16), each run with 128 px of context: the same maps bit for bit, a smaller cache "
    "footprint and less memory.",
)
@click.option(
    "--compile/--no-compile",
    "compile_network",
    default=False,
    show_default=True,
    help="Run the network through torch.compile: about 10 s per window shape once, then a 1.2x faster network on "
    "this project's 2-core CPU; end to end it pays only on slides of about a gigapixel and more. Eager where it "
    "cannot compile.",
)
@click.option(
    "--labels",
    "labels",
    type=click.Choice(["none", "ome-tiff"]),
    default="none",
    show_default=True,
    help="ome-tiff: also write labels.ome.tif per slide, a tiled pyramidal OME-TIFF of uint32 nucleus ids (the "
    "GeoJSON's and the table's) at the model's µm/px, for QuPath, napari or tifffile/zarr.",
)
@click.option(
    "--geojson",
    "geojson",
    type=click.Choice(["plain", "zip"]),
    default="plain",
    show_default=True,
    help="zip: write nuclei.geojson.zip instead of nuclei.geojson, the same GeoJSON deflated to about 15%, for "
    "big slides; QuPath's Import objects reads it as it is (it does not read .gz).",
)
@tta_option
@min_confidence_option
@lymphocyte_threshold_option
@lymphocyte_call_option
@keep_dye_option
@device_option
@precision_option
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Slides processed at once, each in its own process with cores/N threads. Results do not depend on it.",
)
@click.option(
    "--scheduler",
    default=None,
    metavar="ADDRESS",
    help="Spread each slide's regions as tasks over this Dask distributed scheduler (tcp://host:8786); the slides "
    "are planned and written here. The workers must see the slides and the model at the same paths. Needs "
    "`pip install distributed`.",
)
@click.option(
    "--overwrite", is_flag=True, help="Redo slides that are finished, or made with another model or settings."
)
def infer_command(
    slides: tuple[str, ...],
    out_dir: str,
    model_dir: str | None,
    input_mpp: float | None,
    normalise: str,
    core: int,
    margin: int,
    tile: int,
    compile_network: bool,
    labels: str,
    geojson: str,
    tta: int,
    min_confidence: float | None,
    lymphocyte_threshold: float | None,
    lymphocyte_call: str,
    keep_dye: bool,
    device: str,
    precision: str,
    workers: int,
    scheduler: str | None,
    overwrite: bool,
) -> int:
    """Segment every nucleus of whole slides (and images) into --out/<slide>/.

    Per slide: nuclei.geojson (QuPath detections: polygons in level-0 pixels, area, sub-pixel perimeter and shape,
    centroid, haematoxylin and eosin, Confidence = mean segmentation probability, Detection peak; with --geojson zip
    nuclei.geojson.zip instead), nuclei.parquet (the same nuclei as a table, same ids), report.html (a page to look
    at), csv/ (polygons per region: AreaInPixels,PhysicalSize,Polygon), overlay.png, summary.json, and with --labels
    ome-tiff labels.ome.tif (a pyramid of nucleus ids); --out/index.html lists the slides. With the defaults the
    nuclei are those `pysynth segment` finds on the same pixels. Interrupted runs resume (finished slides are
    skipped, finished regions kept; other --tta, --min-confidence or region settings are refused without
    --overwrite); Ctrl-C once stops after the current region.
    """
    import os
    import time
    from pathlib import Path

    from tqdm import tqdm

    from pysynth.errors import PysynthError
    from pysynth.fsutil import prepare_output_dir
    from pysynth.infer import SUMMARY, InferConfig, inference_model, run_slide
    from pysynth.ledger import Ledger, file_identity
    from pysynth.models.io import read_model_info, resolve_model_dir
    from pysynth.runs import StopAtStepEnd
    from pysynth.segment import resolve_device
    from pysynth.sources import collect_sources
    from pysynth.table import TABLE

    setup_logging()
    paths = collect_sources(slides)
    folder = resolve_model_dir(model_dir)
    info = read_model_info(folder)  # a folder that is not a model fails here, before anything is written
    inference_model(str(folder))  # and so do unreadable weights (kept loaded for the slides of this process)
    step = 2**info.unet.depth  # windows on the network's pooling grid, or maps differ across region seams
    for name, value in (("--core", core), ("--margin", margin)):
        if value % step:
            raise click.UsageError(
                f"{name} {value} is not a multiple of {step} (the model's pooling grid): nuclei on region seams "
                f"would differ from one pass; try {value // step * step or step}"
            )
    if lymphocyte_threshold is not None and not info.has_classes:
        raise click.UsageError(f"--lymphocyte-threshold: the model {folder} has no class output (lymphocytes)")
    if lymphocyte_call != "probability" and not info.has_classes:
        raise click.UsageError(f"--lymphocyte-call: the model {folder} has no class output (lymphocytes)")
    dev = resolve_device(device)
    precision = resolve_precision(precision, dev.type)
    try:
        config = InferConfig(
            core=core, margin=margin, tile=tile, normalise=normalise, tta=tta, min_confidence=min_confidence,
            precision=precision, compile=compile_network, lymphocyte_threshold=lymphocyte_threshold, labels=labels,
            geojson=geojson, lymphocyte_call=lymphocyte_call, keep_dye=keep_dye,
        )  # fmt: skip
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    out = prepare_output_dir(out_dir)
    started = time.perf_counter()
    run_settings = {"model": str(folder), "input_mpp": input_mpp, "config": config.record()}
    with Ledger(out, "infer", run_settings) as ledger:
        stems = ledger.names(paths)
        records: dict[str, dict] = {}
        todo: list[tuple[Path, str, bool]] = []
        identities: dict[str, dict] = {}
        for path, stem in zip(paths, stems, strict=True):
            try:
                identities[stem] = file_identity(path)
            except PysynthError as exc:
                records[stem] = {"slide": str(path), "status": "failed", "error": str(exc)}
                continue
            candidates = [out / stem / SUMMARY, out / stem / config.geojson_name]
            verdict = ledger.verdict(
                stem, identities[stem], run_settings, candidates, overwrite=overwrite, check_settings=False
            )
            if verdict.action == "refuse":
                records[stem] = {"slide": str(path), "status": "refused", "error": f"{path}: {verdict.reason}"}
            else:  # settings are checked by the slide's own summary.json (infer_slide)
                todo.append((path, stem, overwrite or verdict.action == "redo"))

        def finish(stem: str, record: dict) -> None:
            records[stem] = record
            # A finished slide is recorded once; a skipped one keeps the entry (and run) that made it.
            if record["status"] == "done" or (record["status"] == "skipped" and stem not in ledger.entries):
                slide_dir = out / stem
                ledger.record(
                    stem,
                    identities[stem],
                    run_settings,
                    [slide_dir / SUMMARY, slide_dir / config.geojson_name, slide_dir / TABLE],
                    record={k: v for k, v in record.items() if k != "status"},
                )
            if record["status"] in ("failed", "refused"):
                tqdm.write(f"error: {record['error']}")

        if scheduler is not None:
            with StopAtStepEnd() as stop:
                records_now = _on_cluster(
                    scheduler, todo, out, folder, input_mpp, device, config, stop=lambda: stop.requested
                )
            for (_, stem, _), record in zip(todo, records_now, strict=True):
                finish(stem, record)
        elif workers == 1:
            overall = tqdm(total=len(todo), desc="slides", unit="slide", dynamic_ncols=True, position=0)
            with StopAtStepEnd() as stop:
                for path, stem, redo in todo:
                    bar, progress = _region_bar(stem)
                    try:
                        record = run_slide(
                            str(path), str(out), model_dir=str(folder), input_mpp=input_mpp, device=device,
                            config=config, overwrite=redo, stem=stem, progress=progress,
                            stop=lambda: stop.requested,
                        )  # fmt: skip
                    finally:
                        bar.close()
                    finish(stem, record)
                    overall.update(1)
            overall.close()
        else:
            from concurrent.futures import ProcessPoolExecutor
            from multiprocessing import get_context

            threads = max(1, (os.cpu_count() or 1) // workers)
            kwargs = {"model_dir": str(folder), "input_mpp": input_mpp, "device": device, "config": config}
            with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
                futures = [
                    pool.submit(run_slide, str(path), str(out), stem=stem, overwrite=redo, threads=threads, **kwargs)
                    for path, stem, redo in todo
                ]
                for (path, stem, _), future in tqdm(
                    list(zip(todo, futures, strict=True)), desc="slides", unit="slide", dynamic_ncols=True
                ):
                    try:
                        record = future.result()
                    except Exception as exc:  # the worker process died (killed, out of memory)
                        record = {"slide": str(path), "status": "failed", "error": f"{path}: worker failed ({exc})"}
                    finish(stem, record)

        wall = time.perf_counter() - started
        this_run = [records[stem] for stem in stems if stem in records]
        ledger.run.update(
            wall_s=round(wall, 2),
            slides={stem: records[stem]["status"] for stem in stems if stem in records},
        )
        ledger.save()  # this run's entry with what it did, before run.json lists it
        _write_run_json(out, ledger, records)
    failed = [r for r in this_run if r["status"] in ("failed", "refused")]
    classes = any(r.get("lymphocytes") is not None for r in this_run)
    lymph = f" {'lymph.':>8s}" if classes else ""
    click.echo(f"{'slide':32s} {'status':8s} {'nuclei':>9s}{lymph} {'regions':>8s} {'Mpx/s':>7s} {'time':>8s}")
    for r in this_run:
        if r["status"] in ("failed", "refused"):
            click.echo(f"{Path(r['slide']).name[:32]:32s} {r['status']}")
            continue
        rate = f"{r['processed_pixels'] / r['seconds'] / 1e6:7.2f}" if r.get("seconds") else f"{'':7s}"
        time_s = f"{r['seconds']:7.1f}s" if r.get("seconds") else f"{'':8s}"
        count = (f" {r['lymphocytes']:8d}" if r.get("lymphocytes") is not None else f" {'':8s}") if classes else ""
        name = Path(r["slide"]).name[:32]
        click.echo(f"{name:32s} {r['status']:8s} {r['nuclei']:9d}{count} {r['regions']:8d} {rate} {time_s}")
    click.echo(f"{len(this_run) - len(failed)} of {len(this_run)} slide(s) done in {wall:.1f} s; results in {out}")
    for r in failed:
        click.echo(f"error: {r['error']}", err=True)
    return 1 if failed else 0


def _write_run_json(out, ledger, records: dict[str, dict]) -> None:
    """Write ``run.json``: every slide of the folder, not only this call's, and every run with what it did.

    Each slide carries the run that made its results; one refused or failed in this call keeps its earlier
    finished record, with the refusal under ``last_call``.
    """
    import json

    from pysynth.fsutil import atomic_write_text

    slides = []
    for stem, entry in sorted(ledger.entries.items()):
        record = dict(entry.get("record") or {})
        record.update(name=stem, slide=entry["input"]["path"], status="done", run=entry["run"])
        record["input"] = {k: entry["input"][k] for k in ("size", "hash")}
        now = records.get(stem)
        if now is not None and now["status"] in ("failed", "refused"):
            record["last_call"] = {"status": now["status"], "error": now["error"], "run": ledger.run_id}
        slides.append(record)
    for stem, now in sorted(records.items()):
        if stem not in ledger.entries:
            slides.append({"name": stem, **now, "run": ledger.run_id})
    run = {"format": "pysynth-infer-run", "version": 2, "runs": ledger.runs, "slides": slides}
    atomic_write_text(out / "run.json", json.dumps(run, indent=1, default=str) + "\n")
    from pysynth.infer import write_index

    write_index(out, slides)  # the cohort's page: every slide with its status, counts and report


def _region_bar(stem: str):
    """A slide's progress bar of regions, and the ``progress(done, total, nuclei)`` callback that drives it."""
    from tqdm import tqdm

    bar = tqdm(desc=stem[:24], unit="region", dynamic_ncols=True, position=1, leave=False)

    def progress(done: int, total: int, nuclei: int) -> None:
        bar.total = total
        bar.n = done
        bar.set_postfix(nuclei=nuclei, refresh=False)
        bar.refresh()

    return bar, progress


def _on_cluster(scheduler, todo, out, folder, input_mpp, device, config, stop=None) -> list[dict]:
    """The slides of ``todo`` (``(path, stem, overwrite)``), each spread over a Dask distributed cluster.

    Each slide is planned and written here (one writer for its GeoJSON, table and labels); its regions go to the
    cluster as tasks, so one large slide uses every worker. A task lost with its worker is run again by Dask, and
    its region is saved once. Returns the records in the order of ``todo``.
    """
    import logging
    from pathlib import Path

    from tqdm import tqdm

    from pysynth.errors import PysynthError
    from pysynth.infer import run_slide

    try:
        from distributed import Client
    except ImportError:
        raise PysynthError("--scheduler needs Dask distributed: pip install distributed") from None
    try:
        client = Client(scheduler, timeout="10s")
    except (OSError, TimeoutError, ValueError) as exc:
        raise PysynthError(f"--scheduler {scheduler}: cannot connect ({str(exc).splitlines()[0]})") from None
    records: list[dict] = []
    # A lost scheduler is reported here in one line per slide; Dask's own reconnection tracebacks would bury it.
    quiet = [logging.getLogger(name) for name in ("distributed.client", "distributed.utils")]
    levels = [logger.level for logger in quiet]
    for logger in quiet:
        logger.setLevel(logging.CRITICAL)
    try:
        with client:
            for path, stem, redo in tqdm(todo, desc="slides", unit="slide", dynamic_ncols=True, position=0):
                if client.status != "running":  # lost with an earlier slide: the rest wait for a rerun
                    error = f"{path}: not started, the Dask scheduler {scheduler} was lost"
                    records.append({"slide": str(path), "status": "failed", "error": error})
                    continue
                bar, progress = _region_bar(stem)
                try:
                    record = run_slide(
                        str(Path(path).resolve()), str(Path(out).resolve()), model_dir=str(Path(folder).resolve()),
                        input_mpp=input_mpp, device=device, config=config, overwrite=redo, stem=stem,
                        progress=progress, stop=stop, client=client,
                    )  # fmt: skip
                    records.append(record)
                finally:
                    bar.close()
    finally:
        for logger, level in zip(quiet, levels, strict=True):
            logger.setLevel(level)
    return records

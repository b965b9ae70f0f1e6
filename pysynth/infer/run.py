"""Stage "run": one slide through every stage (plan, read, normalise, network, instances, write), resumable.

:func:`infer_slide` checks the slide's folder against the run's settings (:func:`slide_settings`,
:func:`claim_slide_dir`), plans the regions, runs the pipeline over those not yet saved (:func:`run_regions`: the
next window is read and normalised, and the previous one post-processed and written, while the network runs on the
current one) and then streams the saved regions into the outputs (:func:`pysynth.infer.write.write_outputs`) and
``summary.json``. :func:`run_slide` is the command line's unit of work around it.
"""

from __future__ import annotations

import json
import logging
import platform
import shutil
import time
from collections.abc import Callable
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from pysynth.errors import PysynthError
from pysynth.fsutil import atomic_write_text
from pysynth.instances import InstanceConfig
from pysynth.io import SlideReader, compute_tissue_mask
from pysynth.models.io import ModelInfo, model_digest
from pysynth.models.unet import UNet

from .colour import ColourModel, fit_colour
from .config import MEASUREMENTS_VERSION, PARTS, SETTINGS, SUMMARY, InferConfig
from .labels import LABELS, write_labels
from .network import Network, inference_model, keep_freed_memory
from .nuclei import region_nuclei
from .plan import Region, plan_regions, slide_extent, window_box
from .read import colour_samples, read_window
from .report import write_report
from .write import write_outputs

log = logging.getLogger(__name__)


@dataclass
class Timings:
    """Seconds per stage of one slide.

    ``prepare`` (tissue mask, colour fit) runs once per slide; the others are summed over regions and overlap:
    reading and post-processing run in threads beside the network.
    """

    prepare: float = 0.0
    read: float = 0.0
    normalise: float = 0.0
    network: float = 0.0
    post: float = 0.0
    write: float = 0.0


@dataclass
class SlideResult:
    """What one slide gave (also the content of its ``summary.json``)."""

    slide: str
    nuclei: int
    regions: int
    tissue_mm2: float
    pixels: float
    seconds: float
    timings: dict[str, float]
    skipped: bool = False
    resumed_regions: int = 0
    processed_pixels: float = 0.0
    lymphocytes: int | None = None


def slide_settings(
    reader: SlideReader, info: ModelInfo, config: InferConfig, model_id: str
) -> tuple[dict[str, Any], InstanceConfig, float | None]:
    """What decides a slide's result: the settings recorded with it, the post-processing and the class threshold.

    Raises :class:`~pysynth.errors.PysynthError` when a lymphocyte threshold is asked of a model without classes.
    """
    instances = config.instances(info.instances)
    settings = {
        "slide": Path(str(reader.name)).name,
        "model": model_id,
        "config": config.record(),
        "instances": asdict(instances),
        "slide_mpp": reader.mpp,
        "level0_hw": list(reader.level_shapes_hw[0]),
        "measurements": MEASUREMENTS_VERSION,
    }
    if config.lymphocyte_threshold is not None and not info.has_classes:
        raise PysynthError("--lymphocyte-threshold needs a model with a class output (lymphocytes); this one has none")
    threshold = None
    if info.has_classes:  # recorded only for a model with a class output
        threshold = info.lymphocyte_threshold if config.lymphocyte_threshold is None else config.lymphocyte_threshold
        settings["lymphocyte_threshold"] = threshold
    return settings, instances, threshold


def claim_slide_dir(slide_dir: Path, settings: dict[str, Any], overwrite: bool) -> dict[str, Any] | None:
    """Make ``slide_dir`` ready for a run with ``settings``; returns the finished slide's summary when it is done.

    A finished slide (``summary.json``) with the same settings is kept (its summary is returned); with other or
    unreadable settings it is refused (:class:`~pysynth.ledger.SettingsMismatch`) unless ``overwrite``. The saved
    regions of an unfinished run (``.parts``) are kept for the same settings and redone, with a warning, for others.
    """
    from pysynth.ledger import SettingsMismatch, settings_diff

    slide_dir.mkdir(parents=True, exist_ok=True)
    summary_path = slide_dir / SUMMARY
    parts = slide_dir / PARTS
    if overwrite:
        summary_path.unlink(missing_ok=True)
        shutil.rmtree(parts, ignore_errors=True)
    if summary_path.exists():
        try:
            old = json.loads(summary_path.read_text())
        except (OSError, ValueError) as exc:
            raise SettingsMismatch(
                f"{summary_path}: unreadable ({exc}); its results are kept as they are: use --overwrite to redo "
                "the slide"
            ) from None
        if not isinstance(old, dict):
            old = {}
        if old.get("settings") == settings:
            return old
        changed = settings_diff(old.get("settings") or {}, settings)
        raise SettingsMismatch(
            f"{slide_dir}: holds results made with other settings ({'; '.join(changed) or 'unreadable record'}); "
            "kept as they are: use --overwrite to redo them, or another --out"
        )
    settings_path = parts / SETTINGS
    if parts.exists():
        try:
            old_settings = json.loads(settings_path.read_text())
        except (OSError, ValueError):
            old_settings = None
        if old_settings != settings:  # an unfinished run with other settings: its regions cannot be reused
            finished = len(list(parts.glob("0*.json")))
            if finished:
                why = "its settings are unreadable" if old_settings is None else "it had other settings"
                log.warning("%s: redoing the %d finished region(s) of an unfinished run (%s)", slide_dir, finished, why)
            shutil.rmtree(parts)
    parts.mkdir(exist_ok=True)
    atomic_write_text(settings_path, json.dumps(settings))
    return None


def region_record(
    region: Region,
    window: np.ndarray,
    maps: tuple[np.ndarray, ...],
    origin: tuple[int, int],
    instances: InstanceConfig,
    mpp: float,
    level0_per_px: float,
    slide_hw: tuple[int, int],
    drop_dye: bool = True,
) -> dict[str, Any]:
    """What is saved for a region (here or on a cluster worker): the region and the nuclei it owns."""
    lymphocyte = maps[2] if len(maps) > 2 else None  # a class output's third map
    f = level0_per_px
    nuclei = region_nuclei(
        window, maps[0], maps[1], region, origin, instances, mpp, f, slide_hw, lymphocyte, drop_dye=drop_dye
    )
    return {"region": asdict(region), "nuclei": nuclei}


#: Nice value of the reader and post-processing threads (:func:`yield_to_network`).
HELPER_NICE = 19


def yield_to_network() -> bool:
    """Lower the calling thread's priority so that it runs on what the network's threads leave (Linux; idempotent).

    The network's intra-op threads (one per core) work in lock-step: an operator ends when its slowest thread
    does. A reader or post-processing thread that takes a core from one of them stalls the whole team: on the
    project's 2-core machine a busy thread beside a 2,304² network pass left it 0.53-0.56× of its rate alone, and
    0.91-0.95× when that thread ran at nice 19 (``python -m pysynth.bench.network_layout --section contention``,
    two runs). At nice 19 the helpers still run, in the gaps between and within the network's passes and
    whenever the network waits for them, while the network keeps its cores. Threads a helper starts (an OpenCV
    or OpenMP pool first used from it) inherit its nice value. Linux gives every thread its own nice
    value; elsewhere ``setpriority`` would lower the whole process, so this does nothing there (False).
    """
    import os

    if platform.system() != "Linux":
        return False
    try:
        os.setpriority(os.PRIO_PROCESS, 0, max(HELPER_NICE, os.getpriority(os.PRIO_PROCESS, 0)))
    except OSError:
        return False
    return True


def run_regions(
    reader: SlideReader,
    todo: list[Region],
    network: Network,
    colour: ColourModel,
    parts: Path,
    *,
    mpp: float,
    margin: int,
    instances: InstanceConfig,
    timings: Timings,
    drop_dye: bool = True,
    on_region: Callable[[int], None] | None = None,
    stop: Callable[[], bool] | None = None,
) -> bool:
    """Run the regions ``todo`` through read, normalise, network and instances, saving each to ``parts`` at once.

    Pipelined on three threads: the next window is read and normalised, and the previous one post-processed and
    written, while the network runs on the current one; the two helper threads run at a lower priority
    (:func:`yield_to_network`), so they never stall the network's threads. ``on_region(nuclei)`` is called as
    each region is saved; ``stop`` is polled after each network pass. Returns False when stopped (the regions
    passed so far are saved).
    """
    f = mpp / reader.mpp
    slide_hw = slide_extent(reader, mpp)
    boxes = {r.index: window_box(r, margin, slide_hw) for r in todo}
    window_px = sum((x1 - x0) * (y1 - y0) for x0, y0, x1, y1 in boxes.values())
    lookup = window_px > 20e6  # the colour table pays for itself from about four default regions

    def load(region: Region) -> tuple[np.ndarray, np.ndarray, float, float]:
        t0 = time.perf_counter()
        window = read_window(reader, region, mpp, margin, slide_hw)
        t1 = time.perf_counter()
        normalised = colour.apply(window, lookup=lookup)
        return window, normalised, t1 - t0, time.perf_counter() - t1

    def finish(region: Region, window: np.ndarray, maps: tuple[np.ndarray, ...]) -> tuple[int, float, float]:
        t0 = time.perf_counter()
        origin = boxes[region.index][:2]
        record = region_record(region, window, maps, origin, instances, mpp, f, slide_hw, drop_dye=drop_dye)
        nuclei = record["nuclei"]
        t1 = time.perf_counter()
        atomic_write_text(parts / f"{region.index:06d}.json", json.dumps(record, separators=(",", ":")))
        return len(nuclei), t1 - t0, time.perf_counter() - t1

    def collect(post: Future) -> None:
        n, t_post, t_write = post.result()
        timings.post += t_post
        timings.write += t_write
        if on_region is not None:
            on_region(n)

    with (
        ThreadPoolExecutor(1, initializer=yield_to_network) as reader_pool,
        ThreadPoolExecutor(1, initializer=yield_to_network) as post_pool,
    ):
        pending_read = reader_pool.submit(load, todo[0]) if todo else None
        pending_post = None
        for i, region in enumerate(todo):
            assert pending_read is not None
            window, normalised, t_read, t_norm = pending_read.result()
            timings.read += t_read
            timings.normalise += t_norm
            pending_read = reader_pool.submit(load, todo[i + 1]) if i + 1 < len(todo) else None
            t0 = time.perf_counter()
            maps = network(normalised)
            timings.network += time.perf_counter() - t0
            if pending_post is not None:
                collect(pending_post)
            pending_post = post_pool.submit(finish, region, window, maps)
            if stop is not None and stop():
                collect(pending_post)
                if pending_read is not None:
                    pending_read.cancel()
                return False
        if pending_post is not None:
            collect(pending_post)
    return True


def region_task(
    slide: str,
    input_mpp: float | None,
    model_dir: str,
    device: str,
    config: InferConfig,
    colour: dict[str, Any],
    region: Region,
) -> dict[str, Any]:
    """One region of a slide, anywhere (a Dask worker): read, normalise, network, instances; returns its record.

    The record is what :func:`run_regions` saves for the region (the same functions on the same pixels, so the
    same nuclei); the caller saves it, so one writer assembles the slide. The model is loaded once per worker
    process (:func:`~pysynth.infer.network.inference_model`).
    """
    from pysynth.io import open_slide
    from pysynth.segment import resolve_device

    model, info = inference_model(model_dir)
    model = model.to(resolve_device(device))
    mpp = info.mpp
    with open_slide(slide, input_mpp) as reader:
        slide_hw = slide_extent(reader, mpp)
        origin = window_box(region, config.margin, slide_hw)[:2]
        window = read_window(reader, region, mpp, config.margin, slide_hw)
        f = mpp / reader.mpp
    normalised = ColourModel(colour["method"], colour["params"]).apply(window, lookup=False)
    maps = Network(model, config, info.has_classes)(normalised)
    instances = config.instances(info.instances)
    return region_record(region, window, maps, origin, instances, mpp, f, slide_hw, drop_dye=not config.keep_dye)


class SchedulerLost(PysynthError):
    """The Dask scheduler went away in the middle of a slide (its saved regions are kept for a rerun)."""


def cluster_runner(client: Any, slide: str, input_mpp: float | None, model_dir: str, device: str, config: InferConfig):
    """A region runner for :func:`infer_slide` that sends each region to a Dask cluster as a task.

    Results are saved here as they come back (one writer; a task retried after a lost worker gives its region
    once), ``on_region`` is called for each, and ``stop`` is polled between them (pending tasks are cancelled).
    """
    from distributed import as_completed

    def run(todo: list[Region], colour: ColourModel, parts: Path, on_region, stop) -> bool:
        futures = {
            client.submit(region_task, slide, input_mpp, model_dir, device, config, asdict(colour), r, pure=False): r
            for r in todo
        }
        pending = set(futures)
        for future in as_completed(list(futures)):
            try:
                record = future.result()  # a task that failed on every try fails the slide, with its error
            except CancelledError as exc:  # Dask cancels every task of a client that loses its scheduler
                if getattr(exc, "reason", None) == "scheduler-connection-lost" or client.status != "running":
                    kept = len(todo) - len(pending)
                    raise SchedulerLost(
                        f"lost the Dask scheduler with {kept} of {len(todo)} region(s) saved; a rerun (with a "
                        "scheduler or without) resumes from them"
                    ) from None
                raise
            region = futures[future]
            atomic_write_text(parts / f"{region.index:06d}.json", json.dumps(record, separators=(",", ":")))
            pending.discard(future)
            if on_region is not None:
                on_region(len(record["nuclei"]))
            if stop is not None and stop():
                client.cancel(list(pending))
                return False
        return True

    return run


def infer_slide(
    reader: SlideReader,
    model: UNet,
    info: ModelInfo,
    slide_dir: Path,
    *,
    config: InferConfig,
    model_id: str,
    overwrite: bool = False,
    progress: Callable[[int, int, int], None] | None = None,
    stop: Callable[[], bool] | None = None,
    runner: Callable[..., bool] | None = None,
) -> SlideResult:
    """Segment every nucleus of one slide into ``slide_dir`` (resuming what an earlier run left).

    Args:
        reader: The open slide.
        model: The network, on its device, in eval mode.
        info: Its description (resolution, post-processing).
        slide_dir: ``OUT/<stem>``.
        config: Region and normalisation settings.
        model_id: :func:`model_digest` of the model folder.
        overwrite: Start afresh even when the folder holds a finished or unfinished run.
        progress: Called as ``progress(done_regions, total_regions, nuclei_so_far)``.
        stop: Polled between regions; when it returns True the run stops after saving the current region and
            raises :class:`KeyboardInterrupt`.
        runner: Runs the regions elsewhere instead of :func:`run_regions` here, called as ``runner(todo, colour,
            parts, on_region, stop)`` and returning False when stopped (:func:`cluster_runner`: a Dask cluster).
            Planning, the colour fit and the outputs stay here.

    Returns:
        The slide's :class:`SlideResult`; ``skipped`` when ``summary.json`` showed it finished.
    """
    from pysynth import __version__

    keep_freed_memory()
    settings, instances, threshold = slide_settings(reader, info, config, model_id)
    finished = claim_slide_dir(slide_dir, settings, overwrite)
    if finished is not None:
        return SlideResult(
            str(reader.name), int(finished.get("nuclei", 0)), 0, 0.0, 0.0, 0.0, {}, skipped=True,
            lymphocytes=finished.get("lymphocytes"),
        )  # fmt: skip
    parts = slide_dir / PARTS

    started = time.perf_counter()
    timings = Timings()
    mpp = info.mpp
    t = time.perf_counter()
    tissue = compute_tissue_mask(reader)
    colour = fit_colour(colour_samples(reader, tissue, mpp), config.normalise)
    timings.prepare += time.perf_counter() - t
    regions = plan_regions(reader, mpp, config, tissue)
    todo = [r for r in regions if not (parts / f"{r.index:06d}.json").exists()]
    resumed = len(regions) - len(todo)
    state = {"done": resumed, "nuclei": 0}
    if progress is not None:
        progress(resumed, len(regions), 0)

    def on_region(n: int) -> None:
        state["done"] += 1
        state["nuclei"] += n
        if progress is not None:
            progress(state["done"], len(regions), state["nuclei"])

    if runner is not None:
        t = time.perf_counter()
        complete = runner(todo, colour, parts, on_region, stop)
        timings.network += time.perf_counter() - t  # the cluster's wall time for the regions, all stages
        device_name = "cluster"
    else:
        network = Network(model, config, info.has_classes)
        complete = run_regions(
            reader, todo, network, colour, parts, mpp=mpp, margin=config.margin, instances=instances,
            timings=timings, on_region=on_region, stop=stop, drop_dye=not config.keep_dye,
        )  # fmt: skip
        device_name = str(network.device)
    if not complete:
        raise KeyboardInterrupt

    count, t_write, class_summary = write_outputs(slide_dir, reader, regions, parts, mpp, config, threshold, tissue)
    timings.write += t_write
    t_labels = time.perf_counter()
    if config.labels == "ome-tiff":
        write_labels(slide_dir, reader, regions, parts, mpp)
    t_labels = time.perf_counter() - t_labels
    seconds = time.perf_counter() - started
    pixels = float(sum(r.w * r.h for r in regions))
    pixels_now = float(sum(r.w * r.h for r in todo))  # a resumed run's rate counts only what it processed
    result = SlideResult(
        slide=str(reader.name),
        nuclei=count,
        regions=len(regions),
        tissue_mm2=round(tissue.area_um2() / 1e6, 4),
        pixels=pixels,
        seconds=round(seconds, 2),
        timings={k: round(v, 3) for k, v in asdict(timings).items()},
        resumed_regions=resumed,
        processed_pixels=pixels_now,
        lymphocytes=class_summary.get("lymphocytes"),
    )
    summary = {
        **asdict(result),
        "settings": settings,
        "mpp": mpp,
        "slide_mpp": reader.mpp,
        "mpp_source": reader.mpp_source,
        "colour": asdict(colour),
        "megapixels_per_s": round(pixels_now / max(seconds, 1e-9) / 1e6, 3),
        "versions": {
            "pysynth": __version__,
            "torch": torch.__version__,
            "numpy": np.__version__,
            "opencv": cv2.__version__,
            "python": platform.python_version(),
        },
        "device": device_name,
        **class_summary,
    }
    # The page to look at, while the saved regions (its crops' outlines) are still there; before summary.json,
    # whose presence marks a finished slide.
    t = time.perf_counter()
    write_report(slide_dir, reader, regions, parts, mpp, tissue, summary, threshold)
    summary["timings"]["report"] = round(time.perf_counter() - t, 3)
    if config.labels != "none":
        summary["timings"]["labels"] = round(t_labels, 3)
        summary["labels"] = LABELS
    atomic_write_text(slide_dir / SUMMARY, json.dumps(summary, indent=1))
    shutil.rmtree(parts, ignore_errors=True)
    return result


def run_slide(
    path: str,
    out_dir: str,
    *,
    model_dir: str | None,
    input_mpp: float | None,
    device: str,
    config: InferConfig,
    overwrite: bool,
    threads: int = 0,
    stem: str | None = None,
    progress: Callable[[int, int, int], None] | None = None,
    stop: Callable[[], bool] | None = None,
    client: Any = None,
) -> dict[str, Any]:
    """Infer one slide from its path: the command line's unit of work, here, in a worker process or on Dask.

    With a Dask ``client`` its regions go to the cluster as tasks (:func:`cluster_runner`) and the slide is
    planned and written here.

    A problem with the slide or its outputs (unreadable, no resolution, other settings in its folder, disk full)
    becomes a ``"failed"`` record with a one-line ``error``, so the other slides go on; ``progress`` and ``stop``
    are passed to :func:`infer_slide` (a stop raises :class:`KeyboardInterrupt`).

    Returns a JSON-able record: ``status`` ``"done"``, ``"skipped"``, ``"refused"`` (the slide's folder holds
    results made with other settings, kept as they are) or ``"failed"`` (both with ``error``), and the
    :class:`SlideResult` fields.
    """
    from pysynth.errors import SlideError
    from pysynth.io import open_slide
    from pysynth.ledger import SettingsMismatch
    from pysynth.models.io import resolve_model_dir
    from pysynth.segment import resolve_device

    if threads:
        torch.set_num_threads(threads)
    folder = resolve_model_dir(model_dir)
    model, info = inference_model(str(folder))
    model = model.to(resolve_device(device))
    stem = stem or Path(path).stem
    try:
        runner = None
        if client is not None:
            runner = cluster_runner(client, str(Path(path).resolve()), input_mpp, str(folder.resolve()), device, config)
        with open_slide(path, input_mpp) as reader:
            result = infer_slide(
                reader, model, info, Path(out_dir) / stem, config=config, model_id=model_digest(folder),
                overwrite=overwrite, progress=progress, stop=stop, runner=runner,
            )  # fmt: skip
    except SlideError as exc:
        return {"slide": str(path), "status": "failed", "error": str(exc)}
    except SettingsMismatch as exc:
        return {"slide": str(path), "status": "refused", "error": f"{path}: {exc}"}
    except PysynthError as exc:
        return {"slide": str(path), "status": "failed", "error": f"{path}: {exc}"}
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        return {"slide": str(path), "status": "failed", "error": f"{path}: {where}{exc.strerror or exc}"}
    except Exception as exc:  # anything else (out of GPU memory, an OpenCV error, a bug) fails this slide alone
        log.debug("%s: failed", path, exc_info=True)
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        kind = type(exc).__qualname__
        if type(exc).__module__ not in ("builtins", None):
            kind = f"{type(exc).__module__.split('.')[0]}.{kind}"
        return {"slide": str(path), "status": "failed", "error": f"{path}: {kind}: {first}"}
    record = asdict(result)
    record["slide"] = str(path)
    record["status"] = "skipped" if result.skipped else "done"
    return record

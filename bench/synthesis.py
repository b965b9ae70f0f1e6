"""Whole-patch synthesis throughput per core, next to a direct NumPy + OpenCV pipeline; multi-process scaling.

Run ``pysynth bench --section synthesis [--quick]``. Real tiles come from the bundled sample slide read at
0.25 µm/px and are prepared once (as ``pysynth synthesize`` does); then :func:`synthesize_patch` is timed per
patch in one process with one OpenCV thread. The baseline (:mod:`pysynth.bench.baseline_synthesis`) redoes all
work per patch, as the published recipe's code does. Each timed call makes the same fixed batch of patches (item
streams ``item_rng(0, i)``), so the spread reflects the machine, not the content of the patches. Scaling writes
a sharded dataset with :func:`write_dataset` with 1 and 2 worker processes (wall-clock, process start and
loading of the sources included).
"""

from __future__ import annotations

import os
import re
import resource
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from pysynth.bench.harness import Timing, measure

SIZES = (200, 400)
SLIDE = "CMU-1-Small-Region.svs"
MPP = 0.25
TILE_SIDE = 800
N_TILES = 3
SEED = 0


def real_tiles(n: int = N_TILES, side: int = TILE_SIDE) -> list[np.ndarray]:
    """Up to ``n`` non-overlapping tissue tiles of ``side`` px at 0.25 µm/px from the bundled sample slide.

    Raises:
        PysynthError: If the slide cannot be read or holds no tissue tile.
    """
    from pysynth import data_path
    from pysynth.errors import PysynthError
    from pysynth.io import compute_tissue_mask, level0_extent, open_slide, read_region
    from pysynth.sample import place_patches, source_rng

    with open_slide(data_path(SLIDE)) as reader:
        tissue = compute_tissue_mask(reader)
        extent = level0_extent(reader, side, MPP)
        xy, _ = place_patches(tissue, reader.level_shapes_hw[0], extent, n, 0.7, source_rng(SEED, SLIDE), 200 * n)
        tiles = [read_region(reader, x, y, (side, side), MPP) for x, y in xy]
    if not tiles:
        raise PysynthError(f"{SLIDE}: no {side} px tissue tile at {MPP} µm/px for the benchmark")
    return tiles


def cpu_topology() -> dict:
    """Logical CPUs usable here and whether they are physical cores (``lscpu``, else ``/proc/cpuinfo``)."""
    info: dict = {"logical_cpus": os.cpu_count()}
    if hasattr(os, "sched_getaffinity"):
        info["usable_cpus"] = len(os.sched_getaffinity(0))
    fields = {"Model name": "model", "Thread(s) per core": "threads_per_core", "Core(s) per socket": "cores_per_socket"}
    fields["Socket(s)"] = "sockets"
    try:
        out = subprocess.run(
            ["lscpu"], capture_output=True, text=True, check=True, env={**os.environ, "LC_ALL": "C"}
        ).stdout
        for line in out.splitlines():
            key, _, value = line.partition(":")
            if key.strip() in fields:
                value = value.strip()
                info[fields[key.strip()]] = int(value) if value.isdigit() else value
        info["source"] = "lscpu"
    except (OSError, subprocess.CalledProcessError):
        try:
            text = Path("/proc/cpuinfo").read_text()
            siblings = re.search(r"^siblings\s*:\s*(\d+)", text, re.M)
            cores = re.search(r"^cpu cores\s*:\s*(\d+)", text, re.M)
            if siblings and cores:
                info["cores_per_socket"] = int(cores.group(1))
                info["threads_per_core"] = int(siblings.group(1)) // max(1, int(cores.group(1)))
            info["source"] = "/proc/cpuinfo"
        except OSError:
            info["source"] = None
    threads = info.get("threads_per_core")
    info["physical_cores"] = threads == 1 if isinstance(threads, int) else None
    return info


def _load_average() -> float | None:
    """The 1-minute load average (other users of the cores show here), if the system tells."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process and of its finished child processes."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _timing(name: str, samples: list[float], items: float, extra: dict | None = None) -> Timing:
    q = statistics.quantiles(samples, n=4) if len(samples) >= 2 else [samples[0]] * 3
    return Timing(name, statistics.median(samples), q[0], q[2], len(samples), items, "patch", extra or {})


def _synthesis_worker(args: tuple[str, dict, float, int, int]) -> float:
    """In a worker process: make ``n`` patches after a common start time; returns the seconds they took."""
    from pysynth.synth.generate import SynthMaker

    data, config, start_at, n, worker = args
    cv2.setNumThreads(1)
    maker = SynthMaker(data, config, SEED)
    for i in range(20):  # loads the sources, warms caches
        maker(10_000_000 + i)
    while time.time() < start_at:
        time.sleep(0.001)
    start = time.perf_counter()
    for i in range(n):
        maker(worker * n + i)
    return time.perf_counter() - start


def _cpu_scaling(data: Path, config_dict: dict, quick: bool) -> list[Timing]:
    """Patches/s of synthesis alone (no writing) in 1 and in 2 processes started together: CPU scaling."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    n, repeats = (32, 1) if quick else (800, 3)
    samples: dict[int, list[float]] = {1: [], 2: []}
    context = multiprocessing.get_context("spawn")
    for _ in range(repeats):
        for procs in samples:
            with ProcessPoolExecutor(procs, mp_context=context) as pool:
                start_at = time.time() + 6.0  # after spawn, imports and source loading
                seconds = list(
                    pool.map(_synthesis_worker, [(str(data), config_dict, start_at, n, w) for w in range(procs)])
                )
            samples[procs].append(max(seconds) / (procs * n))  # wall seconds per patch, all processes together
    one = _timing("synthesize_patch 200x200, 1 process (no writing)", samples[1], 1.0, {"processes": 1})
    two = _timing(
        "synthesize_patch 200x200, 2 processes (no writing)", samples[2], 1.0, {"processes": 2, "baseline": one.name}
    )
    return [one, two]


def _scaling(tiles: list[np.ndarray], quick: bool) -> list[Timing]:
    """Items/s of ``write_dataset`` with 1 and 2 workers at 200 × 200, interleaved repeats in fresh folders."""
    from pysynth.synth.config import SynthConfig
    from pysynth.synth.generate import SynthMaker, save_sources, synth_schema
    from pysynth.synth.store import write_dataset

    n, shard_size, repeats = (256, 64, 1) if quick else (4096, 512, 3)
    config = SynthConfig(size=200)
    samples: dict[int, list[float]] = {1: [], 2: []}
    busy: dict[int, list[float]] = {1: [], 2: []}  # CPU seconds (this process and its workers) per wall second
    with tempfile.TemporaryDirectory(prefix="pysynth-bench-") as tmp:
        data = Path(tmp) / "data"
        save_sources([(f"{SLIDE}#{k}", rgb) for k, rgb in enumerate(tiles)], config, data)
        for rep in range(repeats):
            for workers in samples:
                out = Path(tmp) / f"w{workers}-{rep}"
                maker = SynthMaker(str(data), config.to_dict(), SEED)  # fresh: each run loads its sources
                cpu_before, start = _cpu_seconds(), time.perf_counter()
                write_dataset(out, n, maker, schema=synth_schema(config.size), shard_size=shard_size, workers=workers)
                samples[workers].append(time.perf_counter() - start)
                busy[workers].append((_cpu_seconds() - cpu_before) / samples[workers][-1])
                shutil.rmtree(out)
        cpu = _cpu_scaling(data, config.to_dict(), quick)
    name = f"write_dataset 200x200 n={n} shard={shard_size}"
    one = _timing(f"{name} workers=1", samples[1], n, {"workers": 1, "cpus_busy": statistics.median(busy[1])})
    extra = {"workers": 2, "baseline": one.name, "cpus_busy": statistics.median(busy[2])}
    two = _timing(f"{name} workers=2", samples[2], n, extra)
    return [*cpu, one, two]


def run(quick: bool = False) -> list[Timing | dict]:
    """Time whole-patch synthesis against the baseline at each size, then multi-process writing.

    Args:
        quick: Fewer and smaller samples (a smoke run for tests and CI).

    Returns:
        Timings (a pysynth case names its baseline in ``extra["baseline"]``) and one dict of notes.
    """
    from pysynth.bench.baseline_synthesis import baseline_patch
    from pysynth.synth.config import SynthConfig
    from pysynth.synth.recipe import synthesize_patch
    from pysynth.synth.source import prepare_source
    from pysynth.synth.store import item_rng

    cv2.setNumThreads(1)
    load_before = _load_average()
    start = time.perf_counter()
    tiles = real_tiles()
    # Preparation does not depend on the patch size; the largest size only sets the smallest tile allowed.
    prep_config = SynthConfig(size=max(SIZES))
    sources = [prepare_source(rgb, prep_config, f"{SLIDE}#{k}") for k, rgb in enumerate(tiles)]
    prepare_s = time.perf_counter() - start
    opts = {"warmup": 1, "repeats": 5 if quick else 15, "min_time_s": 0.0}
    rows: list[Timing | dict] = []
    for size in SIZES:
        config = SynthConfig(size=size)
        batch = (8 if quick else 32) // (size // 200)
        px = f"{size}x{size}"

        def ours(config: SynthConfig = config, batch: int = batch) -> None:
            for i in range(batch):
                synthesize_patch(sources[i % len(sources)], item_rng(SEED, i), config)

        def baseline(size: int = size, batch: int = batch) -> None:
            for i in range(batch):
                baseline_patch(tiles[i % len(tiles)], item_rng(SEED, i), size)

        base = measure(f"baseline NumPy+OpenCV patch {px}", baseline, items_per_call=batch, unit="patch", **opts)
        mine = measure(f"synthesize_patch {px}", ours, items_per_call=batch, unit="patch", **opts)
        mine.extra["baseline"] = base.name
        rows += [mine, base]
    rows += _scaling(tiles, quick)
    one, two = rows[-2], rows[-1]
    topology = cpu_topology()
    rows.append(
        {
            "sources": f"{len(tiles)} tiles of {TILE_SIDE} px at {MPP} µm/px from {SLIDE}",
            "prepare_sources_s": round(prepare_s, 3),
            "threads": "one process, cv2.setNumThreads(1); rates of single-process cases are per core",
            "cpu": topology,
            "load_average_1min": {"before": load_before, "after": _load_average()},
            "scaling_speedup_2_workers": round(two.rate / one.rate, 3),
            "cpu_scaling_speedup_2_processes": round(rows[-3].rate / rows[-4].rate, 3),
            "scaling_cpus_busy": f"{one.extra['cpus_busy']:.2f} (1 worker), {two.extra['cpus_busy']:.2f} (2 workers)"
            " CPU s per wall s; below 2 with 2 workers means the cores were shared with other work",
            "scaling_note": (
                f"{topology.get('usable_cpus', topology['logical_cpus'])} usable CPUs, "
                + {True: "physical cores (1 thread per core)", False: "SMT siblings", None: "topology unknown"}[
                    topology["physical_cores"]
                ]
                + "; wall-clock of the whole write, process start and source loading included"
                + ("; quick mode: too few items to amortise worker start-up" if quick else "")
            ),
        }
    )
    return rows

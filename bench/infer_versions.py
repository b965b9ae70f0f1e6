"""``infer`` of this checkout against another checkout's on the same bench slide: speed, and the same nuclei.

Usage::

    python -m pysynth.bench.infer_versions OTHER [--rounds 2] [--quick] [--json PATH] [--keep-dye]

``OTHER`` is a source checkout of pysynth (for example ``git worktree add /tmp/before v0.1.0``) whose compiled
core is built in place: ``pysynth/_core*.so`` next to its Python files (``cmake -S OTHER -B BUILD`` and
``cmake --build BUILD``, then copy ``BUILD/_core*.so`` into ``OTHER/pysynth/``). Both versions run
``python -m pysynth.bench.infer`` (their own) on the bench slide of :mod:`pysynth.bench.infer`, each in a fresh
process with the shipped ``default`` model of its own checkout. ``OTHER`` runs with ``python -S`` and its
checkout first on the path, so this environment's editable install does not redirect its imports. Each round runs
both, in an order that alternates between rounds, and the classical pipeline runs once on the same regions in
this process. Reported: seconds and Mpx/s per version (medians over rounds), the paired speed ratio, both against
the classical pipeline, and how far this checkout's nuclei are ``OTHER``'s (:func:`~pysynth.bench.infer.
nucleus_agreement`: the share of ``OTHER``'s nuclei with one at IoU >= 0.98 and >= 0.9, and the count change).
Against a checkout from before the dye filter (:mod:`pysynth.dye`) pass ``--keep-dye``: the bench slide is cut
from the bundled slide, whose margin ink this checkout otherwise drops.
"""

from __future__ import annotations

import argparse
import json
import os
import site
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pysynth.bench.infer import FULL, QUICK, classical_on_regions, nucleus_agreement

#: The child's entry point for a source checkout: its ``bench/`` and ``cli/`` become ``pysynth.bench`` and
#: ``pysynth.cli`` as the wheel lays them out.
_OTHER_CHILD = (
    "import runpy, sys; root = sys.argv.pop(1); import pysynth; pysynth.__path__.append(root); "
    "sys.argv[0] = 'infer'; runpy.run_module('pysynth.bench.infer', run_name='__main__')"
)


class VersionError(Exception):
    """The other checkout cannot be run, or its run failed (one line for the user)."""


def check_checkout(other: Path) -> None:
    """Raise :class:`VersionError` unless ``other`` is a pysynth checkout with its compiled core built in place."""
    if not (other / "pysynth" / "__init__.py").is_file() or not (other / "bench" / "infer.py").is_file():
        raise VersionError(f"{other}: not a pysynth source checkout (no pysynth/__init__.py and bench/infer.py)")
    if not list((other / "pysynth").glob("_core*.so")) and not list((other / "pysynth").glob("_core*.pyd")):
        raise VersionError(
            f"{other}: its compiled core is not built in place (pysynth/_core*.so); build it with CMake "
            "and copy the module there"
        )


def child_command(
    slide: Path, out: Path, other: Path | None, keep_dye: bool = False
) -> tuple[list[str], dict[str, str], Path | None]:
    """The command, environment and working folder that infer ``slide`` into ``out`` with this checkout or ``other``.

    ``other``'s child runs in ``other`` itself: ``python -c`` puts the working folder first on the path, and a
    folder holding this checkout's ``pysynth`` would shadow ``other``'s. ``keep_dye``: this checkout keeps the
    objects of marking dye's colours, as checkouts from before that filter did (``other`` runs as it is).
    """
    env = dict(os.environ)
    if other is None:
        command = [sys.executable, "-m", "pysynth.bench.infer", str(slide), str(out)]
        return command + (["--keep-dye"] if keep_dye else []), env, None
    paths = [str(other), *site.getsitepackages()]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return [sys.executable, "-S", "-c", _OTHER_CHILD, str(other), str(slide), str(out)], env, other


def run_child(slide: Path, out: Path, other: Path | None, keep_dye: bool = False) -> dict:
    """One inference in a fresh process: what ``pysynth.bench.infer``'s child prints (seconds, nuclei, ...)."""
    command, env, cwd = child_command(slide, out, other, keep_dye)
    proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=cwd, check=False)
    if proc.returncode != 0:
        who = "this checkout" if other is None else str(other)
        last = (proc.stderr.strip().splitlines() or ["no error output"])[-1]
        raise VersionError(f"inference with {who} failed (exit {proc.returncode}): {last}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def stage_seconds(out: Path) -> dict[str, float]:
    """The seconds per stage that a version's ``summary.json`` in ``out`` records (empty if it has none).

    Every version since whole-slide inference began writes them under ``timings``: ``prepare`` once per slide,
    ``read``, ``normalise``, ``network``, ``post`` and ``write`` summed over regions (reading and post-processing
    run in threads beside the network, so the sums exceed the wall time), and later versions add ``report``.
    """
    from pysynth.infer import SUMMARY

    try:
        timings = json.loads((out / SUMMARY).read_text()).get("timings", {})
    except (OSError, ValueError, AttributeError):
        return {}
    return {k: float(v) for k, v in timings.items() if isinstance(v, int | float)}


def median_stages(runs: list[dict[str, float]]) -> dict[str, float]:
    """Per stage, the median over the runs that recorded it."""
    names = sorted({k for run in runs for k in run})
    return {k: round(statistics.median(run[k] for run in runs if k in run), 2) for k in names}


def compare(other: Path, rounds: int = 2, quick: bool = False, keep_dye: bool = False) -> dict:
    """Both versions on one bench slide, ``rounds`` times each, and the classical pipeline once.

    ``keep_dye``: this checkout keeps marking dye's objects (:func:`child_command`), for the same nuclei as a
    checkout from before the dye filter.
    """
    from pysynth.bench.make_slide import load_source, write_pyramidal_tiff
    from pysynth.infer import GEOJSON, InferConfig
    from pysynth.models.io import default_model_dir, read_model_info

    check_checkout(other)
    plan = QUICK if quick else FULL
    mpp = read_model_info(default_model_dir()).mpp
    with tempfile.TemporaryDirectory(prefix="pysynth-bench-versions-") as tmp:
        work = Path(tmp)
        slide = work / "slide.tiff"
        write_pyramidal_tiff(
            slide, load_source(mpp), plan.side, mpp, tissue_fraction=plan.tissue_mpx * 1e6 / plan.side**2,
            block=plan.block,
        )  # fmt: skip
        seconds: dict[str, list[float]] = {"this": [], "other": []}
        stages: dict[str, list[dict[str, float]]] = {"this": [], "other": []}
        record: dict[str, dict] = {}
        for r in range(rounds):
            order = ("other", "this") if r % 2 == 0 else ("this", "other")
            for who in order:
                out = work / f"{who}-{r}"
                record[who] = run_child(slide, out, other if who == "other" else None, keep_dye)
                seconds[who].append(float(record[who]["seconds"]))
                stages[who].append(stage_seconds(out))
        agreement = nucleus_agreement(work / f"other-{rounds - 1}" / GEOJSON, work / f"this-{rounds - 1}" / GEOJSON)
        t0 = time.perf_counter()
        classical = classical_on_regions(slide, mpp, InferConfig())
        classical["wall_s"] = time.perf_counter() - t0
    pixels = float(record["this"]["pixels"])
    rate = {who: pixels / statistics.median(s) / 1e6 for who, s in seconds.items()}
    classical_rate = classical["pixels"] / classical["seconds"] / 1e6
    paired = [o / t for o, t in zip(seconds["other"], seconds["this"], strict=True)]  # per round
    return {
        "other": str(other),
        "slide": f"{plan.side:,}² px at {mpp} µm/px, {record['this']['regions']} regions, "
        f"{pixels / 1e6:.1f} Mpx of cores",
        "rounds": rounds,
        **({"this_keeps_dye": True} if keep_dye else {}),
        "seconds": {who: [round(v, 2) for v in s] for who, s in seconds.items()},
        "mpx_per_s": {who: round(v, 3) for who, v in rate.items()},
        "this_vs_other": round(statistics.median(paired), 3),
        "classical_mpx_per_s": round(classical_rate, 3),
        "this_vs_classical": round(rate["this"] / classical_rate, 3),
        "other_vs_classical": round(rate["other"] / classical_rate, 3),
        "nuclei_against_other": agreement,
        "peak_mb": {who: rec["peak_mb"] for who, rec in record.items()},
        "stage_seconds": {who: median_stages(runs) for who, runs in stages.items()},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0].strip("`"))
    parser.add_argument("other", type=Path, help="a pysynth source checkout with its compiled core built in place")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each version (default 2)")
    parser.add_argument("--quick", action="store_true", help="the small bench slide (a smoke run)")
    parser.add_argument("--json", type=Path, help="also write the result to this JSON file")
    parser.add_argument(
        "--keep-dye",
        action="store_true",
        help="this checkout keeps marking dye's objects too (for the same nuclei as a checkout from before the filter)",
    )
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    try:
        result = compare(args.other.resolve(), args.rounds, args.quick, args.keep_dye)
    except VersionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    text = json.dumps(result, indent=1, ensure_ascii=False)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()

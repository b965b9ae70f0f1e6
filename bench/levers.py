"""Ablation of the synthesis levers against false nuclei, each arm one training run from scratch, same budget.

Usage::

    python -m pysynth.bench.levers --real ../shared/data/monuseg-train/images --real pysynth/data/CMU-1-Small-Region.svs
        --input-mpp 0.25 [--steps 500] [--arms plain,guide,floor,transplant] [--jobs 1] [--out out/levers]

=============  ====================================================================================
arm            synthesis (on top of ``configs/default-model.yaml``)
=============  ====================================================================================
plain          the published super-segmentation decides what is inpainted
guide          the previously shipped model decides (``guide: plain``): other purple stays as a negative
floor          + no labelled nucleus fainter than the tile's sure real nuclei (``darkness_floor: 0.1``)
transplant     + 30% of nuclei real ones of the tile (``transplant_fraction: 0.3``)
negatives      + red cells, fibres and pigment in their own colours (``red_cell_rate``, ``fibre_rate``,
               ``pigment_rate``: 1, 3 and 0.5 per 100 µm square)
=============  ====================================================================================

Every arm has the same seed, steps, batch and schedule; an interrupted ablation resumes (each run resumes, finished
ones are kept). Each model is scored by :mod:`pysynth.bench.dev_scores` on both dev sets with its own
post-processing, chosen on held-out synthetic patches (labels are read only to score). Writes ``OUT/levers.json``
and prints a Markdown table with each run's training wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
ARMS: dict[str, dict] = {
    "plain": {},
    "guide": {"guide": "plain"},
    "floor": {"guide": "plain", "darkness_floor": 0.1},
    "transplant": {"guide": "plain", "darkness_floor": 0.1, "transplant_fraction": 0.3},
    "negatives": {
        "guide": "plain",
        "darkness_floor": 0.1,
        "transplant_fraction": 0.3,
        "red_cell_rate": 1.0,
        "fibre_rate": 3.0,
        "pigment_rate": 0.5,
    },
}


def _train(args: argparse.Namespace, arm: str, threads: int) -> Path:
    run = args.out / arm
    if (run / "model.json").exists():
        print(f"{arm}: finished earlier, kept", flush=True)
        return run
    base = yaml.safe_load((ROOT / "configs" / "default-model.yaml").read_text())
    base["steps"] = args.steps
    base["threads"] = threads
    base["synth"] = {**(base.get("synth") or {}), **ARMS[arm]}
    run.mkdir(parents=True, exist_ok=True)
    config = args.out / f"{arm}.yaml"
    config.write_text(yaml.safe_dump(base, sort_keys=False))
    cmd = [sys.executable, "-c", "from pysynth.cli import main; main()", "train", "--config", str(config)]
    cmd += ["--seed", str(args.seed), "--out", str(run), "--input-mpp", str(args.input_mpp)]
    for real in args.real:
        cmd += ["--real", real]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    with (args.out / f"{arm}.log").open("w") as log:
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT, env=env)
    print(f"{arm}: trained", flush=True)
    return run


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    from pysynth.bench.dev_scores import COLUMNS, score_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--real", action="append", required=True)
    parser.add_argument("--input-mpp", type=float, default=0.25)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("out/levers"))
    parser.add_argument("--monuseg", type=Path, default=ROOT.parent / "shared" / "data" / "monuseg-train")
    parser.add_argument("--brca", type=Path, default=ROOT.parent / "shared" / "data" / "brca-m2c")
    args = parser.parse_args(argv)
    arms = [a for a in args.arms.split(",") if a]
    unknown = set(arms) - set(ARMS)
    if unknown:
        parser.error(f"unknown arm(s): {', '.join(sorted(unknown))}")
    args.out.mkdir(parents=True, exist_ok=True)
    threads = max(1, (os.cpu_count() or 2) // args.jobs)
    with ThreadPoolExecutor(args.jobs) as pool:
        runs = list(pool.map(lambda a: _train(args, a, threads), arms))
    rows = []
    for arm, run in zip(arms, runs, strict=True):
        row = score_model(str(run), args.monuseg, args.brca)
        meta = json.loads((run / "model.json").read_text())
        row.update(arm=arm, train_wall_s=meta["train_wall_s"], steps=meta["steps"])
        rows.append(row)
        print(f"{arm}: scored", flush=True)
    (args.out / "levers.json").write_text(json.dumps(rows, indent=1) + "\n")
    print("| arm | " + " | ".join(t for _, t in COLUMNS) + " | train min |")
    print("|" + "---|" * (len(COLUMNS) + 2))
    for r in rows:
        values = " | ".join(f"{r[k]:.3f}" for k, _ in COLUMNS)
        print(f"| {r['arm']} | {values} | {r['train_wall_s'] / 60:.1f} |")


if __name__ == "__main__":
    main()

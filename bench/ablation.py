"""The method's ablation on real tissue: initial synthesis only, + refiner, + reference, + importance weights, full.

Usage::

    python -m bench.ablation --real DIR_OR_SLIDE ... --input-mpp 0.25 --images IMAGES --labels LABELS
        [--config configs/ablation.yaml] [--init pysynth/models/default] [--seeds 1] [--jobs 2] [--out out/ablation]

Every arm is one ``pysynth train --gan`` run with the same configuration, seed, data stream, starting weights
(``--init``) and number of steps; only the ablation switches differ:

=============  ==================================================================
arm            switches
=============  ==================================================================
initial        ``--no-refiner --no-reference --no-importance --no-hard``
+refiner       ``--no-reference --no-importance --no-hard``
+reference     ``--no-importance --no-hard``
+importance    ``--no-hard``
full           (none)
=============  ==================================================================

Arms run ``--jobs`` at a time, each on cores/jobs threads; an interrupted ablation resumes (each run resumes, and
finished runs are kept). Each final model is scored on the labelled images with the post-processing thresholds
its training chose on held-out synthetic patches: the labels are read only to score. Writes ``OUT/ablation.json``
and prints a Markdown table (DICE avg, AJI, PQ, wall time per arm, and the ``--init`` model as the starting point);
the table holds every finished run in ``OUT``, so a later call with other ``--arms``/``--seeds`` extends it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ARMS: dict[str, list[str]] = {
    "initial": ["--no-refiner", "--no-reference", "--no-importance", "--no-hard"],
    "+refiner": ["--no-reference", "--no-importance", "--no-hard"],
    "+reference": ["--no-importance", "--no-hard"],
    "+importance": ["--no-hard"],
    "full": [],
}


def _arm_dir(out: Path, arm: str, seed: int) -> Path:
    return out / f"{arm.lstrip('+')}-seed{seed}"


def _train(args: argparse.Namespace, config: Path, arm: str, seed: int) -> Path:
    run = _arm_dir(args.out, arm, seed)
    if (run / "model.json").exists():
        print(f"{run.name}: finished earlier, kept", flush=True)
        return run
    cmd = [sys.executable, "-c", "from pysynth.cli import main; main()", "train", "--gan", *ARMS[arm]]
    cmd += ["--config", str(config)]
    cmd += ["--init", str(args.init), "--seed", str(seed), "--out", str(run)]
    for real in args.real:
        cmd += ["--real", real]
    if args.input_mpp:
        cmd += ["--input-mpp", str(args.input_mpp)]
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    run.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with (run / "train.log").open("a") as log:
        done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, check=False)
    if done.returncode:
        raise SystemExit(f"{run.name}: pysynth train failed (exit {done.returncode}); see {run / 'train.log'}")
    print(f"{run.name}: trained in {(time.perf_counter() - started) / 60:.1f} min", flush=True)
    return run


def _score(model_dir: Path, pairs: list, mpp: float) -> dict[str, float]:
    from pysynth.metrics import mean_scores, score
    from pysynth.models.io import load_model
    from pysynth.segment import segment_rgb

    model, info = load_model(model_dir)
    return mean_scores([score(gt, segment_rgb(model, info, rgb, mpp, info.instances)) for rgb, gt in pairs]).to_dict()


def main(argv: list[str] | None = None) -> None:
    """Train the arms, score them, write ``ablation.json`` and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real", action="append", required=True, help="unlabelled tissue to synthesise from")
    parser.add_argument("--input-mpp", type=float, default=None)
    parser.add_argument("--images", type=Path, required=True, help="labelled images (scored only)")
    parser.add_argument("--labels", type=Path, required=True, help="their instance label maps")
    parser.add_argument("--mpp", type=float, default=0.25, help="µm/px of the labelled images")
    parser.add_argument("--config", type=Path, default=Path("configs/ablation.yaml"))
    parser.add_argument("--init", type=Path, default=Path("pysynth/models/default"))
    parser.add_argument("--arms", default=",".join(ARMS), help="comma-separated subset of " + ", ".join(ARMS))
    parser.add_argument("--seeds", default="1", help="comma-separated seeds; each arm is trained once per seed")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time")
    parser.add_argument("--out", type=Path, default=Path("out/ablation"))
    args = parser.parse_args(argv)

    import cv2
    import yaml

    from pysynth.fsutil import atomic_write_text
    from pysynth.io import load_rgb

    arms = [a for a in args.arms.split(",") if a]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        parser.error(f"unknown arm(s): {', '.join(unknown)}")
    seeds = [int(s) for s in args.seeds.split(",") if s]
    args.out.mkdir(parents=True, exist_ok=True)
    values = yaml.safe_load(args.config.read_text()) or {}
    values["threads"] = max(1, (os.cpu_count() or 1) // args.jobs)
    config = args.out / f"config-{values['threads']}t.yaml"  # runs in flight keep reading theirs
    atomic_write_text(config, yaml.safe_dump(values, sort_keys=False))

    jobs = [(arm, seed) for seed in seeds for arm in arms]
    with ThreadPoolExecutor(args.jobs) as pool:
        runs = list(pool.map(lambda job: _train(args, config, *job), jobs))

    pairs = []
    for label_path in sorted(args.labels.iterdir()):
        image_path = args.images / f"{label_path.stem}.png"
        if image_path.exists():
            pairs.append((load_rgb(image_path), cv2.imread(str(label_path), cv2.IMREAD_UNCHANGED)))
    rows = [{"arm": "start (--init)", "seed": None, "train_wall_s": None, **_score(args.init, pairs, args.mpp)}]
    # Every finished run in OUT is scored, so that arms or seeds added by a later call join the table.
    finished = {(arm, seed): run for (arm, seed), run in zip(jobs, runs, strict=True)}
    for path in sorted(args.out.glob("*-seed*/model.json")):
        name, seed = path.parent.name.rsplit("-seed", 1)
        arm = next((a for a in ARMS if a.lstrip("+") == name), None)
        if arm is not None and seed.isdigit():
            finished.setdefault((arm, int(seed)), path.parent)
    order = list(ARMS)
    for (arm, seed), run in sorted(finished.items(), key=lambda kv: (kv[0][1], order.index(kv[0][0]))):
        meta = json.loads((run / "model.json").read_text())
        row = {"arm": arm, "seed": seed, "steps": meta["steps"], "train_wall_s": meta["train_wall_s"]}
        row.update(_score(run, pairs, args.mpp))
        inst = meta["instances"]
        row["thresholds"] = [inst["detection_threshold"], inst["foreground_threshold"], inst["min_size"]]
        rows.append(row)
    result = {
        "config": values,
        "init": str(args.init),
        "images": len(pairs),
        "cpu_count": os.cpu_count(),
        "jobs": args.jobs,
        "rows": rows,
    }
    atomic_write_text(args.out / "ablation.json", json.dumps(result, indent=1))
    print("| arm | seed | Dice1 | Dice2 | DICE avg | AJI | PQ | train wall |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        wall = "" if r["train_wall_s"] is None else f"{r['train_wall_s'] / 60:.1f} min"
        print(
            f"| {r['arm']} | {r['seed'] if r['seed'] is not None else ''} | {r['dice1']:.3f} | {r['dice2']:.3f} | "
            f"{r['dice_avg']:.3f} | {r['aji']:.3f} | {r['pq']:.3f} | {wall} |"
        )


if __name__ == "__main__":
    main()

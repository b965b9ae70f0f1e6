"""A trained model's post-processing chosen again on its own held-out synthetic patches, by today's rule.

Usage::

    python -m pysynth.bench.thresholds MODEL --real SOURCE [--real SOURCE ...] [--input-mpp UM] [--json OUT]
        [--save DIR] [--min-area-grid]

``MODEL`` is a model folder or a shipped model's name; ``--real`` and ``--input-mpp`` are the sources it was trained
on, as its training command gave them. The held-out patches are rebuilt from the model's ``config.yaml`` exactly as
training made them (item ``VAL_OFFSET + k`` of its synthetic stream), so the grid reproduces the run's
``validation.json``; :func:`pysynth.train.loop.choose_thresholds` then chooses. Prints the model's recorded
post-processing, the chosen one, the reference setting (best mean AJI) and how many settings were as good as it.
The model folder is not changed; ``--save DIR`` writes a copy of it (a new folder) whose ``model.json`` has the
chosen post-processing, for ``pysynth segment --model DIR`` or ``bench.dev_scores DIR``. Synthetic labels only:
no real label is read.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any


def rechoose(model: str, real: list[Path], input_mpp: float | None, min_areas: bool = False) -> dict[str, Any]:
    """The recorded and the re-chosen post-processing of ``model``, with the reference row and the grid.

    ``min_areas``: the wider grid, with minimum nucleus areas (:func:`pysynth.train.loop.validate_thresholds`).
    """
    from pysynth.models.io import load_model, resolve_model_dir
    from pysynth.train.config import TrainConfig, load_config_file
    from pysynth.train.loop import VAL_OFFSET, ItemMaker, make_source, validate_thresholds

    folder = resolve_model_dir(model)
    config = TrainConfig.from_dict(load_config_file(folder / "config.yaml"))
    net, info = load_model(folder)
    net.eval()
    with tempfile.TemporaryDirectory(prefix="pysynth-thresholds-") as tmp:
        maker = ItemMaker(make_source(config, Path(tmp), real, None, input_mpp), config)
        items = [maker(VAL_OFFSET + k) for k in range(config.val_patches)]
        chosen, table, _ = validate_thresholds(net, items, config, Path(tmp), min_areas=min_areas)
    reference = max(table, key=lambda row: (row["aji"], row["pq"]))
    return {
        "model": model,
        "recorded": asdict(info.instances),
        "chosen": asdict(chosen),
        "chosen_row": table[0],
        "reference_row": reference,
        "as_good": sum(row["as_good"] for row in table),
        "settings": len(table),
    }


def save_rechosen(model: str, chosen: dict[str, Any], out: Path) -> None:
    """A copy of ``model``'s folder at ``out`` (which must not exist) with ``chosen`` as its post-processing."""
    import shutil

    from pysynth.errors import PysynthError
    from pysynth.fsutil import atomic_write_text
    from pysynth.models.io import META, resolve_model_dir

    if out.exists():
        raise PysynthError(f"{out} exists: --save writes a new folder")
    folder = resolve_model_dir(model)
    staging = out.with_name(f".{out.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(folder, staging)
    meta = json.loads((staging / META).read_text())
    meta["instances"] = dict(chosen)
    atomic_write_text(staging / META, json.dumps(meta, indent=1) + "\n")
    staging.rename(out)


def main(argv: list[str] | None = None) -> int:
    from pysynth.errors import PysynthError

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--real", type=Path, action="append", required=True)
    parser.add_argument("--input-mpp", type=float, default=None)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--save", type=Path, default=None, help="write a copy of the model with the chosen setting")
    parser.add_argument(
        "--min-area-grid", action="store_true", help="also search minimum nucleus areas of 4, 8, 12 and 16 µm²"
    )
    args = parser.parse_args(argv)
    try:
        if args.save is not None and args.save.exists():
            raise PysynthError(f"{args.save} exists: --save writes a new folder")
        result = rechoose(args.model, args.real, args.input_mpp, args.min_area_grid)
        if args.save is not None:
            save_rechosen(args.model, result["chosen"], args.save)
    except PysynthError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    c, r = result["chosen_row"], result["reference_row"]
    print(f"recorded: {json.dumps(result['recorded'])}")
    print(f"chosen:   {json.dumps(result['chosen'])}")
    print(
        f"chosen AJI {c['aji']:.4f} PQ {c['pq']:.4f}; reference (best mean AJI) AJI {r['aji']:.4f} PQ {r['pq']:.4f}"
        f" at minimum confidence {r['min_confidence']}; {result['as_good']} of {result['settings']} settings as good"
    )
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

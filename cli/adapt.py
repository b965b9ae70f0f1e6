"""``pysynth adapt``: self-training of a trained segmenter on a user's own unlabelled slides."""

from __future__ import annotations

import click

from pysynth.cli._options import (
    device_option,
    input_mpp_option,
    model_option,
    out_option,
    seed_option,
    setup_logging,
)


@click.command("adapt")
@click.option(
    "--real",
    "reals",
    multiple=True,
    required=True,
    metavar="REAL",
    help="The user's own unlabelled tissue: slides, images, folders, globs, or `pysynth sample` output (repeatable).",
)
@model_option
@input_mpp_option
@out_option
@click.option("--rounds", type=click.IntRange(min=1), default=None, help="Teacher → student rounds [config: 2].")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Optimiser steps per round [config: 600].")
@seed_option
@click.option(
    "--config",
    "config_file",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="YAML of parameters: `adapt:` (pysynth.train.adapt.AdaptConfig) and training ones as for `pysynth "
    "train`; flags win over it.",
)
@device_option
@click.option(
    "--overwrite", is_flag=True, help="Start afresh in an --out that holds an adaptation with other settings."
)
def adapt_command(
    reals: tuple[str, ...],
    model_dir: str | None,
    input_mpp: float | None,
    out_dir: str,
    rounds: int | None,
    steps: int | None,
    seed: int,
    config_file: str | None,
    device: str,
    overwrite: bool,
) -> int:
    """Adapt a model to your own slides: it labels them, and a student learns from what it is sure of.

    Each round the teacher (the model, then the previous round's student) labels real tiles of the slides with
    flip/rotation test-time augmentation; sure nuclei become labels, low-probability pixels background, the rest
    is ignored. The student starts from the teacher and trains on pseudo-labelled real crops mixed with synthetic
    patches (synthesis guided by the teacher). Resumable: run the same command again after an interruption.

    Writes to --out a model folder (model.pt + model.json, for `segment`/`infer --model`), rounds/ (per round:
    pseudo/ labels with stats.json, and train/, a training run) and rounds.json.
    """
    from pathlib import Path

    from tqdm import tqdm

    from pysynth.fsutil import prepare_output_dir
    from pysynth.models.io import read_model_info, resolve_model_dir
    from pysynth.segment import resolve_device
    from pysynth.sources import InputError, collect_sources
    from pysynth.train.adapt import AdaptConfig, adapt
    from pysynth.train.config import TrainConfig, load_config_file

    setup_logging()
    folder = resolve_model_dir(model_dir)
    read_model_info(folder)  # a folder that is not a model fails here, before anything is written
    values = load_config_file(config_file) if config_file else {}
    adapt_values = values.pop("adapt", None) or {}
    for key, value in (("rounds", rounds), ("steps", steps)):
        if value is not None:
            adapt_values[key] = value
    if "seed" not in values or seed != 0:
        values["seed"] = seed
    try:
        config = AdaptConfig.from_dict(adapt_values)
        base = TrainConfig.from_dict(values)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{config_file or 'adaptation settings'}: {exc}") from None
    real_paths = [Path(r) for r in reals]
    for r in real_paths:  # fail early on a path that does not exist or holds nothing usable
        if not (r / "manifest.csv").is_file():
            collect_sources([r])
    dev = resolve_device(device)
    out = prepare_output_dir(out_dir)
    bars: dict[str, tqdm] = {}

    def progress(stage: str, done: int, total: int) -> None:
        if stage not in bars:
            for bar in bars.values():
                bar.close()
            bars[stage] = tqdm(total=total, desc=stage, dynamic_ncols=True)
        bar = bars[stage]
        bar.n = done if "training" in stage else bar.n + done
        bar.refresh()

    try:
        summary = adapt(
            base,
            config,
            folder,
            out,
            real_paths,
            input_mpp=input_mpp,
            overwrite=overwrite,
            progress=progress,
            device=dev,
        )
    finally:
        for bar in bars.values():
            bar.close()
    for entry in summary["rounds"]:
        p, v = entry["pseudo_labels"], entry["validation"]
        click.echo(
            f"round {entry['round']}: {p['sure_per_tissue_mpx']:.0f} sure nuclei per tissue Mpx, "
            f"{100 * p['labelled_tissue']:.0f}% of tissue labelled; held-out synthetic AJI {v['aji']:.3f}"
        )
    click.echo(f"adapted model in {out}")
    return 0

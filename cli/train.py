"""``pysynth train``: the two-head U-Net, trained on synthetic patches made from real unlabelled tissue."""

from __future__ import annotations

import click

from pysynth.cli._options import input_mpp_option, out_option, setup_logging


@click.command("train")
@click.option(
    "--real",
    "reals",
    multiple=True,
    metavar="REAL",
    help="Real unlabelled tissue to synthesise from: slides, images, folders, globs, or `pysynth sample` output "
    "(repeatable).",
)
@click.option(
    "--synthetic",
    type=click.Path(exists=True, file_okay=False),
    default=None,
    metavar="DATASET",
    help="Train on a dataset written by `pysynth synthesize` instead of synthesising on the fly.",
)
@input_mpp_option
@out_option
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Optimiser steps [config: 3000].")
@click.option("--batch", type=click.IntRange(min=1), default=None, help="Patches per step [config: 16].")
@click.option("--seed", type=int, default=None, help="Random seed [config: 0].")
@click.option(
    "--config",
    "config_file",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="YAML (or JSON) of training parameters, nested as in the config.yaml a run writes; flags win over it.",
)
@click.option(
    "--init",
    "init_model",
    type=click.Path(exists=True, file_okay=False),
    default=None,
    metavar="MODEL",
    help="Start the segmenter from this model folder's weights (fine-tuning) [config: random initialisation].",
)
@click.option(
    "--gan",
    is_flag=True,
    help="The full method: reference-conditioned refiner, discriminator and importance-weighted segmenter, "
    "trained together (parameters under `joint:` in --config).",
)
@click.option("--no-refiner", is_flag=True, help="With --gan: segment the initial synthetic patches (ablation).")
@click.option("--no-reference", is_flag=True, help="With --gan: refiner and discriminator ignore the reference.")
@click.option("--no-importance", is_flag=True, help="With --gan: all importance weights 1 (ablation).")
@click.option("--no-hard", is_flag=True, help="With --gan: no hard-example term in the refiner's loss (ablation).")
@click.option(
    "--device",
    default="auto",
    show_default=True,
    help="Where to train: auto (a CUDA GPU if present, with bf16 autocast), cpu, cuda, cuda:1, ...",
)
@click.option("--overwrite", is_flag=True, help="Start afresh in an --out that holds a run with other settings.")
def train_command(
    reals: tuple[str, ...],
    synthetic: str | None,
    input_mpp: float | None,
    out_dir: str,
    steps: int | None,
    batch: int | None,
    seed: int | None,
    config_file: str | None,
    init_model: str | None,
    gan: bool,
    no_refiner: bool,
    no_reference: bool,
    no_importance: bool,
    no_hard: bool,
    device: str,
    overwrite: bool,
) -> int:
    """Train a segmenter on synthetic patches; resumes where an interrupted run in --out stopped.

    With --gan the full method trains three networks together (refiner, discriminator, segmenter weighted by the
    discriminator's importance weights) and also writes refiner.pt, discriminator.pt, joint.yaml,
    refined_grid.png and weight_histogram.png. It is opt-in: in the ablation (README) it gave no measurable gain
    at CPU budgets.

    Writes to --out: config.yaml (every parameter), checkpoint.pt, losses.csv, loss_curve.png, snapshots/, and
    at the end model.pt + model.json (with post-processing thresholds chosen on held-out synthetic patches), the
    folder that `pysynth segment --model` takes.
    """
    import time
    from pathlib import Path

    from tqdm import tqdm

    from pysynth.fsutil import prepare_output_dir
    from pysynth.segment import resolve_device
    from pysynth.sources import InputError
    from pysynth.train.config import TrainConfig, load_config_file
    from pysynth.train.joint import JointConfig, train_joint
    from pysynth.train.loop import train

    setup_logging()
    if bool(reals) == bool(synthetic):
        raise click.UsageError("give either --real sources or --synthetic DATASET (one of the two)")
    values = load_config_file(config_file) if config_file else {}
    joint_values = values.pop("joint", None) or {}
    ablations = {"refiner": no_refiner, "reference": no_reference, "importance": no_importance, "hard": no_hard}
    if any(ablations.values()) and not gan:
        raise click.UsageError("--no-refiner, --no-reference, --no-importance and --no-hard go with --gan")
    if joint_values and not gan:
        raise click.UsageError(f"{config_file} has a `joint:` section: add --gan to train the full method")
    joint_values.update({k: False for k, off in ablations.items() if off})
    for key, value in (("steps", steps), ("batch", batch)):
        if value is not None:
            values[key] = value
    if seed is not None:  # a flag wins over --config; without one the config's seed (or 0) stays
        values["seed"] = seed
    if init_model is not None:
        from pysynth.models.io import read_model_info

        read_model_info(init_model)  # a folder that is not a model fails here, before anything is written
        values["init"] = init_model
    try:
        config = TrainConfig.from_dict(values)
        joint = JointConfig.from_dict(joint_values) if gan else None
    except (TypeError, ValueError) as exc:
        raise InputError(f"{config_file or 'training configuration'}: {exc}") from None
    dev = resolve_device(device)
    out = prepare_output_dir(out_dir)
    real_paths = [Path(r) for r in reals]
    if reals:
        from pysynth.sources import collect_sources

        for r in real_paths:  # fail early on a path that does not exist or holds nothing usable
            if not (r / "manifest.csv").is_file():
                collect_sources([r])
    started = time.perf_counter()
    bar = tqdm(total=config.steps, desc="train", unit="step", dynamic_ncols=True)

    def progress(step: int, parts: dict[str, float]) -> None:
        bar.n = step
        if "loss" in parts:
            bar.set_postfix(loss=f"{parts['loss']:.4f}", refresh=False)
        bar.refresh()
        if step >= config.steps:
            bar.close()  # what follows (threshold selection) logs its own line below the finished bar

    try:
        run = train if joint is None else lambda c, o, **kw: train_joint(c, joint, o, **kw)
        summary = run(
            config,
            out,
            real=real_paths,
            synthetic=Path(synthetic) if synthetic else None,
            input_mpp=input_mpp,
            overwrite=overwrite,
            progress=progress,
            device=dev,
            sources_note=[r.name for r in real_paths] or [Path(synthetic).name],
        )
    finally:
        bar.close()
    v = summary["validation"]
    click.echo(
        f"trained {summary['steps']} steps ({_duration(summary['train_wall_s'])} of training steps in all runs; "
        f"this call {_duration(time.perf_counter() - started)}); held-out synthetic: "
        f"AJI {v['aji']:.3f}, PQ {v['pq']:.3f} (seed threshold {v['detection_threshold']}, foreground "
        f"{v['foreground_threshold']}); model in {out}"
    )
    return 0


def _duration(seconds: float) -> str:
    """``36 s``, ``4.2 min`` or ``1.5 h``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"

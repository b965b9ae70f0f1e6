"""``pysynth synthesize``: initial synthetic patches with nucleus instance labels, as a sharded dataset."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import click

from pysynth.cli._options import input_mpp_option, out_option, seed_option, setup_logging, workers_option


@click.command("synthesize")
@click.option(
    "--source",
    "sources",
    multiple=True,
    required=True,
    metavar="REAL",
    help="Real tissue: a folder from `pysynth sample`, or slides/images/folders/globs (repeatable).",
)
@click.option("--n", "n", type=click.IntRange(min=1), required=True, help="Synthetic patches to make.")
@click.option(
    "--size",
    type=click.IntRange(min=32, max=2048),
    default=None,
    help="Patch side in px (at 0.25 µm/px) [default: the --config's size, else 200].",
)
@out_option
@seed_option
@workers_option
@input_mpp_option
@click.option(
    "--config",
    "config_file",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="JSON file of synthesis parameters (see pysynth.synth.config.SynthConfig).",
)
@click.option(
    "--shard-size",
    type=click.IntRange(min=1, max=65536),
    default=1024,
    show_default=True,
    help="Patches per shard file.",
)
@click.option("--preview", is_flag=True, help="Also write preview.png: synthetic patches with outlines, beside real.")
@click.option(
    "--export-png",
    type=click.IntRange(min=0),
    default=0,
    metavar="K",
    show_default=True,
    help="Also write K patches, spread over the dataset, as PNGs (image, 16-bit labels, overlay) in DIR/png.",
)
@click.option("--overwrite", is_flag=True, help="Replace a dataset in --out made with other settings.")
def synthesize_command(
    sources: tuple[str, ...],
    n: int,
    size: int | None,
    out_dir: str,
    seed: int,
    workers: int,
    input_mpp: float | None,
    config_file: str | None,
    shard_size: int,
    preview: bool,
    export_png: int,
    overwrite: bool,
) -> int:
    """Paint random polygon nuclei into real tissue texture: N patches with instance labels and centres.

    Writes DIR/index.json, DIR/shards/*.shard (zstd) and DIR/sources/ (the prepared real tiles). The same seed
    gives byte-identical files whatever --workers; an interrupted run resumes where it stopped.
    """
    import json
    from pathlib import Path

    from tqdm import tqdm

    from pysynth.errors import PysynthError
    from pysynth.fsutil import prepare_output_dir
    from pysynth.synth.config import SynthConfig
    from pysynth.synth.generate import synthesize_dataset, write_preview

    setup_logging()
    values = {}
    if config_file:
        try:
            values = json.loads(Path(config_file).read_text())
        except (OSError, ValueError) as exc:
            raise PysynthError(f"{config_file}: not a readable JSON file ({exc})") from None
    try:
        config = SynthConfig.from_dict({**values, **({"size": size} if size is not None else {})})
    except (ValueError, TypeError) as exc:
        raise click.BadParameter(str(exc), param_hint="--config") from None
    out = prepare_output_dir(out_dir)
    with (
        tqdm(total=n, unit="patch", desc="synthesizing", dynamic_ncols=True, smoothing=0.1) as bar,
        _in_option_terms(),
    ):
        report, failures = synthesize_dataset(
            [Path(s) for s in sources],
            out,
            n,
            config,
            seed=seed,
            workers=workers,
            input_mpp=input_mpp,
            shard_size=shard_size,
            overwrite=overwrite,
            progress=bar.update,
        )
    kept = f", {report.skipped} shard(s) kept from an earlier run" if report.skipped else ""
    click.echo(
        f"{report.items} synthetic patches of {config.size} px -> {out} ({report.written} shard(s) written{kept})"
    )
    if preview:
        click.echo(f"preview: {write_preview(out)}")
    if export_png:
        import numpy as np

        from pysynth.synth.store import SynthDataset
        from pysynth.synth.store import export_png as export

        ds = SynthDataset(out)
        picks = np.unique(np.linspace(0, len(ds) - 1, min(export_png, len(ds))).astype(int))
        (out / "png").mkdir(exist_ok=True)
        export(ds, out / "png", picks.tolist())
        click.echo(f"png: {len(picks)} patches -> {out / 'png'}")
    if failures:  # as `pysynth sample` does: the usable sources are done, the others named, exit status 1
        click.echo(f"failed: {len(failures)} source(s) (the dataset was made from the others)", err=True)
        for message in failures:
            click.echo(f"  error: {message}", err=True)
        return 1
    return 0


#: How the command line names what a dataset records (see pysynth.synth.generate._check_earlier_dataset).
_OPTION_TERMS = {
    "n": "--n",
    "shard_size": "--shard-size",
    "seed": "--seed",
    "config.size": "--size",
    "sources": "source tile names",
    "guide_digest": "guide model weights",
    "schema": "item layout (made by another pysynth version)",
    "attrs": "synthesis settings",
}


@contextlib.contextmanager
def _in_option_terms() -> Iterator[None]:
    """Re-raise a refused dataset folder in this command's terms: its options, and ``--overwrite``."""
    from pysynth.errors import PysynthError
    from pysynth.synth.store import DatasetMismatchError

    try:
        yield
    except DatasetMismatchError as exc:
        named = []
        for key, detail in exc.changes:
            term = _OPTION_TERMS.get(key) or (f"--config {key[7:]}" if key.startswith("config.") else key)
            named.append(f"{term} ({detail})" if detail else term)
        what = "made from other" if exc.changes[0][0] == "real tissue" else "made with other settings:"
        raise PysynthError(
            f"{exc.path}: holds a dataset {what} {', '.join(named)}; use another folder, or --overwrite to replace it"
        ) from None

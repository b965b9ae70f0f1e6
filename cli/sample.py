"""``pysynth sample``: random tissue patches from slides and images."""

from __future__ import annotations

import click

from pysynth.cli._options import (
    FiniteFloatRange,
    input_mpp_option,
    mpp_option,
    out_option,
    seed_option,
    setup_logging,
    workers_option,
)


@click.command("sample")
@click.argument("inputs", nargs=-1, required=True, metavar="SLIDES_OR_IMAGES...")
@out_option
@click.option(
    "--n-per-slide",
    type=click.IntRange(min=1),
    default=100,
    show_default=True,
    help="Patches per slide or image.",
)
@click.option(
    "--size",
    type=click.IntRange(min=8, max=16384),
    default=460,
    show_default=True,
    help="Patch side in pixels.",
)
@mpp_option
@click.option(
    "--min-tissue",
    type=FiniteFloatRange(0.0, 1.0),
    default=0.7,
    show_default=True,
    help="Least tissue fraction of a patch.",
)
@seed_option
@workers_option
@input_mpp_option
@click.option("--preview", is_flag=True, help="Also write contact_sheet.png and overview/<slide>.png.")
@click.option(
    "--overwrite",
    is_flag=True,
    help="Replace an earlier run in --out made with other settings, and redo sources whose file changed.",
)
def sample_command(
    inputs: tuple[str, ...],
    out_dir: str,
    n_per_slide: int,
    size: int,
    mpp: float,
    min_tissue: float,
    seed: int,
    workers: int,
    input_mpp: float | None,
    preview: bool,
    overwrite: bool,
) -> int:
    """Sample random non-overlapping tissue patches (PNG) from slides, images, folders or globs.

    Writes DIR/<slide>_<i>.png and DIR/manifest.csv (source, level-0 x/y, size, µm/px, tissue fraction, the run
    that made the row). The same seed gives the same patches whatever --workers. DIR records what made each
    source's patches (.pysynth-ledger.jsonl): a rerun keeps finished sources (an interrupted run resumes where it
    stopped), adds new ones, and the manifest lists every source the folder holds; a source whose file changed is
    refused unless --overwrite. Sources that share a stem are named by their folders (case17/HE.svs ->
    case17_HE), whatever the order on the command line.
    """
    from tqdm import tqdm

    from pysynth.fsutil import prepare_output_dir
    from pysynth.sample import SampleConfig, sample, write_preview
    from pysynth.sources import collect_sources

    setup_logging()
    sources = collect_sources(inputs)
    out = prepare_output_dir(out_dir)
    config = SampleConfig(
        n_per_slide=n_per_slide, size=size, mpp=mpp, min_tissue=min_tissue, seed=seed, input_mpp=input_mpp
    )
    with tqdm(total=len(sources) * n_per_slide, unit="patch", desc="sampling", dynamic_ncols=True) as bar:
        report = sample(
            sources,
            None,
            out,
            config,
            workers=workers,
            overwrite=overwrite,
            progress=bar.update,
        )
    for res in report.results:
        if res.warning:
            click.echo(f"warning: {res.warning}", err=True)
    if report.skipped:
        click.echo(f"resumed: {report.skipped} source(s) were already done", err=True)
    ok = len(report.results) - len(report.failures)
    click.echo(
        f"{report.patches} patches from {ok} of {len(report.results)} source(s); the manifest lists "
        f"{report.manifest_rows} -> {report.manifest}"
    )
    if preview and report.patches:
        click.echo(f"preview: {write_preview(report, out, config)}")
    if report.failures:
        click.echo(f"failed: {len(report.failures)} source(s)", err=True)
        for res in report.failures:
            click.echo(f"  error: {res.error}", err=True)
        return 1
    return 0

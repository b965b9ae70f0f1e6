"""``pysynth bench``: time pysynth next to straightforward library baselines, on this machine."""

from __future__ import annotations

import click

SECTION_CHOICES = ("synthesis", "kernels", "store", "segment", "weighted_loss", "infer", "all")


@click.command("bench")
@click.option("--quick", is_flag=True, help="Fewer, smaller samples: a smoke run of under a minute.")
@click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False, writable=True),
    default=None,
    help="Also write the timings, machine, versions and commit to this JSON file.",
)
@click.option(
    "--section",
    type=click.Choice(SECTION_CHOICES),
    default="all",
    show_default=True,
    help="Which benchmarks to run.",
)
def bench_command(quick: bool, json_path: str | None, section: str) -> int:
    """Time synthesis, the C++ kernels, the dataset store, segmentation and the fused loss against baselines.

    Prints one table per section (median and spread per item, items/s, speed-up over the baseline measured
    in the same run). Timings on shared machines are noisy: compare ratios, not absolute times.
    """
    from pysynth.bench.suite import SECTIONS, format_section, load_section, run_section, write_record
    from pysynth.errors import PysynthError

    names = list(SECTIONS) if section == "all" else [section]
    if section != "all" and load_section(section) is None:
        raise PysynthError(f"{section} section not available (pysynth.bench.{section} is not part of this build)")
    results = []
    for name in names:
        result = run_section(name, quick)
        results.append(result)
        click.echo(format_section(result) + "\n")
    if json_path:
        write_record(json_path, results, quick)
        click.echo(f"timings -> {json_path}")
    return 0

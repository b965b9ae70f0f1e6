"""The ``pysynth`` command line: one Click command per file, no algorithms here."""

from __future__ import annotations

import sys

import click

from pysynth import __version__
from pysynth.cli.adapt import adapt_command
from pysynth.cli.bench import bench_command
from pysynth.cli.evaluate import evaluate_command
from pysynth.cli.infer import infer_command
from pysynth.cli.sample import sample_command
from pysynth.cli.segment import segment_command
from pysynth.cli.synthesize import synthesize_command
from pysynth.cli.train import train_command


def _version_message() -> str:
    try:
        from pysynth import _core

        core = _core.build_info()["compiler"]
    except ImportError as exc:  # the package still reports its version with a broken build
        core = f"not loadable: {exc}"
    python = ".".join(str(v) for v in sys.version_info[:3])
    return f"pysynth {__version__} (distribution pysynth-histo; Python {python}; C++ core: {core})"


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, "-V", "--version", message=_version_message())
def cli() -> None:
    """Learn to segment nuclei in H&E slides without annotations, then segment whole slides."""


cli.add_command(adapt_command)
cli.add_command(bench_command)
cli.add_command(evaluate_command)
cli.add_command(infer_command)
cli.add_command(sample_command)
cli.add_command(segment_command)
cli.add_command(synthesize_command)
cli.add_command(train_command)


def main(argv: list[str] | None = None) -> None:
    """Run the command line; user errors end as one ``error:`` line and a non-zero exit status.

    Exit status: 0 success, 1 a data or environment problem (or some inputs failed), 2 a usage error,
    130 interrupted.
    """
    from pysynth.errors import PysynthError
    from pysynth.sources import InputError

    args = sys.argv[1:] if argv is None else list(argv)
    if not args:  # bare `pysynth`: its help, as `pysynth --help` (not a usage error)
        args = ["--help"]
    try:
        status = cli.main(args=args, prog_name="pysynth", standalone_mode=False)
    except click.UsageError as exc:
        where = f"{exc.ctx.command_path}: " if exc.ctx is not None else ""
        hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
        click.echo(f"error: {where}{exc.format_message()}{hint}", err=True)
        sys.exit(2)
    except click.ClickException as exc:
        click.echo(f"error: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code)
    except InputError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except PysynthError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    except OSError as exc:  # disk full, permissions, ... while writing results
        where = f"{exc.filename}: " if exc.filename else ""
        click.echo(f"error: {where}{exc.strerror or exc}", err=True)
        sys.exit(1)
    except (KeyboardInterrupt, click.Abort):
        click.echo("interrupted: finished work is kept; run the same command again to resume", err=True)
        sys.exit(130)
    sys.exit(status if isinstance(status, int) else 0)

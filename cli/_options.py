"""Options shared by several commands, and the progress/logging set-up of the command line."""

from __future__ import annotations

import logging
import math
import sys
from typing import Any

import click


class FiniteFloatRange(click.FloatRange):
    """:class:`click.FloatRange` that also refuses ``nan`` and ``±inf`` (a usage error, like any bad value).

    ``float()`` accepts "nan" and "inf", and nan passes every range check (all comparisons with it are false).
    """

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        """The number, checked finite before the range check."""
        number = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{number} is not a finite number.", param, ctx)
        return super().convert(number, param, ctx)


input_mpp_option = click.option(
    "--input-mpp",
    type=FiniteFloatRange(min=0, min_open=True),
    default=None,
    metavar="UM",
    help="Resolution (µm/px) of inputs whose files carry none, e.g. PNG tiles (0.25 for 40x, 0.5 for 20x). "
    "Resolution metadata in a slide wins.",
)
mpp_option = click.option(
    "--mpp",
    type=FiniteFloatRange(min=0.05, max=50.0),
    default=0.25,
    show_default=True,
    metavar="UM",
    help="Working resolution in µm/px (0.25 = 40x; 20x material is upsampled).",
)
seed_option = click.option("--seed", type=int, default=0, show_default=True, help="Random seed.")
workers_option = click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Worker processes. Results do not depend on it.",
)
model_option = click.option(
    "--model",
    "model_dir",
    type=click.Path(file_okay=False),
    default=None,
    metavar="DIR",
    help="Model folder from `pysynth train` or `adapt`, or a shipped model by name: default (guided synthesis), "
    "plain (the published synthesis) [default: default].",
)
device_option = click.option(
    "--device",
    default="auto",
    show_default=True,
    help="Where the network runs: auto (a CUDA GPU if present), cpu, cuda, cuda:1, ...",
)
precision_option = click.option(
    "--precision",
    type=click.Choice(["auto", "fp32", "bf16", "fp16"]),
    default="auto",
    show_default=True,
    help="Network arithmetic: auto = fp16 autocast on a GPU, fp32 on the CPU (bf16 is slower on CPUs without "
    "native bf16 units).",
)

tta_option = click.option(
    "--tta",
    type=click.Choice(["1", "2", "4", "8"]),
    default="1",
    show_default=True,
    callback=lambda ctx, param, value: int(value),
    help="Test-time augmentation: average the network's maps over N flips/rotations of the input (2: + mirror; "
    "4: + the half turn and up-down mirror; 8: all, with the quarter turns). N times the network's cost.",
)
min_confidence_option = click.option(
    "--min-confidence",
    type=FiniteFloatRange(0.0, 1.0),
    default=None,
    metavar="C",
    help="Drop nuclei whose confidence (mean segmentation probability over their pixels) is below C; the rest "
    "are renumbered. [default: the model's own, chosen without labels on held-out synthetic patches when it was "
    "trained; 0 keeps all]",
)


lymphocyte_call_option = click.option(
    "--lymphocyte-call",
    type=click.Choice(["probability", "probability+rule"]),
    default="probability",
    show_default=True,
    help="With a model that has a class output: call a nucleus Lymphocyte by its probability at the threshold, or "
    "by its log-odds against the threshold plus a small-dark-round rule over the image's (segment) or slide's "
    "(infer) nuclei (better ranked on BRCA-M2C, but it also calls the smallest darkest nuclei of slides with few "
    "lymphocytes; README 'Lymphocytes').",
)


keep_dye_option = click.option(
    "--keep-dye",
    is_flag=True,
    help="Keep found objects of tissue-marking dye's colours (blue, teal, green ink: red absorbed far more than "
    "green, which no mix of hematoxylin and eosin gives); by default they are dropped, not counted as nuclei.",
)


lymphocyte_threshold_option = click.option(
    "--lymphocyte-threshold",
    type=FiniteFloatRange(0.0, 1.0),
    default=None,
    metavar="P",
    help="With a model that has a class output: classify nuclei whose lymphocyte probability is at least P as "
    "Lymphocyte. [default: the model's own, chosen without labels]",
)


def resolve_precision(precision: str, device_type: str) -> str:
    """``--precision`` for a device: ``auto`` becomes fp16 on CUDA and fp32 elsewhere; fp16 needs CUDA."""
    if precision == "auto":
        return "fp16" if device_type == "cuda" else "fp32"
    if precision == "fp16" and device_type != "cuda":
        raise click.UsageError("--precision fp16 needs a GPU (--device cuda)")
    return precision


out_option = click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=str),
    required=True,
    metavar="DIR",
    help="Output folder (created if needed).",
)


class _TqdmHandler(logging.Handler):
    """Log lines printed above any progress bar, as ``warning: ...``."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        tqdm.write(f"{record.levelname.lower()}: {record.getMessage()}", file=sys.stderr)


def setup_logging(verbose: bool = False) -> None:
    """Send pysynth's log to stderr in the command line's format (idempotent)."""
    logger = logging.getLogger("pysynth")
    if not any(isinstance(h, _TqdmHandler) for h in logger.handlers):
        logger.addHandler(_TqdmHandler())
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    logger.propagate = False

"""One training run in its folder, for plain and joint training alike: everything but what a step does.

:class:`TrainingRun` claims the folder, resumes from its checkpoint, runs the steps (the next batch made while
one trains, a first Ctrl-C stopping at a step end), logs ``losses.csv`` rows, writes checkpoints and snapshots,
and starts the summary. A loop supplies what a step does, the networks its checkpoint holds and how a logged row
is made of the steps since the last one. Those steps (the logging *window*) are part of the checkpoint, so a
resumed run logs the same rows as an uninterrupted one.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch

from pysynth.errors import PysynthError
from pysynth.fsutil import atomic_write_bytes
from pysynth.runs import CHECKPOINT, StopAtStepEnd, claim_run

if TYPE_CHECKING:
    from pysynth.train.config import TrainConfig

log = logging.getLogger("pysynth")

SNAPSHOTS = "snapshots"
#: A ``losses.csv`` row every this many steps (and at the last step).
LOG_EVERY = 10


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` to ``path`` written whole or not at all (an interrupted save leaves the previous file)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(path: Path, fmt: str, version: int) -> dict[str, Any]:
    """A checkpoint's state (tensors and plain data only: nothing in it is executed).

    Raises:
        PysynthError: If the file is unreadable, of another kind of run, or of another version.
    """
    import pickle

    advice = "delete it or train with --overwrite"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise PysynthError(f"{path}: corrupt or unreadable checkpoint ({first}); {advice}") from None
    if not isinstance(state, dict) or state.get("format") != fmt:
        kind = state.get("format", "an unknown kind") if isinstance(state, dict) else "an unknown kind"
        raise PysynthError(f"{path}: checkpoint of {kind}, not {fmt}; {advice}")
    if state.get("version") != version:
        raise PysynthError(f"{path}: checkpoint version {state.get('version')}, this pysynth reads {version}")
    return state


def write_losses(out_dir: Path, rows: list[dict[str, float]], columns: Sequence[str]) -> None:
    """``losses.csv`` (replaced whole) and ``loss_curve.png`` from the logged rows."""
    part = out_dir / "losses.csv.part"
    with part.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, list(columns))
        writer.writeheader()
        writer.writerows(rows)
    part.replace(out_dir / "losses.csv")
    if rows:
        _plot_losses(rows, out_dir / "loss_curve.png")


def _plot_losses(rows: list[dict[str, float]], path: Path) -> None:
    from pysynth.viz import line_plot

    steps = np.array([r["step"] for r in rows], np.float64)
    names = [key for key in ("loss", "bce_detection", "bce_segmentation") if key in rows[0]]
    series = {key: np.array([r[key] for r in rows], np.float64) for key in names}
    image = line_plot(steps, series, title="training loss", xlabel="step", log_y=True)
    import cv2

    atomic_write_bytes(path, cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))[1].tobytes())


class StepResult(NamedTuple):
    """What a loop's step returns to :meth:`TrainingRun.run_steps`."""

    #: The step's entry in the logging window (checkpointed: tensors on the CPU, plain data otherwise).
    record: Any
    #: The segmenter's learning rate at the step (logged).
    lr: float
    #: What the progress callback shows for the step, e.g. ``{"loss": 0.31}``.
    shown: dict[str, float]


class TrainingRun:
    """A training run's folder, counters, logging window, checkpoints and step loop.

    Use: :meth:`claim` the folder, build the networks, :meth:`resume` (which also says what the checkpoint holds
    besides the run's own counters), :meth:`run_steps`, then :meth:`summary`.

    Attributes:
        out_dir: The run folder.
        config: The segmenter's training configuration (steps, checkpoint and snapshot intervals, seed, threads).
        step: Steps done (all runs of this folder together).
        wall_s: Seconds spent in training steps (all runs together).
        rows: The logged ``losses.csv`` rows.
        window: The steps since the last row, one record each (:attr:`StepResult.record`).
        counters: The loop's own counters, checkpointed under their names (joint training: ``g_steps``, ...).
    """

    def __init__(
        self,
        out_dir: str | Path,
        config: TrainConfig,
        *,
        checkpoint_format: str,
        checkpoint_version: int,
        columns: Sequence[str],
        make_row: Callable[[TrainingRun, float], dict[str, float]],
        progress: Callable[[int, dict[str, float]], None] | None = None,
        counters: dict[str, Any] | None = None,
    ) -> None:
        """A run in ``out_dir``; nothing is read or written yet.

        Args:
            out_dir: The run folder.
            config: The segmenter's training configuration.
            checkpoint_format: The ``format`` written into and required of the checkpoint.
            checkpoint_version: Its ``version``.
            columns: The ``losses.csv`` columns.
            make_row: ``make_row(run, lr)``: the row logged after :attr:`step` from :attr:`window`.
            progress: Called with ``(step, shown)`` after each step, and with ``(step, {})`` on resuming.
            counters: The loop's own counters with their starting values.
        """
        self.out_dir = Path(out_dir)
        self.config = config
        self.checkpoint_format = checkpoint_format
        self.checkpoint_version = checkpoint_version
        self.columns = tuple(columns)
        self.make_row = make_row
        self.progress = progress
        self.step = 0
        self.wall_s = 0.0
        self.rows: list[dict[str, float]] = []
        self.window: list[Any] = []
        self.counters: dict[str, Any] = dict(counters or {})
        self._state: Callable[[], dict[str, Any]] = dict
        self._stop: StopAtStepEnd | None = None
        self._started = 0.0

    @property
    def checkpoint_path(self) -> Path:
        """The run's ``checkpoint.pt``."""
        return self.out_dir / CHECKPOINT

    def claim(self, files: dict[str, str], overwrite: bool, stale: Sequence[str] = ()) -> None:
        """Create and claim the folder (:func:`pysynth.runs.claim_run`), then set the threads and the torch seed.

        Raises:
            PysynthError: If the folder holds a run with other settings and ``overwrite`` is off.
        """
        self.out_dir.mkdir(parents=True, exist_ok=True)
        claim_run(self.out_dir, files, overwrite, stale=stale)
        if self.config.threads:
            torch.set_num_threads(self.config.threads)
        torch.manual_seed(self.config.seed)

    def resume(
        self,
        state: Callable[[], dict[str, Any]],
        restore: Callable[[dict[str, Any]], None],
        misfit: str = "does not fit this model ({}); use --overwrite",
    ) -> None:
        """Say what the checkpoint holds, and continue from the folder's checkpoint if there is one.

        Args:
            state: The loop's part of a checkpoint (networks, optimisers, buffers) as plain data and tensors.
            restore: Puts a loaded checkpoint's part back in place; raises ``KeyError``, ``RuntimeError``,
                ``ValueError`` or ``TypeError`` when it does not fit.
            misfit: The error message (after the path) for a checkpoint that does not fit; ``{}`` is the reason.

        Raises:
            PysynthError: If the checkpoint is unreadable, of another kind or version, or does not fit.
        """
        self._state = state
        path = self.checkpoint_path
        if not path.exists():
            return
        saved = load_checkpoint(path, self.checkpoint_format, self.checkpoint_version)
        try:
            restore(saved)
            step, wall_s, rows = int(saved["step"]), float(saved["wall_s"]), list(saved["rows"])
            # The steps since the last row: without them a resumed run's next row averages fewer steps. (Early
            # segmenter checkpoints have none.)
            window = list(saved.get("window", []))
            counters = {name: saved[name] for name in self.counters}
        except (KeyError, RuntimeError, ValueError, TypeError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise PysynthError(f"{path}: {misfit.format(first)}") from None
        self.step, self.wall_s, self.rows, self.window, self.counters = step, wall_s, rows, window, counters
        log.info("resuming at step %d of %d", self.step, self.config.steps)
        if self.progress is not None:
            self.progress(self.step, {})

    def save_checkpoint(self) -> None:
        """``checkpoint.pt`` (written atomically) with ``losses.csv`` and ``loss_curve.png`` of the rows so far."""
        state: dict[str, Any] = {"format": self.checkpoint_format, "version": self.checkpoint_version}
        state.update(step=self.step, wall_s=self.wall_s, rows=self.rows, window=list(self.window))
        state.update(self.counters)
        state.update(self._state())
        atomic_torch_save(state, self.checkpoint_path)
        write_losses(self.out_dir, self.rows, self.columns)

    def run_steps(
        self,
        batch: Callable[[int], Any],
        step: Callable[[int, Any], StepResult],
        snapshot: torch.nn.Module,
    ) -> None:
        """Steps :attr:`step` .. ``config.steps - 1``: ``step(t, batch(t))`` each, ``batch(t + 1)`` made meanwhile.

        After each step: the window gains its record, a row is logged every :data:`LOG_EVERY` steps, progress is
        reported, the checkpoint written every ``checkpoint_every`` steps (and at the end), ``snapshot``'s weights
        every ``snapshot_every`` steps. A first Ctrl-C stops after the step in progress, with a checkpoint.

        Raises:
            KeyboardInterrupt: After a Ctrl-C, once the step in progress is saved (or at once after a second one).
        """
        total = self.config.steps
        with StopAtStepEnd() as stop, ThreadPoolExecutor(1) as pool:  # the next batch is made while this one trains
            self._stop = stop
            pending = pool.submit(batch, self.step) if self.step < total else None
            while self.step < total:
                self._started = time.perf_counter()
                assert pending is not None
                data = pending.result()
                pending = pool.submit(batch, self.step + 1) if self.step + 1 < total else None
                self._end_step(step(self.step, data), snapshot)

    def _end_step(self, result: StepResult, snapshot: torch.nn.Module) -> None:
        """Count, log, report and save the step just done; stop here after a Ctrl-C."""
        c = self.config
        self.step += 1
        self.wall_s += time.perf_counter() - self._started
        self.window.append(result.record)
        if self.step % LOG_EVERY == 0 or self.step == c.steps:
            self.rows.append(self.make_row(self, result.lr))
            self.window = []
        if self.progress is not None:
            self.progress(self.step, result.shown)
        if self.step % c.checkpoint_every == 0 or self.step == c.steps:
            self.save_checkpoint()
        if c.snapshot_every and self.step % c.snapshot_every == 0:
            (self.out_dir / SNAPSHOTS).mkdir(exist_ok=True)
            atomic_torch_save(snapshot.state_dict(), self.out_dir / SNAPSHOTS / f"step_{self.step:06d}.pt")
        if self._stop is not None and self._stop.requested:
            self.save_checkpoint()
            log.info("interrupted: checkpoint saved at step %d", self.step)
            raise KeyboardInterrupt

    def summary(self, sources_note: Sequence[str], counts: dict[str, Any] | None = None, **more: Any) -> dict[str, Any]:
        """``model.json``'s summary: steps (then ``counts``), wall time, sources, the configuration, then ``more``."""
        return {
            "steps": self.step,
            **(counts or {}),
            "train_wall_s": round(self.wall_s, 1),
            "sources": list(sources_note),
            "train": json.loads(json.dumps(self.config.to_dict())),
            **more,
        }

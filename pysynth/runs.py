"""Run folders of long commands: claiming a folder for one set of settings, the record of a run's sources, Ctrl-C.

Nothing here is about training: ``train`` and ``adapt`` claim their folders with :func:`claim_run`, ``train`` and
``infer`` stop at a step (region) end with :class:`StopAtStepEnd`, and any command may record what it read with
:func:`sources_record`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pysynth.errors import PysynthError
from pysynth.fsutil import atomic_write_text

log = logging.getLogger("pysynth")

#: A training run's checkpoint: its presence means the run has made progress.
CHECKPOINT = "checkpoint.pt"
#: The content identity of what a run trains on (see :func:`sources_record`).
SOURCES_FILE = "sources.yaml"


def claim_run(
    out_dir: Path,
    files: dict[str, str],
    overwrite: bool,
    stale: Sequence[str] = (),
    progress_files: Sequence[str] = (CHECKPOINT, "model.pt"),
) -> None:
    """Refuse a folder that holds a run with other settings (unless ``overwrite``); write the resolved configs.

    A folder holds a run once it has made progress (a checkpoint or a model, ``progress_files``): until then a
    failed start (sources without tissue, a typo in the config) leaves nothing to protect, and the corrected
    command starts afresh with its own settings.

    Args:
        out_dir: The run folder.
        files: ``{file name: resolved YAML}`` that define the run (configuration, sources).
        overwrite: Start afresh: delete ``stale`` files (the checkpoint and losses always) instead of refusing.
        stale: Further outputs of an earlier run to delete on ``overwrite``.
        progress_files: Files whose presence means the run has made progress.

    Raises:
        PysynthError: If a file differs, the run has made progress and ``overwrite`` is off; the message lists
            the changed keys.
    """
    import yaml

    from pysynth.ledger import flatten

    started = any((out_dir / name).exists() for name in progress_files)
    if not overwrite and started:
        for name, resolved in files.items():
            path = out_dir / name
            if not path.exists() and name != "config.yaml" and (out_dir / "config.yaml").exists():
                log.warning("%s: the run has no record of its %s (an earlier pysynth); recording these", out_dir, name)
            if path.exists() and path.read_text() != resolved:
                old, new = flatten(yaml.safe_load(path.read_text()) or {}), flatten(yaml.safe_load(resolved))
                changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
                if not changed:  # only comments differ (a source's path)
                    continue
                raise PysynthError(
                    f"{out_dir}: holds a training run with other {'sources' if name == SOURCES_FILE else 'settings'} "
                    f"({', '.join(changed)}); "
                    "use another --out or --overwrite"
                )
    elif overwrite:
        for name in (CHECKPOINT, "losses.csv", *stale):
            (out_dir / name).unlink(missing_ok=True)
    for name, resolved in files.items():
        atomic_write_text(out_dir / name, resolved)


def sources_files(real: Sequence[Path], synthetic: Path | None) -> dict[str, str]:
    """``{SOURCES_FILE: record}`` for :func:`claim_run` when the run has sources; else nothing to record."""
    return {SOURCES_FILE: sources_record(real, synthetic)} if real or synthetic is not None else {}


def sources_record(real: Sequence[Path] = (), synthetic: Path | None = None) -> str:
    """What a run trains on, as YAML for :func:`claim_run`: the content identity of every source file.

    A ``pysynth sample`` folder counts by its ``manifest.csv``, a synthetic dataset by its ``index.json``, other
    sources by each slide or image they name. Paths are kept for the reader; a resume compares contents (size and
    hash, in order), so moved sources still resume and changed ones are refused.
    """
    import yaml

    from pysynth.ledger import file_identity
    from pysynth.sources import collect_sources
    from pysynth.synth.store import INDEX_NAME

    items = []
    files: list[Path] = []
    for r in real:
        manifest = Path(r) / "manifest.csv"
        files.extend([manifest] if manifest.is_file() else collect_sources([r]))
    if synthetic is not None and (Path(synthetic) / INDEX_NAME).is_file():  # else the dataset check says why
        files.append(Path(synthetic) / INDEX_NAME)
    for f in files:
        ident = file_identity(f)
        items.append({"content": f"{ident['size']}:{ident['hash']}", "path": ident["path"]})
    # The paths are comments: for the reader, not compared (a moved source folder still resumes).
    comments = "".join(f"# {k}: {i['path']}\n" for k, i in enumerate(items))
    return comments + yaml.safe_dump({"contents": [i["content"] for i in items]}, sort_keys=False)


class StopAtStepEnd:
    """Ctrl-C handling for long loops (training steps, `infer`'s regions): ``requested`` after a first SIGINT.

    A first Ctrl-C only asks the loop to stop after the current step; a second one interrupts at once. The loop
    then saves a whole step (a checkpoint, a region), so nothing done is lost on resume.
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> StopAtStepEnd:
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        import signal

        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

"""What made each result of an output folder: the record that lets reruns keep, make, refuse or redo results.

Every command that writes one result per input (``sample``, ``segment``, ``infer``) keeps a ledger in its output
folder, ``.pysynth-ledger.jsonl``: a journal of JSON lines, appended (and synced) as results finish, so recording a
result costs one line whatever the folder holds, and a line cut short by a crash is ignored. An entry per output
name records the input that made it (resolved path and content identity: size and a BLAKE2 hash of its head and
tail), the settings that decide the result, the files it wrote and the run that made it; the ledger also lists
every run (when, which pysynth, which settings, what it did). A rerun then

- keeps an entry whose input and settings still match (and whose files are all there),
- makes what is missing,
- refuses, or with ``--overwrite`` redoes, an entry made from another input or with other settings, and
- never rewrites a result the folder has no record of (an earlier version's or a stranger's files): that is a
  refusal too unless ``--overwrite``.

Output names are stable: an input keeps the name the ledger gave it, and inputs that share a stem are named from
their path relative to the common folder of all same-stem inputs (``case17/HE.svs`` -> ``case17_HE``), whatever
the order on the command line. One process writes a ledger at a time (an advisory lock on the ledger file: a
second run into the same folder is refused while the first runs).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pysynth.errors import PysynthError

LEDGER = ".pysynth-ledger.jsonl"
LEDGER_FORMAT = "pysynth-ledger"
LEDGER_VERSION = 1
#: Bytes hashed at each end of an input file; files up to twice this size are hashed whole.
HASH_SPAN = 1 << 20


def read_ledger(folder: str | Path) -> dict[str, Any]:
    """The run record of an output folder as ``{"command", "runs", "entries"}`` (for scripts and tests).

    Raises:
        PysynthError: If the folder has no record, or it is not one.
    """
    path = Path(folder) / LEDGER
    if not path.exists():
        raise PysynthError(f"{folder}: no run record ({LEDGER})")
    ledger = Ledger.__new__(Ledger)
    ledger.path, ledger.entries, ledger.runs = path, {}, []
    header = ledger._replay()
    return {"command": header.get("command"), "runs": ledger.runs, "entries": ledger.entries}


class SettingsMismatch(PysynthError):
    """An output already exists, made from another input or with other settings (kept as it is)."""


def file_identity(path: str | Path) -> dict[str, Any]:
    """Content identity of a file: resolved path, size, modification time and a hash of its head and tail.

    Two files are taken as the same content when size and hash agree (:func:`same_content`); the path and the
    modification time are recorded for the reader, so a slide copied to another disk keeps its results.

    Raises:
        PysynthError: If the file cannot be read.
    """
    path = Path(path)
    try:
        stat = path.stat()
        digest = hashlib.blake2b(digest_size=16)
        digest.update(str(stat.st_size).encode())
        with path.open("rb") as handle:
            if stat.st_size <= 2 * HASH_SPAN:
                digest.update(handle.read())
            else:
                digest.update(handle.read(HASH_SPAN))
                handle.seek(stat.st_size - HASH_SPAN)
                digest.update(handle.read(HASH_SPAN))
    except OSError as exc:
        raise PysynthError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    return {
        "path": str(path.resolve()),
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "hash": digest.hexdigest(),
    }


def same_content(a: Mapping[str, Any] | None, b: Mapping[str, Any] | None) -> bool:
    """Whether two :func:`file_identity` records describe the same bytes (size and hash)."""
    return a is not None and b is not None and a.get("size") == b.get("size") and a.get("hash") == b.get("hash")


def stable_names(paths: Sequence[Path], taken: Mapping[str, str] | None = None) -> list[str]:
    """A file-name-safe output name per input, independent of the order of ``paths``.

    An input's name is its stem; inputs whose stems repeat (ignoring case, for case-insensitive file systems),
    among ``paths`` and the inputs of ``taken``, are named by their path relative to the common folder of all of
    them, folders joined by ``_`` (``a/case17/HE.svs``, ``a/case18/HE.svs`` -> ``case17_HE``, ``case18_HE``). A
    name still in use gets ``-2``, ``-3`` ... in the order of the resolved paths.

    Args:
        paths: The inputs to name.
        taken: ``{name: resolved input path}`` already given out (from a ledger); those names are not reused.

    Returns:
        The names, in the order of ``paths``.
    """
    taken = dict(taken or {})
    resolved = [Path(p).resolve() for p in paths]
    by_stem: dict[str, set[Path]] = {}
    for p in [*resolved, *(Path(t) for t in taken.values())]:
        by_stem.setdefault((p.stem or "source").casefold(), set()).add(p)
    used = {name.casefold() for name in taken}
    names: dict[Path, str] = {}
    for p in sorted(set(resolved)):
        group = by_stem[(p.stem or "source").casefold()]
        if len(group) == 1:
            base = p.stem or "source"
        else:
            common = Path(os.path.commonpath([str(q.parent) for q in group]))
            parts = [*p.parent.relative_to(common).parts, p.stem or "source"]
            base = "_".join(parts)
        name, count = base, 1
        while name.casefold() in used:
            count += 1
            name = f"{base}-{count}"
        used.add(name.casefold())
        names[p] = name
    return [names[p] for p in resolved]


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested settings as one level, keys joined by ``.`` (``{"a": {"b": 1}}`` -> ``{"a.b": 1}``)."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def settings_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """``key old -> new`` for each setting that differs (nested keys joined by ``.``)."""
    a, b = flatten(old), flatten(new)
    return [f"{k} {a.get(k)} -> {b.get(k)}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


@dataclass
class Verdict:
    """What a rerun does with one input: ``"keep"``, ``"make"``, ``"redo"`` or ``"refuse"`` (with why)."""

    action: str
    reason: str = ""


class Ledger:
    """The record of one output folder (see the module docstring); use as a context manager.

    Args:
        folder: The output folder (exists, writable).
        command: The command that owns the folder (``"segment"``, ...); a ledger of another command is refused.
        settings: The settings of this run as a whole (recorded in the run's entry).
    """

    def __init__(self, folder: str | Path, command: str, settings: Mapping[str, Any] | None = None) -> None:
        from pysynth import __version__

        self.folder = Path(folder)
        self.path = self.folder / LEDGER
        self.command = command
        self._lock: Any = None
        self.entries: dict[str, dict[str, Any]] = {}
        self.runs: list[dict[str, Any]] = []
        if self.path.exists():
            header = self._replay()
            if header.get("command") != command:
                raise PysynthError(
                    f"{self.folder}: holds results of `pysynth {header.get('command')}`, not `{command}`; "
                    "use another --out"
                )
        self.run_id = max((int(r.get("run", 0)) for r in self.runs), default=0) + 1
        self.runs.append(
            {"run": self.run_id, "started": _now(), "pysynth": __version__, "settings": dict(settings or {})}
        )
        self._saved_run: str | None = None
        self._checked_end = False

    def _replay(self) -> dict[str, Any]:
        """Read the journal: later lines win; a last line cut short (a crash while appending) is ignored."""
        try:
            lines = self.path.read_bytes().split(b"\n")
        except OSError as exc:
            raise PysynthError(f"{self.path}: unreadable run record ({exc.strerror or exc})") from None
        header: dict[str, Any] = {}
        runs: dict[int, dict[str, Any]] = {}
        for number, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except ValueError:
                if number == len(lines) - 1:  # the unterminated last line of an interrupted append
                    continue
                raise PysynthError(
                    f"{self.path}: line {number + 1} is not JSON; move the record away to start afresh"
                ) from None
            kind = item.pop("type", None) if isinstance(item, dict) else None
            if number == 0:
                if kind != "header" or item.get("format") != LEDGER_FORMAT:
                    raise PysynthError(f"{self.path}: not a pysynth run record")
                if item.get("version", 0) > LEDGER_VERSION:
                    raise PysynthError(f"{self.path}: written by a newer pysynth (record version {item['version']})")
                header = item
            elif kind == "run":
                runs[int(item["run"])] = item
            elif kind == "entry":
                self.entries[item.pop("name")] = item
            elif kind == "forget":
                self.entries.pop(item["name"], None)
        self.runs = [runs[k] for k in sorted(runs)]
        return header

    # --- locking and saving ---------------------------------------------------------------------------------------

    def __enter__(self) -> Ledger:
        try:
            import fcntl
        except ImportError:  # no advisory locks on this platform: one run at a time is the user's care
            return self
        lock_path = self.folder / f"{LEDGER}.lock"
        handle = lock_path.open("a")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            raise PysynthError(
                f"{self.folder}: another pysynth run is writing to this folder; wait for it or use another --out"
            ) from None
        self._lock = handle
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(OSError):
            self.save()
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def _append(self, item: dict[str, Any]) -> None:
        """Append one line to the journal and sync it (the journal is created with its header first)."""
        lines = []
        size = self.path.stat().st_size if self.path.exists() else 0
        if size and not self._checked_end:  # drop a last line cut short by a crash: the journal stays whole lines
            with self.path.open("r+b") as handle:
                handle.seek(-1, os.SEEK_END)
                if handle.read(1) != b"\n":
                    size = self.path.read_bytes().rfind(b"\n") + 1
                    handle.truncate(size)
        self._checked_end = True
        if not size:
            header = {"type": "header", "format": LEDGER_FORMAT, "version": LEDGER_VERSION, "command": self.command}
            lines.append(json.dumps(header))
        lines.append(json.dumps(item, default=str, separators=(",", ":")))
        with self.path.open("ab") as handle:
            handle.write("".join(f"{line}\n" for line in lines).encode())
            handle.flush()
            os.fsync(handle.fileno())

    def save(self) -> None:
        """Append this run's entry if it changed (its counts); results are appended as they are recorded."""
        line = json.dumps(self.run, default=str, sort_keys=True)
        if line != self._saved_run:
            self._append({"type": "run", **self.run})
            self._saved_run = line

    @property
    def run(self) -> dict[str, Any]:
        """This run's entry in :attr:`runs` (add counts to it as the run goes)."""
        return self.runs[-1]

    # --- names and verdicts ---------------------------------------------------------------------------------------

    def names(self, paths: Sequence[Path]) -> list[str]:
        """Output names of ``paths``.

        An input the ledger knows (by resolved path) keeps its name; a new one gets a stable name
        (:func:`stable_names`) that no other input of the ledger holds.
        """
        known = {e["input"]["path"]: name for name, e in self.entries.items() if "input" in e}
        fresh = [p for p in paths if str(Path(p).resolve()) not in known]
        taken = {name: e["input"]["path"] for name, e in self.entries.items() if "input" in e}
        new = dict(zip(map(str, fresh), stable_names(fresh, taken), strict=True))
        return [known.get(str(Path(p).resolve())) or new[str(p)] for p in paths]

    def verdict(
        self,
        name: str,
        identity: Mapping[str, Any],
        settings: Mapping[str, Any],
        candidates: Iterable[Path] = (),
        *,
        overwrite: bool = False,
        check_settings: bool = True,
    ) -> Verdict:
        """Decide what to do with the result ``name`` of the input ``identity`` made with ``settings``.

        Args:
            name: The output name.
            identity: :func:`file_identity` of the input.
            settings: The settings that decide the result (JSON-able).
            candidates: Files the result may consist of; for a name without an entry, any of them existing means
                results the folder has no record of. A recorded result is complete when all its recorded
                outputs exist.
            overwrite: Redo instead of refusing.
            check_settings: Compare ``settings`` with the entry's (off where the result checks its own settings,
                as ``infer``'s ``summary.json`` does).
        """
        entry = self.entries.get(name)
        if entry is None:
            present = [p for p in candidates if p.exists()]
            if not present:
                return Verdict("make")
            if overwrite:
                return Verdict("redo", "results without a record")
            return Verdict(
                "refuse",
                f"{present[0]} exists but this folder has no record of what made it (an earlier pysynth or "
                "another tool); kept as it is: use --overwrite to redo it, or another --out",
            )
        if not same_content(entry.get("input"), identity):
            if overwrite:
                return Verdict("redo", "another input")
            return Verdict(
                "refuse",
                f"results '{name}' were made from {entry['input'].get('path')} (other content than "
                f"{identity['path']}); kept as they are: use --overwrite to redo them, or another --out",
            )
        changed = settings_diff(entry.get("settings", {}), settings) if check_settings else []
        if changed:
            if overwrite:
                return Verdict("redo", "other settings")
            return Verdict(
                "refuse",
                f"results '{name}' were made with other settings ({'; '.join(changed)}); kept as they are: use "
                "--overwrite to redo them, or another --out",
            )
        complete = all((self.folder / o).exists() for o in entry.get("outputs", []))
        if not complete or entry.get("status") != "done":
            return Verdict("make", "unfinished")
        return Verdict("redo", "--overwrite") if overwrite else Verdict("keep")

    def outputs_of(self, name: str) -> list[Path]:
        """The files recorded for ``name`` (empty without an entry)."""
        return [self.folder / o for o in self.entries.get(name, {}).get("outputs", [])]

    def record(
        self,
        name: str,
        identity: Mapping[str, Any],
        settings: Mapping[str, Any],
        outputs: Iterable[Path],
        **extra: Any,
    ) -> dict[str, Any]:
        """Record a finished result (and save the ledger); ``extra`` goes into the entry (counts, rows, ...)."""
        entry = {
            "input": dict(identity),
            "settings": json.loads(json.dumps(dict(settings), default=str)),
            "outputs": sorted(str(Path(p).relative_to(self.folder)) for p in outputs),
            "run": self.run_id,
            "finished": _now(),
            "status": "done",
            **extra,
        }
        self.entries[name] = entry
        self.save()  # the run is on record before its first result
        self._append({"type": "entry", "name": name, **entry})
        return entry

    def forget(self, name: str) -> None:
        """Drop an entry (its result is being redone)."""
        if self.entries.pop(name, None) is not None:
            self._append({"type": "forget", "name": name})

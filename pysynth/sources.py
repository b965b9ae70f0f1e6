"""Turning the paths, folders and globs a user names into a list of slide and image files."""

from __future__ import annotations

import glob
from collections.abc import Iterable
from pathlib import Path

from pysynth.errors import PysynthError


class InputError(PysynthError):
    """The named inputs do not resolve to usable files (a usage error: nothing has been done yet)."""


def _is_candidate(path: Path) -> bool:
    from pysynth.io import IMAGE_SUFFIXES, SLIDE_SUFFIXES

    return path.is_file() and path.suffix.lower() in (SLIDE_SUFFIXES | IMAGE_SUFFIXES)


def collect_sources(inputs: Iterable[str | Path]) -> list[Path]:
    """Expand files, folders (their slides and images, not recursive) and glob patterns, in order, deduplicated.

    A file named directly is kept whatever its suffix, so that a wrong format is reported by the reader.

    Args:
        inputs: What the user named.

    Returns:
        The files, in the order named (a folder's or a glob's files sorted by name).

    Raises:
        InputError: If a path does not exist, a folder holds no slide or image, a glob matches nothing, or
            nothing at all was named.
    """
    found: list[Path] = []
    for item in inputs:
        text = str(item)
        path = Path(text)
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if _is_candidate(p))
            if not files:
                raise InputError(f"{text}: folder holds no slides or images")
            found.extend(files)
        elif path.exists():
            found.append(path)
        elif glob.has_magic(text):
            hits = glob.glob(text)  # noqa: PTH207 (a user's pattern may be absolute)
            matches = sorted(Path(p) for p in hits if _is_candidate(Path(p)))
            if not matches:
                raise InputError(f"{text}: pattern matches no slides or images")
            found.extend(matches)
        else:
            raise InputError(f"{text}: no such file or folder")
    if not found:
        raise InputError("no inputs given")
    unique: dict[Path, Path] = {}
    for path in found:
        unique.setdefault(path.resolve(), path)
    return list(unique.values())


def unique_names(paths: Iterable[Path]) -> list[str]:
    """A file-name-safe name per source: its stem, with ``-2``, ``-3`` ... added where stems repeat."""
    names: list[str] = []
    used: set[str] = set()
    for path in paths:
        stem = path.stem or "source"
        name, count = stem, 1
        while name in used:
            count += 1
            name = f"{stem}-{count}"
        used.add(name)
        names.append(name)
    return names

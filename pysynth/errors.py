"""Exceptions that mean "the user's input cannot be used", as opposed to bugs.

The command line prints these as one line and exits with status 1; library callers catch them by type.
"""

from __future__ import annotations

from pathlib import Path


class PysynthError(Exception):
    """A problem with the user's data, options or environment (not a bug in pysynth)."""


class SlideError(PysynthError):
    """A slide or image that cannot be used, with the file it concerns.

    Args:
        path: The file (or in-memory name) the problem concerns.
        reason: What is wrong, in a few words, without the path.
    """

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

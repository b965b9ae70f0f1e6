"""Writing files so that an interrupted run never leaves a half-written one under its final name."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from pysynth.errors import PysynthError


def _read_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once, at import: changing the umask is process-wide and not thread-safe


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, flush it, and rename it into place.

    Args:
        path: Final file name.
        data: Contents.

    Raises:
        OSError: If writing fails (disk full, no permission); no file is left behind under either name.
    """
    with atomic_writer(path) as handle:
        handle.write(data)


@contextlib.contextmanager
def _temporary(path: Path) -> Iterator[tuple[int, str]]:
    """``(fd, name)`` of a new file beside ``path``, renamed onto it when the block ends without an error.

    On any exception (disk full, Ctrl-C) the temporary file is removed and ``path`` is left as it was; an
    ``OSError`` about the temporary file names ``path`` instead. The caller writes, syncs and closes ``fd`` (at
    once or in a ``with``: it is not closed here, so a reused descriptor number is never closed twice).
    """
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    except OSError as exc:  # the folder is missing or not writable: the message names the file asked for
        raise _naming(exc, path, exc.filename) from None  # exc names the temporary file mkstemp tried
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; results should be as readable as any file
        yield fd, tmp
        Path(tmp).replace(path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            Path(tmp).unlink()
        if isinstance(exc, OSError) and (named := _naming(exc, path, tmp)) is not exc:
            raise named from None
        raise


@contextlib.contextmanager
def atomic_writer(path: str | Path, mode: str = "wb") -> Iterator[IO]:
    """A file opened beside ``path`` that replaces ``path`` only when the ``with`` block ends without an error.

    For outputs written piece by piece (a streamed GeoJSON): the file is flushed, synced and renamed into place at
    the end; on any exception (disk full, Ctrl-C) the temporary file is removed and ``path`` is left as it was.

    Args:
        path: Final file name.
        mode: ``"wb"`` or ``"w"`` (UTF-8 text).

    Raises:
        OSError: If creating, writing or renaming the file fails; it names ``path``, never the hidden temporary
            file (an error of the caller's own inside the block, about another file, passes unchanged).
    """
    text = {} if "b" in mode else {"encoding": "utf-8"}
    with _temporary(Path(path)) as (fd, _), os.fdopen(fd, mode, **text) as handle:
        yield handle
        handle.flush()
        os.fsync(handle.fileno())


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` for a library that writes a file by name; renamed into place at the end.

    Like :func:`atomic_writer`, for writers that need a file name (``tifffile``): on success the file is synced and
    replaces ``path``; on any exception it is removed and ``path`` is left as it was.
    """
    with _temporary(Path(path)) as (fd, tmp):
        os.close(fd)
        yield Path(tmp)
        with Path(tmp).open("rb+") as handle:
            os.fsync(handle.fileno())


def _naming(exc: OSError, path: Path, tmp: str) -> OSError:
    """``exc`` naming ``path`` where it names no file or the temporary one (``tmp``); else ``exc`` itself."""
    if exc.errno is None or (exc.filename is not None and exc.filename != tmp):
        return exc
    return OSError(exc.errno, exc.strerror, str(path))  # OSError picks the subclass (FileNotFoundError, ...)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Like :func:`atomic_write_bytes` for UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def prepare_output_dir(path: str | Path) -> Path:
    """Create an output folder if needed and check that files can be written in it.

    Args:
        path: The folder.

    Returns:
        The folder as a ``Path``.

    Raises:
        PysynthError: If it cannot be created or written to.
    """
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise PysynthError(f"{path}: output path exists and is not a folder") from None
    except OSError as exc:
        raise PysynthError(f"{path}: cannot create output folder ({exc.strerror or exc})") from None
    try:
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise PysynthError(f"{path}: output folder is not writable ({exc.strerror or exc})") from None
    return path

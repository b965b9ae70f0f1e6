"""One shard file: consecutive items, each array compressed on its own, and a footer that locates every item.

Layout (all integers little-endian)::

    header   16 B   b"PSYNSHRD", u32 format version, 4 zero bytes
    item 0          zstd(array 0) | zstd(array 1) | ... | meta as UTF-8 JSON      (arrays in schema order)
    item 1 ...
    footer          u32 length of J, J = JSON {"fingerprint", "first", "keys", "columns"},
                    then an int64 table (items × columns): byte offset of the item, byte length of each
                    array's frame and of the meta, then the varying dimensions of ragged arrays
    trailer  40 B   b"PSYNTAIL", u64 footer offset, u64 footer length, u32 CRC-32 of the footer,
                    u32 CRC-32 of everything before the trailer, u32 items, u32 format version

Opening a shard reads the trailer and footer only (two small reads, checked by size and CRC); an item is then one
``pread`` of its contiguous bytes. Each zstd frame carries its own checksum, so a damaged item is detected when it
is read, without reading the whole shard. The file is written under a temporary name, fsynced and renamed into
place, so a shard under its final name is always complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import tempfile
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zstandard

from pysynth.errors import PysynthError
from pysynth.synth.schema import Schema

FORMAT_VERSION = 1
ZSTD_LEVEL = -1  # why: see pysynth.synth.store
HEADER = b"PSYNSHRD" + struct.pack("<I", FORMAT_VERSION) + bytes(4)
TRAILER = struct.Struct("<8sQQIIII")
TRAILER_MAGIC = b"PSYNTAIL"
TEMP_SUFFIX = ".part"


@dataclass(frozen=True)
class ShardRecord:
    """What the dataset index says of one shard.

    Attributes:
        file: File name inside the dataset's ``shards/`` folder.
        items: Items it holds.
        bytes: File size.
        crc32: CRC-32 of the file without its 40-byte trailer (which repeats it).
    """

    file: str
    items: int
    bytes: int
    crc32: int

    def __post_init__(self) -> None:
        if self.items < 0 or self.bytes < len(HEADER) + TRAILER.size:
            raise ValueError(f"not a shard record: {self}")


class ShardWriter:
    """Write one shard to a temporary file beside ``path``; :meth:`finish` renames it into place.

    Used as a context manager: leaving the block by an exception removes the temporary file.

    Args:
        path: Final file name.
        schema: The dataset's schema.
        fingerprint: The dataset's parameters digest, stored in the footer.
        first: Dataset index of the shard's first item.
    """

    def __init__(self, path: str | Path, schema: Schema, fingerprint: str, first: int) -> None:
        self.path = Path(path)
        self._schema = schema
        self._fingerprint = fingerprint
        self._first = first
        self._rows: list[list[int]] = []
        self._compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=True, write_content_size=True)
        self._ragged = [
            (i, [d for d, want in enumerate(f.shape) if want is None]) for i, f in enumerate(schema.fields.values())
        ]
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=TEMP_SUFFIX, dir=self.path.parent)
        self.temp_path = Path(tmp)
        self._handle = os.fdopen(fd, "wb")
        os.fchmod(fd, 0o644)  # mkstemp makes it private; a dataset is for others to read
        self._crc = 0
        self._offset = 0
        self._write(HEADER)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            self.abort()

    def _write(self, data: bytes) -> None:
        self._handle.write(data)
        self._crc = zlib.crc32(data, self._crc)
        self._offset += len(data)

    def add(self, arrays: list[np.ndarray], meta: bytes) -> None:
        """Append one item.

        Args:
            arrays: The item's arrays in schema order, checked by :meth:`Schema.check`.
            meta: The item's meta as UTF-8 JSON.
        """
        row = [self._offset]
        for array in arrays:
            frame = self._compressor.compress(array.reshape(-1).view(np.uint8))
            self._write(frame)
            row.append(len(frame))
        self._write(meta)
        row.append(len(meta))
        for i, dims in self._ragged:
            row.extend(arrays[i].shape[d] for d in dims)
        self._rows.append(row)

    def seal(self) -> None:
        """Write footer and trailer and flush them to the operating system (not yet to the disk)."""
        columns = 2 + len(self._schema.fields) + sum(len(d) for _, d in self._ragged)
        head = json.dumps(
            {
                "fingerprint": self._fingerprint,
                "first": self._first,
                "keys": list(self._schema.keys),
                "columns": columns,
            },
            sort_keys=True,
        ).encode()
        table = np.array(self._rows, dtype="<i8").reshape(len(self._rows), columns)
        footer = struct.pack("<I", len(head)) + head + table.tobytes()
        footer_offset = self._offset
        self._write(footer)
        trailer = TRAILER.pack(
            TRAILER_MAGIC, footer_offset, len(footer), zlib.crc32(footer), self._crc, len(self._rows), FORMAT_VERSION
        )
        self._handle.write(trailer)
        self._handle.flush()

    def commit(self) -> ShardRecord:
        """After :meth:`seal`: fsync the file and rename it into place; on failure remove it.

        Safe to run in another thread while the next shard is made (fsync waits on the disk, not the GIL).

        Returns:
            The shard's :class:`ShardRecord`.
        """
        try:
            os.fsync(self._handle.fileno())
            if hasattr(os, "posix_fadvise"):  # written and durable: drop it from the page cache
                os.posix_fadvise(self._handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            self._handle.close()
            self.temp_path.replace(self.path)
        except BaseException:
            self.abort()
            raise
        return ShardRecord(self.path.name, len(self._rows), self._offset + TRAILER.size, self._crc)

    def finish(self) -> ShardRecord:
        """:meth:`seal` and :meth:`commit`.

        Returns:
            The shard's :class:`ShardRecord`.
        """
        self.seal()
        return self.commit()

    def abort(self) -> None:
        """Close and remove the temporary file."""
        with contextlib.suppress(OSError):
            self._handle.close()
        with contextlib.suppress(OSError):
            self.temp_path.unlink()


class ShardReader:
    """Random access to the items of one shard; opening it checks the trailer and footer.

    Args:
        path: The shard file.
        schema: The dataset's schema.
        fingerprint: If given, the footer must carry it (the shard belongs to this dataset).
        items: If given, the shard must hold this many items.

    Raises:
        PysynthError: If the file is missing, truncated, not a shard, or from another dataset (naming the file).
    """

    def __init__(
        self, path: str | Path, schema: Schema, *, fingerprint: str | None = None, items: int | None = None
    ) -> None:
        self.path = Path(path)
        self._schema = schema
        self._decompressor = zstandard.ZstdDecompressor()
        try:
            self._fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            raise PysynthError(f"{self.path}: shard file is missing") from None
        except OSError as exc:
            raise PysynthError(f"{self.path}: cannot open shard ({exc.strerror or exc})") from None
        try:
            self.record, self.first, self._table = self._read_footer(fingerprint, items)
        except BaseException:
            self.close()
            raise
        fields = list(schema.fields.values())
        self._shapes = []  # per array: (fixed shape or None dims, ragged column indices)
        col = 2 + len(fields)
        for field in fields:
            varying = []
            for want in field.shape:
                if want is None:
                    varying.append(col)
                    col += 1
            self._shapes.append((field.shape, varying))

    def _fail(self, reason: str) -> PysynthError:
        return PysynthError(f"{self.path}: corrupt shard ({reason}); delete it and rerun the writer to redo it")

    def _read_footer(self, fingerprint: str | None, items: int | None) -> tuple[ShardRecord, int, np.ndarray]:
        size = os.fstat(self._fd).st_size
        if size < len(HEADER) + TRAILER.size:
            raise self._fail(f"{size} bytes, too short")
        if os.pread(self._fd, len(HEADER), 0) != HEADER:
            raise self._fail("bad header")
        magic, f_off, f_len, f_crc, body_crc, n, version = TRAILER.unpack(
            os.pread(self._fd, TRAILER.size, size - TRAILER.size)
        )
        if magic != TRAILER_MAGIC or version != FORMAT_VERSION or f_off + f_len + TRAILER.size != size:
            raise self._fail("bad trailer; truncated or not a shard")
        footer = os.pread(self._fd, f_len, f_off)
        if len(footer) != f_len or zlib.crc32(footer) != f_crc:
            raise self._fail("footer checksum mismatch")
        try:
            (head_len,) = struct.unpack_from("<I", footer)
            head = json.loads(footer[4 : 4 + head_len])
            table = np.frombuffer(footer, "<i8", offset=4 + head_len).reshape(n, head["columns"])
        except (ValueError, KeyError, struct.error) as exc:
            raise self._fail(f"bad footer: {exc}") from None
        if head.get("keys") != list(self._schema.keys):
            raise self._fail(f"its keys {head.get('keys')} are not the schema's {list(self._schema.keys)}")
        if fingerprint is not None and head.get("fingerprint") != fingerprint:
            raise PysynthError(f"{self.path}: shard belongs to another dataset (parameters differ)")
        if items is not None and n != items:
            raise self._fail(f"{n} items, expected {items}")
        ends = table[:, 0] + table[:, 1 : 2 + len(self._schema.fields)].sum(axis=1)
        if n and (table[:, 0].min() < len(HEADER) or ends.max() > f_off):
            raise self._fail("item offsets out of range")
        return ShardRecord(self.path.name, n, size, body_crc), int(head["first"]), table

    def __len__(self) -> int:
        return self.record.items

    def read(self, j: int) -> tuple[dict[str, np.ndarray], dict]:
        """Item ``j`` of the shard (0-based within it).

        Returns:
            ``(arrays, meta)``; arrays are writable and own their memory.

        Raises:
            PysynthError: If the item's bytes are damaged.
        """
        row = self._table[j]
        n_arrays = len(self._shapes)
        lengths = row[1 : 2 + n_arrays]
        blob = os.pread(self._fd, int(lengths.sum()), int(row[0]))
        try:
            if len(blob) != lengths.sum():
                raise ValueError("file shorter than its footer says")
            view = memoryview(blob)
            arrays = {}
            pos = 0
            for (key, field), (shape, varying), length in zip(
                self._schema.fields.items(), self._shapes, lengths[:n_arrays], strict=True
            ):
                if varying:
                    dims = iter(row[varying])
                    shape = tuple(int(next(dims)) if d is None else d for d in shape)
                data = self._decompressor.decompress(view[pos : pos + int(length)])
                arrays[key] = np.frombuffer(data, field.np_dtype).reshape(shape).copy()
                pos += int(length)
            meta = json.loads(view[pos:].tobytes())
        except (zstandard.ZstdError, ValueError) as exc:
            raise self._fail(f"item {self.first + j}: {exc}") from None
        return arrays, meta

    def verify_body(self) -> None:
        """Read the whole file and compare its CRC-32 with the trailer's.

        Raises:
            PysynthError: On a mismatch.
        """
        crc, pos, end = 0, 0, self.record.bytes - TRAILER.size
        while pos < end:
            chunk = os.pread(self._fd, min(1 << 24, end - pos), pos)
            if not chunk:
                break
            crc = zlib.crc32(chunk, crc)
            pos += len(chunk)
        if crc != self.record.crc32:
            raise self._fail("checksum mismatch")

    def close(self) -> None:
        """Close the file."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


def encode_meta(meta: Mapping, index: int) -> bytes:
    """An item's meta as canonical UTF-8 JSON (sorted keys, so equal dicts give equal bytes).

    Raises:
        ValueError: If ``meta`` is not a JSON-able dict.
    """
    if not isinstance(meta, Mapping):
        raise ValueError(f"item {index}: meta must be a dict, got {type(meta).__name__}")
    try:
        return json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()
    except (TypeError, ValueError) as exc:
        raise ValueError(f"item {index}: meta is not JSON-able ({exc})") from None

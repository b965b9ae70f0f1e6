"""What every item of a synthetic dataset holds: named arrays with a fixed dtype and a fixed or varying shape.

A schema is declared once per dataset and checked against every item written or streamed, so a recipe that
returns a wrong dtype or shape fails at the item that does it, not later in training.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

RESERVED_KEYS = frozenset({"meta", "index"})


@dataclass(frozen=True)
class Field:
    """One named array of every item.

    Attributes:
        dtype: NumPy dtype (anything ``np.dtype`` accepts); stored as its little-endian string, e.g. ``"<u2"``.
        shape: Dimensions, with ``None`` for one that varies across items (``(None, 2)`` for ``n`` centres).
    """

    dtype: Any
    shape: tuple[int | None, ...]

    def __post_init__(self) -> None:
        try:
            dt = np.dtype(self.dtype)
        except TypeError as exc:
            raise ValueError(f"not a NumPy dtype: {self.dtype!r}") from exc
        if dt.kind not in "biufc" or dt.shape or dt.names:
            raise ValueError(f"dtype must be a plain number or bool type, got {dt}")
        if dt.byteorder == ">":
            raise ValueError(f"dtype must be little-endian, got {dt.str}")
        shape = tuple(self.shape)
        for dim in shape:
            if dim is not None and (not isinstance(dim, int | np.integer) or dim < 0):
                raise ValueError(f"shape entries must be non-negative ints or None, got {shape}")
        object.__setattr__(self, "dtype", dt.str)
        object.__setattr__(self, "shape", tuple(None if d is None else int(d) for d in shape))

    @property
    def fixed(self) -> bool:
        """Whether every item's array has the same shape."""
        return None not in self.shape

    @property
    def np_dtype(self) -> np.dtype:
        """The dtype as a ``np.dtype``."""
        return np.dtype(self.dtype)


@dataclass(frozen=True)
class Schema:
    """The arrays of every item, in storage order.

    Example: ``Schema({"image": Field("uint8", (200, 200, 3)), "labels": Field("uint16", (200, 200)),
    "centres": Field("float32", (None, 2))})``; a ``(dtype, shape)`` tuple may stand for a ``Field``.

    Attributes:
        fields: Key → :class:`Field`; keys are non-empty strings other than ``"meta"`` and ``"index"``.
    """

    fields: Mapping[str, Field]

    def __post_init__(self) -> None:
        if not self.fields:
            raise ValueError("a schema needs at least one field")
        fields: dict[str, Field] = {}
        for key, spec in self.fields.items():
            if not isinstance(key, str) or not key:
                raise ValueError(f"field names must be non-empty strings, got {key!r}")
            if key in RESERVED_KEYS:
                raise ValueError(f"field name {key!r} is reserved for the item's {key}")
            fields[key] = spec if isinstance(spec, Field) else Field(*spec)
        object.__setattr__(self, "fields", fields)

    __hash__ = None  # holds a dict

    @property
    def keys(self) -> tuple[str, ...]:
        """Field names in storage order."""
        return tuple(self.fields)

    @property
    def ragged_keys(self) -> tuple[str, ...]:
        """Fields whose shape varies across items (kept as lists by :func:`pysynth.synth.stream.collate`)."""
        return tuple(k for k, f in self.fields.items() if not f.fixed)

    def to_json(self) -> dict:
        """The schema as plain JSON: ``{key: {"dtype": "<u2", "shape": [200, 200]}}``."""
        return {k: {"dtype": f.dtype, "shape": list(f.shape)} for k, f in self.fields.items()}

    @classmethod
    def from_json(cls, record: Mapping) -> Schema:
        """The inverse of :meth:`to_json`.

        Raises:
            ValueError: If the record is not a schema.
        """
        try:
            return cls({k: Field(v["dtype"], tuple(v["shape"])) for k, v in record.items()})
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"not a schema record ({exc})") from None

    def check(self, arrays: Mapping[str, np.ndarray], index: int) -> list[np.ndarray]:
        """Check one item's arrays against the schema.

        Args:
            arrays: The item's arrays by key.
            index: The item's index (for messages).

        Returns:
            The arrays in storage order, C-contiguous.

        Raises:
            ValueError: If a key is missing or extra, or an array has another dtype or shape.
        """
        if not isinstance(arrays, Mapping):
            raise ValueError(f"item {index}: arrays must be a dict of NumPy arrays, got {type(arrays).__name__}")
        if set(arrays) != set(self.fields):
            missing, extra = set(self.fields) - set(arrays), set(arrays) - set(self.fields)
            raise ValueError(
                f"item {index}: keys differ from the schema (missing {sorted(missing)}, extra {sorted(extra)})"
            )
        out = []
        for key, field in self.fields.items():
            array = arrays[key]
            if not isinstance(array, np.ndarray):
                raise ValueError(f"item {index}: {key!r} must be a NumPy array, got {type(array).__name__}")
            if array.dtype != field.np_dtype:
                raise ValueError(f"item {index}: {key!r} has dtype {array.dtype}, the schema says {field.np_dtype}")
            if array.ndim != len(field.shape) or any(
                want is not None and got != want for got, want in zip(array.shape, field.shape, strict=True)
            ):
                raise ValueError(f"item {index}: {key!r} has shape {array.shape}, the schema says {field.shape}")
            out.append(np.ascontiguousarray(array))
        return out

"""Synthetic items generated on the fly for training, and batching of items whose arrays differ in shape.

Items are dicts of NumPy arrays plus ``"meta"`` and ``"index"``, the same as :class:`pysynth.synth.store.SynthDataset`
gives, so a training loop reads a stored dataset and a stream alike; :func:`collate` turns a list of them into
tensors for a ``DataLoader``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from pysynth.synth.schema import Schema

StreamItem = Callable[..., tuple[Mapping[str, np.ndarray], Mapping[str, Any]]]


class StreamingDataset(IterableDataset):
    """Items ``make_item(i, seed=seed)`` for ``i = 0, 1, ...``, split across DataLoader workers.

    Worker ``w`` of ``W`` generates items ``w, w + W, w + 2W, ...``: every worker's stream differs, their union is
    exactly items ``0..length-1`` (or endless), and item ``i`` is the same whatever ``W`` is, as long as
    ``make_item`` depends on ``i`` and ``seed`` only (derive its random stream with
    :func:`pysynth.synth.store.item_rng`). The order in which a DataLoader interleaves workers is its own.

    Each item is a dict of the arrays ``make_item`` returned (NumPy), plus ``"meta"`` and ``"index"``; pass
    ``collate_fn=functools.partial(collate, ragged=schema.ragged_keys)`` to the DataLoader to batch them.

    Args:
        make_item: ``make_item(i, seed=seed) -> (arrays, meta)``. With DataLoader workers started by spawn it must be
            picklable (a top-level function or a ``functools.partial`` of one).
        seed: Seed handed to ``make_item``.
        length: Items per pass; ``None`` for an endless stream.
        schema: If given, every item is checked against it.

    Raises:
        ValueError: If ``length`` is negative.
    """

    def __init__(
        self, make_item: StreamItem, *, seed: int, length: int | None = None, schema: Schema | None = None
    ) -> None:
        super().__init__()
        if length is not None and length < 0:
            raise ValueError(f"length must be non-negative or None, got {length}")
        self.make_item = make_item
        self.seed = seed
        self.length = length
        self.schema = schema

    def __len__(self) -> int:
        if self.length is None:
            raise TypeError("an endless StreamingDataset has no length")
        return self.length

    def indices(self) -> Iterator[int]:
        """The item indices of the calling process (its share when inside a DataLoader worker)."""
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        if self.length is None:
            return itertools.count(worker, workers)
        return iter(range(worker, self.length, workers))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for i in self.indices():
            item = self.make_item(i, seed=self.seed)
            if not (isinstance(item, tuple) and len(item) == 2):
                raise ValueError(f"item {i}: make_item must return (arrays, meta), got {type(item).__name__}")
            arrays, meta = item
            if self.schema is not None:
                self.schema.check(arrays, i)
            yield {**arrays, "meta": meta, "index": i}


def collate(batch: Sequence[Mapping[str, Any]], *, ragged: Collection[str] = ()) -> dict[str, Any]:
    """Batch items for a DataLoader: stack same-shape arrays, keep ragged ones as lists.

    Args:
        batch: Items (dicts of NumPy arrays or tensors, plus ``"meta"`` and ``"index"``).
        ragged: Keys whose arrays may differ in shape across items (``schema.ragged_keys``).

    Returns:
        A dict: ``(B, ...)`` tensors for the other arrays, lists of tensors for ``ragged`` keys, ``"meta"`` as a
        list of dicts and ``"index"`` as an int64 tensor. Dtypes are kept (``uint16`` labels stay ``torch.uint16``,
        which few operations accept: convert with ``.to(torch.int32)`` before use).

    Shape:
        A fixed array of shape ``S`` becomes ``(B, *S)``.

    Raises:
        ValueError: If the batch is empty, items have different keys, or a key not in ``ragged`` differs in shape.
    """
    if not batch:
        raise ValueError("cannot collate an empty batch")
    keys = list(batch[0])
    out: dict[str, Any] = {}
    for item in batch[1:]:
        if list(item) != keys:
            raise ValueError(f"items have different keys: {keys} and {list(item)}")
    for key in keys:
        values = [item[key] for item in batch]
        if key == "meta":
            out[key] = values
        elif key == "index":
            out[key] = torch.tensor(values, dtype=torch.int64)
        elif key in ragged:
            out[key] = [_tensor(v) for v in values]
        else:
            shapes = {tuple(v.shape) for v in values}
            if len(shapes) > 1:
                raise ValueError(f"{key!r} differs in shape across the batch {sorted(shapes)}; pass it in ragged")
            if isinstance(values[0], torch.Tensor):
                out[key] = torch.stack(values)
            else:
                out[key] = torch.from_numpy(np.stack(values))
    return out


def _tensor(value: np.ndarray | torch.Tensor) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    return torch.from_numpy(value if value.flags.writeable else value.copy())  # torch warns on read-only arrays

"""Streaming synthetic items across DataLoader workers, and batching of ragged items."""

from __future__ import annotations

import functools
import itertools

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from pysynth.synth.schema import Field, Schema
from pysynth.synth.store import item_rng
from pysynth.synth.stream import StreamingDataset, collate

SCHEMA = Schema({"image": Field("uint8", (8, 8, 3)), "centres": Field("float32", (None, 2))})
COLLATE = functools.partial(collate, ragged=SCHEMA.ragged_keys)


def make_item(i: int, *, seed: int) -> tuple[dict, dict]:
    rng = item_rng(seed, i)
    arrays = {
        "image": rng.integers(0, 256, (8, 8, 3), dtype=np.uint8),
        "centres": rng.random((i % 3, 2), dtype=np.float32),
    }
    return arrays, {"i": i, "seed": seed}


def load(stream: StreamingDataset, workers: int, batch_size: int = 2) -> dict[int, dict]:
    loader = DataLoader(stream, batch_size=batch_size, num_workers=workers, collate_fn=COLLATE)
    items: dict[int, dict] = {}
    for batch in loader:
        for j, i in enumerate(batch["index"].tolist()):
            assert i not in items, f"item {i} twice"
            items[i] = {
                "image": batch["image"][j].numpy(),
                "centres": batch["centres"][j].numpy(),
                "meta": batch["meta"][j],
            }
    return items


def test_workers_split_the_items_and_the_result_is_deterministic() -> None:
    stream = StreamingDataset(make_item, seed=7, length=11, schema=SCHEMA)
    assert len(stream) == 11
    two = load(stream, workers=2)
    assert sorted(two) == list(range(11))
    again, alone = load(stream, workers=2), load(stream, workers=0)
    for i in range(11):
        arrays, meta = make_item(i, seed=7)
        for got in (two[i], again[i], alone[i]):
            np.testing.assert_array_equal(got["image"], arrays["image"])
            np.testing.assert_array_equal(got["centres"], arrays["centres"])
            assert got["meta"] == meta
    other = load(StreamingDataset(make_item, seed=8, length=11), workers=2)
    assert not np.array_equal(other[5]["image"], two[5]["image"])


def test_each_worker_gets_its_own_share() -> None:
    stream = StreamingDataset(make_item, seed=0, length=10)
    loader = DataLoader(stream, batch_size=None, num_workers=2, collate_fn=lambda item: item)
    indices = [item["index"] for item in loader]
    # the loader alternates workers: worker 0 gives the even items, worker 1 the odd ones
    assert indices[0::2] == [0, 2, 4, 6, 8]
    assert indices[1::2] == [1, 3, 5, 7, 9]


def test_endless_stream() -> None:
    stream = StreamingDataset(make_item, seed=0)
    with pytest.raises(TypeError):
        len(stream)
    loader = DataLoader(stream, batch_size=4, num_workers=2, collate_fn=COLLATE)
    batches = list(itertools.islice(loader, 4))
    indices = torch.cat([b["index"] for b in batches]).tolist()
    assert sorted(indices) == list(range(16))
    assert [i["index"] for i in itertools.islice(iter(stream), 3)] == [0, 1, 2]


def test_items_are_checked_against_the_schema() -> None:
    def bad(i: int, *, seed: int) -> tuple[dict, dict]:
        arrays, meta = make_item(i, seed=seed)
        return arrays | {"image": arrays["image"][:4]}, meta

    with pytest.raises(ValueError, match=r"item 0: 'image' has shape"):
        next(iter(StreamingDataset(bad, seed=0, length=2, schema=SCHEMA)))
    with pytest.raises(ValueError, match="non-negative"):
        StreamingDataset(make_item, seed=0, length=-1)


def test_collate_stacks_fixed_arrays_and_lists_ragged_ones() -> None:
    items = [{**make_item(i, seed=0)[0], "meta": {"i": i}, "index": i} for i in range(3)]
    batch = collate(items, ragged=("centres",))
    assert batch["image"].shape == (3, 8, 8, 3)
    assert batch["image"].dtype == torch.uint8
    assert [c.shape for c in batch["centres"]] == [(0, 2), (1, 2), (2, 2)]
    assert batch["index"].tolist() == [0, 1, 2]
    assert batch["meta"] == [{"i": 0}, {"i": 1}, {"i": 2}]
    frozen = items[2]["centres"].copy()
    frozen.flags.writeable = False  # e.g. a view of a shared pool
    assert collate([items[2] | {"centres": frozen}], ragged=("centres",))["centres"][0].shape == (2, 2)
    with pytest.raises(ValueError, match="'centres' differs in shape"):
        collate(items)
    with pytest.raises(ValueError, match="empty"):
        collate([])

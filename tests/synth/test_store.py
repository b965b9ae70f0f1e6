"""The synthetic dataset store: round trip, determinism across workers, resume, refusal, damage, export."""

from __future__ import annotations

import errno
import functools
import json
import pickle
from pathlib import Path

import cv2
import numpy as np
import pytest

from pysynth.errors import PysynthError
from pysynth.synth.schema import Field, Schema
from pysynth.synth.shard import ShardWriter
from pysynth.synth.store import SynthDataset, export_png, item_rng, outline_mask, write_dataset

SIZE = 16
SCHEMA = Schema(
    {
        "image": Field("uint8", (SIZE, SIZE, 3)),
        "labels": Field("uint16", (SIZE, SIZE)),
        "centres": Field("float32", (None, 2)),
    }
)


def make_item(i: int, *, seed: int = 0, log: str | None = None) -> tuple[dict, dict]:
    """A small item: item i has i % 4 nuclei (so some have none), drawn from the stream of (seed, i)."""
    rng = item_rng(seed, i)
    centres = rng.uniform(3, SIZE - 3, (i % 4, 2)).astype(np.float32)
    labels = np.zeros((SIZE, SIZE), np.uint16)
    for k, (x, y) in enumerate(centres, start=1):
        cv2.circle(labels, (round(float(x)), round(float(y))), 2, k, -1)
    image = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    if log is not None:
        with Path(log).open("a") as handle:
            handle.write(f"{i}\n")
    return {"image": image, "labels": labels, "centres": centres}, {"index": i, "seed": seed, "params": {"n": i % 4}}


def write(path: Path, n: int = 10, **kwargs) -> object:
    kwargs.setdefault("schema", SCHEMA)
    kwargs.setdefault("shard_size", 4)
    return write_dataset(path, n, kwargs.pop("make_item", make_item), **kwargs)


def files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((path / "shards").iterdir())}


def calls(log: Path) -> list[int]:
    return sorted(int(line) for line in log.read_text().split()) if log.exists() else []


def assert_item_equal(got: dict, i: int) -> None:
    arrays, meta = make_item(i)
    for key, want in arrays.items():
        assert got[key].dtype == want.dtype
        np.testing.assert_array_equal(got[key], want)
    assert got["meta"] == meta
    assert got["index"] == i


def test_round_trip_of_arrays_and_meta(tmp_path: Path) -> None:
    seen: list[int] = []
    report = write(tmp_path / "ds", progress=seen.append, attrs={"recipe": {"radius": 2}, "seed": 0})
    assert (report.items, report.written, report.skipped) == (10, 3, 0)
    assert sorted(seen) == [2, 4, 4]
    ds = SynthDataset(tmp_path / "ds")
    assert len(ds) == 10
    assert ds.num_shards == 3
    assert ds.attrs == {"recipe": {"radius": 2}, "seed": 0}
    for i in range(10):
        assert_item_equal(ds[i], i)
    assert ds[0]["centres"].shape == (0, 2)
    assert ds[-1]["index"] == 9
    assert ds[np.int64(3)]["index"] == 3
    assert ds[5]["image"].flags.writeable
    with pytest.raises(IndexError):
        ds[10]
    assert [item["index"] for item in ds.iter_shard(2)] == [8, 9]
    assert_item_equal(next(ds.iter_shard(1)), 4)
    ds.verify()
    index = json.loads((tmp_path / "ds" / "index.json").read_text())
    assert index["complete"]
    assert index["pysynth"]
    assert [s["items"] for s in index["shards"]] == [4, 4, 2]


def test_files_are_identical_for_any_number_of_workers(tmp_path: Path) -> None:
    write(tmp_path / "one", n=11, shard_size=3, workers=1)
    write(tmp_path / "two", n=11, shard_size=3, workers=2)
    assert files(tmp_path / "one") == files(tmp_path / "two")
    assert len(files(tmp_path / "one")) == 4
    assert (tmp_path / "one" / "index.json").read_bytes() == (tmp_path / "two" / "index.json").read_bytes()


def test_resume_repairs_damaged_shards_and_skips_complete_ones(tmp_path: Path) -> None:
    path, log = tmp_path / "ds", tmp_path / "calls.txt"
    write(path, n=14, make_item=functools.partial(make_item, log=str(log)))
    assert calls(log) == list(range(14))
    reference = files(path)
    shards = path / "shards"
    (shards / "000000.shard").unlink()  # never written
    damaged = shards / "000001.shard"
    damaged.write_bytes(damaged.read_bytes()[:-100])  # cut short
    (shards / ".000002.shard.abc123.part").write_bytes(b"half a shard")  # left by a killed worker
    log.unlink()
    seen: list[int] = []
    report = write(path, n=14, make_item=functools.partial(make_item, log=str(log)), progress=seen.append)
    assert (report.written, report.skipped) == (2, 2)
    assert calls(log) == list(range(8))  # only the items of shards 0 and 1 were made again
    assert sum(seen) == 14
    assert files(path) == reference
    for i in range(14):
        assert_item_equal(SynthDataset(path)[i], i)

    log.unlink()
    report = write(path, n=14, make_item=functools.partial(make_item, log=str(log)))
    assert (report.written, report.skipped) == (0, 4)
    assert calls(log) == []


def test_resume_redoes_a_shard_with_a_damaged_footer(tmp_path: Path) -> None:
    path = tmp_path / "ds"
    write(path)
    reference = files(path)
    shard = path / "shards" / "000001.shard"
    data = bytearray(shard.read_bytes())
    data[-50] ^= 0xFF  # inside the footer's table
    shard.write_bytes(bytes(data))
    assert write(path).written == 1
    assert files(path) == reference


@pytest.mark.parametrize(
    ("change", "word"),
    [
        ({"n": 11}, "n"),
        ({"shard_size": 5}, "shard_size"),
        ({"attrs": {"seed": 1}}, "attrs"),
        ({"schema": Schema({**SCHEMA.fields, "labels": Field("int32", (SIZE, SIZE))})}, "schema"),
    ],
)
def test_rerun_with_other_parameters_is_refused(tmp_path: Path, change: dict, word: str) -> None:
    write(tmp_path / "ds", attrs={"seed": 0})
    before = files(tmp_path / "ds")
    kwargs = {"attrs": {"seed": 0}} | change
    with pytest.raises(PysynthError, match=rf"other {word}.*overwrite"):
        write(tmp_path / "ds", **kwargs)
    assert files(tmp_path / "ds") == before


def test_stale_shards_beyond_the_end_are_removed(tmp_path: Path) -> None:
    path = tmp_path / "ds"
    write(path, n=13)
    (path / "index.json").unlink()  # lost: the folder's shards no longer say what they belong to
    assert write(path, n=6).written == 2  # the old shards' fingerprint is not this dataset's
    assert sorted(files(path)) == ["000000.shard", "000001.shard"]


def test_overwrite_replaces_the_dataset(tmp_path: Path) -> None:
    path = tmp_path / "ds"
    write(path, n=13)
    (path / "notes.txt").write_text("mine")
    write(path, n=6, overwrite=True, attrs={"v": 2})
    assert sorted(files(path)) == ["000000.shard", "000001.shard"]  # the old third and fourth shards are gone
    ds = SynthDataset(path)
    assert len(ds) == 6
    assert ds.attrs == {"v": 2}
    assert (path / "notes.txt").read_text() == "mine"


def test_damaged_or_missing_files_give_errors_naming_them(tmp_path: Path) -> None:
    path = tmp_path / "ds"
    write(path)
    shard = path / "shards" / "000001.shard"
    data = bytearray(shard.read_bytes())
    data[200] ^= 0xFF  # inside item 4's image frame
    shard.write_bytes(bytes(data))
    ds = SynthDataset(path)
    with pytest.raises(PysynthError, match=r"000001\.shard.*item 4"):
        ds[4]
    with pytest.raises(PysynthError, match=r"000001\.shard"):
        ds.verify()
    shard.write_bytes(bytes(data[:100]))
    with pytest.raises(PysynthError, match=r"000001\.shard.*corrupt"):
        SynthDataset(path)[5]
    (path / "shards" / "000002.shard").unlink()
    with pytest.raises(PysynthError, match=r"000002\.shard.*missing"):
        SynthDataset(path)[9]
    assert_item_equal(SynthDataset(path)[0], 0)  # the intact shard still reads
    (path / "index.json").write_text("{not json")
    with pytest.raises(PysynthError, match=r"index\.json"):
        SynthDataset(path)
    with pytest.raises(PysynthError, match=r"index\.json is missing"):
        SynthDataset(tmp_path / "nothing-here")


def failing_item(i: int) -> tuple[dict, dict]:
    if i == 6:
        raise RuntimeError("recipe failed")
    return make_item(i)


def test_interrupted_run_is_incomplete_then_resumed(tmp_path: Path) -> None:
    path = tmp_path / "ds"
    with pytest.raises(RuntimeError, match="recipe failed"):
        write(path, make_item=failing_item)
    assert sorted(files(path)) == ["000000.shard"]  # no temporary left, no partial shard 1
    with pytest.raises(PysynthError, match="incomplete"):
        SynthDataset(path)
    assert write(path).skipped == 1
    assert len(SynthDataset(path)) == 10


def test_disk_full_leaves_no_partial_shard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "ds"
    temporaries: list[Path] = []
    real_init, real_write = ShardWriter.__init__, ShardWriter._write
    written = {"calls": 0}

    def spy_init(self, *args, **kwargs) -> None:
        real_init(self, *args, **kwargs)
        temporaries.append(self.temp_path)

    def full_disk(self, data: bytes) -> None:
        written["calls"] += 1
        if written["calls"] > 30:  # the first shard fits, the second fails midway
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(self, data)

    monkeypatch.setattr(ShardWriter, "__init__", spy_init)
    monkeypatch.setattr(ShardWriter, "_write", full_disk)
    with pytest.raises(PysynthError, match=r"000001\.shard.*No space left"):
        write(path)
    assert len(temporaries) == 2
    assert all(t.name.endswith(".part") and t.parent == path / "shards" for t in temporaries)
    assert not any(t.exists() for t in temporaries)
    assert sorted(p.name for p in (path / "shards").iterdir()) == ["000000.shard"]
    monkeypatch.undo()
    write(tmp_path / "reference")
    assert write(path).skipped == 1
    assert files(path) == files(tmp_path / "reference")


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to tell shard files apart")
def test_disk_full_at_fsync_leaves_no_partial_shard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    real_fsync, synced = os.fsync, []

    def fsync(fd: int) -> None:
        name = Path(f"/proc/self/fd/{fd}").readlink().name
        if name.endswith(".part") and ".shard." in name:
            synced.append(name)
            if len(synced) == 2:  # the second shard's data does not fit on the disk
                raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(PysynthError, match=r"000001\.shard.*No space left"):
        write(tmp_path / "ds")
    assert synced[1].startswith(".000001.shard.")
    assert sorted(p.name for p in (tmp_path / "ds" / "shards").iterdir()) == ["000000.shard"]


def test_items_that_break_the_schema_are_refused(tmp_path: Path) -> None:
    def wrong_dtype(i: int) -> tuple[dict, dict]:
        arrays, meta = make_item(i)
        return arrays | {"labels": arrays["labels"].astype(np.int32)}, meta

    with pytest.raises(ValueError, match=r"item 0: 'labels' has dtype int32"):
        write(tmp_path / "a", make_item=wrong_dtype)
    with pytest.raises(ValueError, match="meta is not JSON-able"):
        write(tmp_path / "b", make_item=lambda i: (make_item(i)[0], {"x": object()}))
    with pytest.raises(TypeError, match="picklable"):
        write(tmp_path / "c", make_item=lambda i: make_item(i), workers=2)


def test_schema_validation() -> None:
    assert Field("uint16", [4, None]).shape == (4, None)
    assert Field(np.float32, (2,)).dtype == "<f4"
    assert Schema.from_json(SCHEMA.to_json()) == SCHEMA
    assert SCHEMA.ragged_keys == ("centres",)
    for bad in [("object", (1,)), (">u2", (1,)), ("uint8", (-1,)), ("nonsense", (1,))]:
        with pytest.raises(ValueError, match=r"dtype|shape"):
            Field(*bad)
    with pytest.raises(ValueError, match="reserved"):
        Schema({"meta": Field("uint8", (1,))})
    with pytest.raises(ValueError, match=r"missing \['centres'\]"):
        SCHEMA.check({"image": np.zeros((SIZE, SIZE, 3), np.uint8), "labels": np.zeros((SIZE, SIZE), np.uint16)}, 0)
    with pytest.raises(ValueError, match="shape"):
        SCHEMA.check(make_item(0)[0] | {"centres": np.zeros((3, 3), np.float32)}, 0)


def test_dataloader_workers_read_every_item_once(tmp_path: Path) -> None:
    import torch
    from torch.utils.data import DataLoader

    from pysynth.synth.stream import collate

    write(tmp_path / "ds", n=11)
    ds = SynthDataset(tmp_path / "ds")
    ds[0]  # the parent has a shard open: it must not travel to the workers
    assert pickle.loads(pickle.dumps(ds))[7]["index"] == 7
    loader = DataLoader(
        ds,
        batch_size=3,
        num_workers=2,
        collate_fn=functools.partial(collate, ragged=ds.schema.ragged_keys),
        multiprocessing_context="spawn",
    )
    batches = list(loader)
    indices = torch.cat([b["index"] for b in batches]).tolist()
    assert indices == list(range(11))
    assert batches[0]["image"].shape == (3, SIZE, SIZE, 3)
    assert batches[0]["labels"].dtype == torch.uint16
    assert [c.shape[0] for c in batches[0]["centres"]] == [0, 1, 2]
    for batch in batches:
        for j, i in enumerate(batch["index"].tolist()):
            want = ds[i]
            np.testing.assert_array_equal(batch["image"][j].numpy(), want["image"])
            np.testing.assert_array_equal(batch["centres"][j].numpy(), want["centres"])
            assert batch["meta"][j] == want["meta"]


def test_export_png_writes_readable_pictures(tmp_path: Path) -> None:
    write(tmp_path / "ds")
    ds = SynthDataset(tmp_path / "ds")
    written = export_png(ds, tmp_path / "png", [3, 0])
    assert sorted(p.name for p in written) == sorted(
        f"{i}_{kind}.png" for i in (0, 3) for kind in ("image", "labels", "overlay")
    )
    item = ds[3]
    image = cv2.cvtColor(cv2.imread(str(tmp_path / "png" / "3_image.png")), cv2.COLOR_BGR2RGB)
    np.testing.assert_array_equal(image, item["image"])
    labels = cv2.imread(str(tmp_path / "png" / "3_labels.png"), cv2.IMREAD_UNCHANGED)
    assert labels.dtype == np.uint16
    np.testing.assert_array_equal(labels, item["labels"])
    overlay = cv2.cvtColor(cv2.imread(str(tmp_path / "png" / "3_overlay.png")), cv2.COLOR_BGR2RGB)
    edge = outline_mask(item["labels"])
    assert edge.any()
    assert (overlay[edge] == (0, 255, 0)).all()
    np.testing.assert_array_equal(overlay[~edge], item["image"][~edge])


def test_outline_mask_marks_the_rim_of_each_instance() -> None:
    labels = np.zeros((7, 7), np.uint16)
    labels[1:6, 1:6] = 1
    labels[3, 3] = 2
    edge = outline_mask(labels)
    assert edge[[1, 5, 3, 2], [1, 3, 3, 3]].all()  # corners and sides of 1, the lone 2, 1 around it
    assert not edge[[2, 0], [2, 0]].any()  # inside 1, background

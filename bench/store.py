"""Benchmark: writing and randomly reading the synthetic dataset store, next to one PNG pair per item.

Items are realistic but not synthesised here (generation is not timed): crops of real H&E tiles (the shared MoNuSeg
images where present, else the bundled slide) with a uint16 label map of random filled circles and their centres.
The PNG baseline writes ``<i>_image.png`` + ``<i>_labels.png`` with ``cv2.imwrite`` and reads them back with
``cv2.imread``, one process. Reads go through the page cache (files just written), so they time decoding, not disk.

Run: ``python -m pysynth.bench.store [--json out.json] [--quick]``.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import cv2
import numpy as np

from pysynth.bench.harness import Timing, format_table, measure, write_json
from pysynth.synth.schema import Field, Schema
from pysynth.synth.store import SynthDataset, write_dataset

SHARED_IMAGES = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "monuseg-train" / "images"


def tissue_tiles() -> list[np.ndarray]:
    """Real RGB H&E tiles: the shared MoNuSeg training images if present, else a region of the bundled slide."""
    files = sorted(SHARED_IMAGES.glob("*.png"))
    if files:
        return [cv2.cvtColor(cv2.imread(str(f)), cv2.COLOR_BGR2RGB) for f in files[:8]]
    from pysynth import data_path
    from pysynth.io import open_slide

    with open_slide(data_path("CMU-1-Small-Region.svs")) as slide:
        return [slide.read_level(0, 700, 1500, 1000, 1000)]


def make_pool(size: int, count: int, seed: int = 0) -> dict[str, np.ndarray]:
    """``count`` items of side ``size``: image crops, circle label maps and their centres (padded, with counts).

    Returns:
        Arrays ``image (count, size, size, 3)``, ``labels (count, size, size)``, ``centres (count, m, 2)``, ``n``.
    """
    rng = np.random.default_rng(seed)
    tiles = tissue_tiles()
    most = int(60 * (size / 200) ** 2)
    pool = {
        "image": np.zeros((count, size, size, 3), np.uint8),
        "labels": np.zeros((count, size, size), np.uint16),
        "centres": np.zeros((count, most, 2), np.float32),
        "n": np.zeros(count, np.int64),
    }
    for j in range(count):
        tile = tiles[j % len(tiles)]
        y, x = rng.integers(0, tile.shape[0] - size), rng.integers(0, tile.shape[1] - size)
        pool["image"][j] = tile[y : y + size, x : x + size]
        n = int(rng.integers(most // 3, most + 1))
        centres = rng.uniform(0, size, (n, 2)).astype(np.float32)
        for k, (cx, cy) in enumerate(centres, start=1):
            cv2.circle(pool["labels"][j], (int(cx), int(cy)), int(rng.integers(4, 11)), k, -1)
        pool["centres"][j, :n], pool["n"][j] = centres, n
    return pool


class PoolItems:
    """``make_item`` for the benchmark: item ``i`` is pool item ``i % count``, loaded once per process from a file.

    Args:
        path: ``.npz`` written from :func:`make_pool`.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._pool: dict[str, np.ndarray] | None = None

    def __getstate__(self) -> dict:
        return {"path": self.path, "_pool": None}

    def __call__(self, i: int) -> tuple[dict, dict]:
        """Item ``i``: arrays and meta."""
        if self._pool is None:
            self._pool = dict(np.load(self.path))
        j = i % len(self._pool["n"])
        n = int(self._pool["n"][j])
        arrays = {
            "image": self._pool["image"][j],
            "labels": self._pool["labels"][j],
            "centres": self._pool["centres"][j, :n],
        }
        return arrays, {"source": f"tile-{j}", "seed": i, "params": {"nuclei": n}}


def schema_for(size: int) -> Schema:
    """The benchmark items' schema."""
    return Schema(
        {
            "image": Field("uint8", (size, size, 3)),
            "labels": Field("uint16", (size, size)),
            "centres": Field("float32", (None, 2)),
        }
    )


def folder_bytes(path: Path) -> int:
    """Bytes in the files under ``path``."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def bench_size(size: int, n: int, n_png: int, work: Path, repeats: int) -> list[tuple[Timing, float]]:
    """Time store writing (1 and 2 workers), store random reading, and the PNG baseline for one item size."""
    cv2.setNumThreads(1)
    pool_file = work / f"pool{size}.npz"
    np.savez(pool_file, **make_pool(size, 32))
    make_item = PoolItems(str(pool_file))
    schema = schema_for(size)
    out = work / f"ds{size}"
    rows = []
    for workers in (1, 2):

        def write(workers: int = workers) -> None:
            write_dataset(out, n, make_item, schema=schema, workers=workers, overwrite=True)

        timing = measure(
            f"store write {size}px, {workers} worker(s)",
            write,
            items_per_call=n,
            unit="item",
            warmup=1,
            repeats=repeats,
            min_time_s=0,
        )
        rows.append((timing, folder_bytes(out) / n))

    def start_pool() -> None:  # the fixed cost inside the 2-worker rows: spawning and importing
        write_dataset(work / "tiny", 2, make_item, schema=schema, workers=2, shard_size=1, overwrite=True)

    rows.append(
        (
            measure(
                f"  of which pool start ({size}px, 2 items)",
                start_pool,
                items_per_call=2,
                unit="item",
                warmup=1,
                repeats=repeats,
                min_time_s=0,
            ),
            float("nan"),
        )
    )
    ds = SynthDataset(out)
    order = np.random.default_rng(1).permutation(n)[:1024]

    def read() -> None:
        for i in order:
            ds[int(i)]

    rows.append(
        (
            measure(
                f"store random read {size}px",
                read,
                items_per_call=len(order),
                unit="item",
                warmup=1,
                repeats=repeats,
                min_time_s=0,
            ),
            folder_bytes(out) / n,
        )
    )

    png_dir = work / f"png{size}"
    png_dir.mkdir(exist_ok=True)

    def write_png() -> None:
        for i in range(n_png):
            arrays, _ = make_item(i)
            cv2.imwrite(str(png_dir / f"{i}_image.png"), cv2.cvtColor(arrays["image"], cv2.COLOR_RGB2BGR))
            cv2.imwrite(str(png_dir / f"{i}_labels.png"), arrays["labels"])

    rows.append(
        (
            measure(
                f"PNG pair write {size}px (cv2)",
                write_png,
                items_per_call=n_png,
                unit="item",
                warmup=1,
                repeats=repeats,
                min_time_s=0,
            ),
            folder_bytes(png_dir) / n_png,
        )
    )
    png_order = np.random.default_rng(1).permutation(n_png)

    def read_png() -> None:
        for i in png_order:
            image = cv2.imread(str(png_dir / f"{i}_image.png"))
            cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
            cv2.imread(str(png_dir / f"{i}_labels.png"), cv2.IMREAD_UNCHANGED)

    rows.append(
        (
            measure(
                f"PNG pair random read {size}px (cv2)",
                read_png,
                items_per_call=n_png,
                unit="item",
                warmup=1,
                repeats=repeats,
                min_time_s=0,
            ),
            folder_bytes(png_dir) / n_png,
        )
    )
    return rows


def run(quick: bool) -> list:
    """The ``pysynth bench`` section: store writing and random reading next to one PNG pair per item."""
    repeats = 2 if quick else 3
    rows: list = []
    work = Path(tempfile.mkdtemp(prefix="pysynth-bench-store-"))
    try:
        for size, n, n_png in ((200, 8192, 512), (400, 2048, 128)):
            if quick:
                n, n_png = n // 16, n_png // 8
            results = bench_size(size, n, n_png, work, repeats)
            named = {t.name: (t, kb) for t, kb in results}
            png_write = named[f"PNG pair write {size}px (cv2)"][0]
            png_read = named[f"PNG pair random read {size}px (cv2)"][0]
            for t, kb in results:
                if np.isnan(kb):
                    continue
                t.extra["kB_per_item"] = round(kb / 1e3, 1)
                if t.name.startswith("store write"):
                    t.extra["baseline"] = png_write.name
                elif t.name.startswith("store random read"):
                    t.extra["baseline"] = png_read.name
                rows.append(t)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    """Run the cases and print the table (and write JSON with ``--json``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write timings and machine record here")
    parser.add_argument("--quick", action="store_true", help="fewer items and repeats (a smoke run)")
    args = parser.parse_args(argv)
    repeats = 2 if args.quick else 3
    results = []
    work = Path(tempfile.mkdtemp(prefix="pysynth-bench-store-"))
    try:
        for size, n, n_png in ((200, 8192, 512), (400, 2048, 128)):
            if args.quick:
                n, n_png = n // 16, n_png // 8
            results += bench_size(size, n, n_png, work, repeats)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    table = []
    for t, size in results:
        if np.isnan(size):  # a fixed cost, in seconds
            table.append([t.name, f"{t.median_s:.2f} s", f"{t.p25_s:.2f}–{t.p75_s:.2f} s", "–"])
        else:
            spread = f"{t.items_per_call / t.p75_s:,.0f}–{t.items_per_call / t.p25_s:,.0f}"
            table.append([t.name, f"{t.rate:,.0f}", spread, f"{size / 1e3:,.1f}"])
    print(format_table(table, ["case", "items/s (median)", "items/s (p75–p25)", "kB/item on disk"]))
    if args.json:
        notes = {"bytes_per_item": {t.name: size for t, size in results if not np.isnan(size)}}
        write_json(args.json, "store", [t for t, _ in results], notes)


if __name__ == "__main__":
    from pysynth.bench.store import main as run  # so that worker processes unpickle PoolItems by its module name

    run()

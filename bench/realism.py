"""Realism check: nuclei per patch, nuclear area and foreground fraction, synthetic next to real label maps.

Real label maps are for measuring only: they are read here to compare statistics, never by synthesis or
training. Both sides are cut into patches of the synthetic patch size; a nucleus counts in a patch when its
centroid is inside; areas are of nuclei that do not touch the patch border (whole ones), so partly visible
nuclei do not bias either side.

Usage: ``python -m pysynth.bench.realism DATASET LABELS_DIR [--max-items N]``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np


def patch_stats(labels: np.ndarray) -> tuple[int, np.ndarray, float]:
    """``(count, whole_areas, foreground_fraction)`` of one label patch."""
    ids, counts = np.unique(labels, return_counts=True)
    keep = ids > 0
    ids, counts = ids[keep], counts[keep]
    if len(ids) == 0:
        return 0, np.zeros(0), 0.0
    ys, xs = np.indices(labels.shape)
    flat = labels.ravel()
    top = int(flat.max()) + 1
    n = np.bincount(flat, minlength=top).astype(float)
    cy = np.bincount(flat, weights=ys.ravel(), minlength=top) / np.maximum(n, 1)
    cx = np.bincount(flat, weights=xs.ravel(), minlength=top) / np.maximum(n, 1)
    h, w = labels.shape
    inside = (cy[ids] >= 0) & (cy[ids] < h) & (cx[ids] >= 0) & (cx[ids] < w)
    border = set(np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])).tolist())
    whole = np.array([c for i, c in zip(ids, counts, strict=True) if i not in border], float)
    return int(inside.sum()), whole, float((labels > 0).mean())


def summarise(stats: list[tuple[int, np.ndarray, float]]) -> dict[str, tuple[float, float, float, float]]:
    """Mean, p10, median and p90 of nuclei per patch, whole-nucleus area (px) and foreground fraction."""
    counts = np.array([s[0] for s in stats], float)
    areas = np.concatenate([s[1] for s in stats]) if stats else np.zeros(0)
    fg = np.array([s[2] for s in stats], float)

    def q(a: np.ndarray) -> tuple[float, float, float, float]:
        if a.size == 0:
            return (float("nan"),) * 4
        return (float(a.mean()), *(float(v) for v in np.percentile(a, [10, 50, 90])))

    return {"nuclei per patch": q(counts), "nuclear area (px)": q(areas), "foreground fraction": q(fg)}


def real_stats(labels_dir: Path, size: int) -> list[tuple[int, np.ndarray, float]]:
    """Statistics of non-overlapping ``size`` px patches of every label map in a folder."""
    stats = []
    for path in sorted(labels_dir.glob("*.png")):
        labels = cv2.imread(str(path), cv2.IMREAD_UNCHANGED).astype(np.int64)
        for y in range(0, labels.shape[0] - size + 1, size):
            for x in range(0, labels.shape[1] - size + 1, size):
                stats.append(patch_stats(labels[y : y + size, x : x + size]))
    return stats


def main(argv: list[str] | None = None) -> None:
    from pysynth.synth.store import SynthDataset

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", type=Path)
    parser.add_argument("labels", type=Path)
    parser.add_argument("--max-items", type=int, default=2000)
    args = parser.parse_args(argv)
    ds = SynthDataset(args.dataset)
    take = np.linspace(0, len(ds) - 1, min(args.max_items, len(ds))).astype(int)
    synth = [patch_stats(ds[int(i)]["labels"].astype(np.int64)) for i in take]
    size = ds[0]["labels"].shape[0]
    real = real_stats(args.labels, size)
    rows = []
    for (name, s), (_, r) in zip(summarise(synth).items(), summarise(real).items(), strict=True):
        fmt = "{:.3f}" if "fraction" in name else "{:.1f}"
        rows.append([name, *(fmt.format(v) for v in s), *(fmt.format(v) for v in r)])
    from pysynth.bench.harness import format_table

    print(f"synthetic: {len(synth)} patches; real: {len(real)} patches of {size} px from {args.labels.name}")
    print(format_table(rows, ["statistic", "synth mean", "p10", "median", "p90", "real mean", "p10", "median", "p90"]))


if __name__ == "__main__":
    main()

"""Synthetic whole slides of real tissue: pyramidal, tiled, compressed TIFFs that OpenSlide opens, of any size.

The slide is white glass divided into square *cells* (``block`` px); some cells hold a 1024² (``block``) crop of
real tissue from a source image (by default the bundled Aperio slide read at the slide's resolution), each turned
by a random multiple of 90° and possibly mirrored. The tissue cells form one compact piece grown at random from
the slide's centre, so that about ``tissue_fraction`` of the slide is tissue; a tissue mask then skips the glass.

Every level is written from a generator of tiles: level 0 by copying from the source, level ``k`` by averaging
``2**k × 2**k`` blocks of each tissue cell (an exact box filter, so the pyramid is consistent) and white elsewhere.
Memory is bounded by the source image and one row of cells at one level, whatever the slide's size. Tiles are
deflate (zlib) compressed, which tifffile encodes without extra packages; JPEG would need ``imagecodecs``.

Usage: ``python -m pysynth.bench.make_slide OUT.tiff --size 40000 [--tissue-fraction F]``.
"""

from __future__ import annotations

import argparse
import math
import resource
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

#: Side of a tissue cell in level-0 pixels (a power of two, so every level's cells are whole pixels).
BLOCK = 1024

#: Least tissue fraction of a source crop (as judged by the tissue mask) for it to be used.
MIN_CROP_TISSUE = 0.9


@dataclass(frozen=True)
class TissueCell:
    """One cell of tissue: its place in the slide's cell grid and where its pixels come from.

    Attributes:
        row: Cell row (level-0 top edge ``row * block``).
        col: Cell column (level-0 left edge ``col * block``).
        src_y: Top of the crop in the source image.
        src_x: Left of the crop in the source image.
        rot: Quarter turns (``np.rot90``'s ``k``) applied to the crop.
        flip: Whether the turned crop is mirrored left to right.
    """

    row: int
    col: int
    src_y: int
    src_x: int
    rot: int
    flip: bool


@dataclass(frozen=True)
class SlideLayout:
    """What :func:`write_pyramidal_tiff` wrote.

    Attributes:
        size_hw: Level-0 ``(height, width)``.
        mpp: Level-0 µm/px.
        tile: TIFF tile side.
        block: Cell side, level-0 pixels.
        level_shapes_hw: ``(height, width)`` of each level; level ``k`` is ``2**k`` times coarser.
        cells: The tissue cells.
    """

    size_hw: tuple[int, int]
    mpp: float
    tile: int
    block: int
    level_shapes_hw: tuple[tuple[int, int], ...]
    cells: tuple[TissueCell, ...]

    @property
    def tissue_px(self) -> int:
        """Level-0 pixels covered by tissue cells."""
        return len(self.cells) * self.block * self.block

    @property
    def tissue_fraction(self) -> float:
        """Share of the slide covered by tissue cells."""
        return self.tissue_px / (self.size_hw[0] * self.size_hw[1])


def load_source(mpp: float = 0.25, path: str | Path | None = None) -> np.ndarray:
    """A whole slide or image read at ``mpp`` µm/px into memory (default: the bundled Aperio slide).

    The source is held whole, so it should be small (the bundled slide at 0.25 µm/px is about 80 MB).
    """
    from pysynth import data_path
    from pysynth.io import open_slide, read_region

    with open_slide(data_path("CMU-1-Small-Region.svs") if path is None else path) as reader:
        h0, w0 = reader.level_shapes_hw[0]
        f = mpp / reader.mpp  # level-0 pixels per pixel at mpp
        return read_region(reader, 0, 0, (max(1, int(h0 / f)), max(1, int(w0 / f))), mpp)


def tissue_crop_origins(source: np.ndarray, block: int, mpp: float, min_tissue: float = MIN_CROP_TISSUE):
    """Top-left corners (``(n, 2)`` array of y, x) of ``block``-sized crops of ``source`` that are mostly tissue.

    Candidates lie on a grid of ``block // 16`` px; those whose tissue fraction (by the slide tissue mask of an
    8x reduction) is at least ``min_tissue``, or the best tenth of all candidates where none is.

    Raises:
        ValueError: If the source is smaller than one block.
    """
    from pysynth.io import tissue_mask_from_rgb

    h, w = source.shape[:2]
    if h < block or w < block:
        raise ValueError(f"the source ({h}x{w} px) is smaller than one {block} px cell")
    f = 8
    small = cv2.resize(source, (max(1, w // f), max(1, h // f)), interpolation=cv2.INTER_AREA)
    mask = tissue_mask_from_rgb(small, mpp * f)
    table = cv2.integral(mask.astype(np.uint8), sdepth=cv2.CV_64F)
    step = max(1, block // 16)
    ys, xs = np.meshgrid(np.arange(0, h - block + 1, step), np.arange(0, w - block + 1, step), indexing="ij")
    ys, xs = ys.ravel(), xs.ravel()
    y0, x0 = ys // f, xs // f
    y1, x1 = np.minimum((ys + block) // f, mask.shape[0]), np.minimum((xs + block) // f, mask.shape[1])
    area = np.maximum((y1 - y0) * (x1 - x0), 1)
    fraction = (table[y1, x1] - table[y0, x1] - table[y1, x0] + table[y0, x0]) / area
    keep = fraction >= min_tissue
    if not keep.any():
        keep = fraction >= np.quantile(fraction, 0.9)
    return np.stack([ys[keep], xs[keep]], axis=1)


def cell_rgb(source: np.ndarray, cell: TissueCell, block: int) -> np.ndarray:
    """A tissue cell's level-0 pixels (a view of the source, turned and mirrored)."""
    crop = np.rot90(source[cell.src_y : cell.src_y + block, cell.src_x : cell.src_x + block], cell.rot)
    return crop[:, ::-1] if cell.flip else crop


def grow_piece(rows: int, cols: int, n: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """``n`` cells of a ``rows × cols`` grid forming one compact piece grown at random from the centre.

    Each step adds a cell that borders the piece, chosen with weight (bordering cells)², which keeps the piece
    round-ish with a ragged edge, like a section of tissue.
    """
    n = min(n, rows * cols)
    if n <= 0:
        return []
    start = (rows // 2, cols // 2)
    chosen = [start]
    taken = {start}
    frontier: dict[tuple[int, int], int] = {}

    def add(cell: tuple[int, int]) -> None:
        frontier.pop(cell, None)
        r, c = cell
        for nb in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
            if 0 <= nb[0] < rows and 0 <= nb[1] < cols and nb not in taken:
                frontier[nb] = frontier.get(nb, 0) + 1

    add(start)
    while len(chosen) < n:
        candidates = sorted(frontier)
        weights = np.array([frontier[c] for c in candidates], np.float64) ** 2
        cell = candidates[rng.choice(len(candidates), p=weights / weights.sum())]
        chosen.append(cell)
        taken.add(cell)
        add(cell)
    return chosen


def plan_layout(
    source: np.ndarray,
    size_hw: tuple[int, int],
    *,
    mpp: float = 0.25,
    tile: int = 512,
    tissue_fraction: float = 0.25,
    tissue_cells: Sequence[tuple[int, int]] | None = None,
    block: int = BLOCK,
    seed: int = 0,
) -> SlideLayout:
    """Where tissue goes and which source crop each cell shows (see :func:`write_pyramidal_tiff`)."""
    h, w = (int(v) for v in size_hw)
    if h < 1 or w < 1:
        raise ValueError(f"size must be positive, got {size_hw}")
    if tile % 16 or tile < 16:
        raise ValueError(f"tile must be a positive multiple of 16 (TIFF), got {tile}")
    if block < 1 or block & (block - 1):
        raise ValueError(f"block must be a power of two, got {block}")
    if not 0.0 <= tissue_fraction <= 1.0:
        raise ValueError(f"tissue_fraction must be in [0, 1], got {tissue_fraction}")
    rows, cols = h // block, w // block  # only whole cells hold tissue
    rng = np.random.default_rng(seed)
    if tissue_cells is None:
        places = grow_piece(rows, cols, round(tissue_fraction * h * w / block**2), rng)
    else:
        places = [(int(r), int(c)) for r, c in tissue_cells]
        outside = [p for p in places if not (0 <= p[0] < rows and 0 <= p[1] < cols)]
        if outside:
            raise ValueError(f"tissue cells {outside[:3]} are not whole cells of a {h}x{w} slide")
        places = sorted(set(places))
    cells: list[TissueCell] = []
    if places:
        origins = tissue_crop_origins(source, block, mpp)
        picks = rng.integers(0, len(origins), len(places))
        turns = rng.integers(0, 4, len(places))
        flips = rng.integers(0, 2, len(places))
        for (r, c), i, k, fl in zip(places, picks, turns, flips, strict=True):
            cells.append(TissueCell(r, c, int(origins[i, 0]), int(origins[i, 1]), int(k), bool(fl)))
    shapes = [(h, w)]
    # Halve until the level fits in one tile, as long as cells stay whole pixels.
    while max(shapes[-1]) > tile and 2 ** len(shapes) <= block:
        d = 2 ** len(shapes)
        shapes.append((math.ceil(h / d), math.ceil(w / d)))
    return SlideLayout((h, w), float(mpp), int(tile), int(block), tuple(shapes), tuple(cells))


def level_tiles(source: np.ndarray, layout: SlideLayout, level: int) -> Iterator[np.ndarray]:
    """The tiles of one level in raster order (``tile × tile × 3`` uint8; edge tiles are padded with white).

    Level 0 is copied from the source; level ``k`` averages ``2**k × 2**k`` blocks of each tissue cell. Reduced
    cells are kept only while a tile row needs them.
    """
    d = 2**level
    h, w = layout.level_shapes_hw[level]
    t, side = layout.tile, layout.block // d  # tile and cell sides at this level
    by_place = {(c.row, c.col): c for c in layout.cells}
    white = np.full((t, t, 3), 255, np.uint8)
    white.flags.writeable = False
    reduced: dict[tuple[int, int], np.ndarray] = {}

    def pixels(cell: TissueCell) -> np.ndarray:
        if level == 0:
            return cell_rgb(source, cell, layout.block)
        key = (cell.row, cell.col)
        if key not in reduced:
            full = np.ascontiguousarray(cell_rgb(source, cell, layout.block))
            reduced[key] = cv2.resize(full, (side, side), interpolation=cv2.INTER_AREA)
        return reduced[key]

    for y in range(0, h, t):
        first_row, last_row = y // side, (min(y + t, h) - 1) // side
        for key in [k for k in reduced if k[0] < first_row]:
            del reduced[key]
        for x in range(0, w, t):
            out = None
            for r in range(first_row, last_row + 1):
                for c in range(x // side, (min(x + t, w) - 1) // side + 1):
                    cell = by_place.get((r, c))
                    if cell is None:
                        continue
                    if out is None:
                        out = white.copy()
                    y0, y1 = max(y, r * side), min(y + t, (r + 1) * side)
                    x0, x1 = max(x, c * side), min(x + t, (c + 1) * side)
                    src = pixels(cell)
                    out[y0 - y : y1 - y, x0 - x : x1 - x] = src[
                        y0 - r * side : y1 - r * side, x0 - c * side : x1 - c * side
                    ]
            yield white if out is None else out


def write_pyramidal_tiff(
    path: str | Path,
    rgb_source: np.ndarray | str | Path | None,
    size_hw: int | tuple[int, int],
    mpp: float = 0.25,
    tile: int = 512,
    tissue_fraction: float = 0.25,
    *,
    tissue_cells: Sequence[tuple[int, int]] | None = None,
    block: int = BLOCK,
    seed: int = 0,
    compression: str = "zlib",
    workers: int = 1,
) -> SlideLayout:
    """Write a pyramidal, tiled, compressed RGB TIFF of real tissue on white glass, in bounded memory.

    OpenSlide opens it as a generic tiled TIFF with level-0 resolution ``mpp`` (from the resolution tags) and one
    level per halving down to a level that fits in one tile.

    Args:
        path: The TIFF to write.
        rgb_source: Tissue to tile from: an RGB ``uint8`` image at ``mpp`` µm/px, a slide or image path (read
            whole at ``mpp``), or None for the bundled Aperio slide.
        size_hw: Level-0 ``(height, width)``, or one side for a square slide.
        mpp: Level-0 µm/px.
        tile: TIFF tile side (a multiple of 16).
        tissue_fraction: Share of the slide that is tissue (rounded to whole cells; cells that the slide's edge
            cuts stay glass).
        tissue_cells: Explicit ``(row, col)`` cells to fill with tissue instead of ``tissue_fraction``'s grown
            piece (cell ``(r, c)`` spans level-0 rows ``r·block … (r+1)·block``, columns alike).
        block: Cell side in level-0 pixels (a power of two, at most the source's smaller side).
        seed: Seed of the placement, crops, turns and mirrorings (the same seed gives the same slide).
        compression: tifffile codec name; ``"zlib"`` (deflate) needs nothing beyond tifffile, ``"jpeg"`` needs
            the ``imagecodecs`` package.
        workers: Threads tifffile compresses tiles with.

    Returns:
        The :class:`SlideLayout` written.
    """
    import tifffile

    if isinstance(size_hw, int):
        size_hw = (size_hw, size_hw)
    source = rgb_source if isinstance(rgb_source, np.ndarray) else load_source(mpp, rgb_source)
    if source.ndim != 3 or source.shape[2] != 3 or source.dtype != np.uint8:
        raise ValueError(f"the source must be RGB uint8 (h, w, 3), got {source.dtype} {source.shape}")
    layout = plan_layout(
        source, size_hw, mpp=mpp, tile=tile, tissue_fraction=tissue_fraction, tissue_cells=tissue_cells,
        block=block, seed=seed,
    )  # fmt: skip
    raw = sum(lh * lw * 3 for lh, lw in layout.level_shapes_hw)
    with tifffile.TiffWriter(path, bigtiff=raw > 2**31) as tif:
        for level, shape in enumerate(layout.level_shapes_hw):
            px_per_cm = 1e4 / (mpp * 2**level)
            tif.write(
                level_tiles(source, layout, level),
                shape=(*shape, 3),
                dtype=np.uint8,
                tile=(tile, tile),
                photometric="rgb",
                compression=compression,
                resolution=(px_per_cm, px_per_cm),
                resolutionunit="CENTIMETER",
                subfiletype=1 if level else 0,
                description="pysynth synthetic slide" if level == 0 else None,
                metadata=None,
                software="pysynth",
                maxworkers=workers,
            )
    return layout


def peak_rss_mb() -> float:
    """This process' peak resident memory so far, MB (``VmHWM`` on Linux).

    ``VmHWM`` belongs to the process' own address space; ``ru_maxrss`` is only the fallback, because Linux carries
    it across ``exec`` from the parent (a child started by a large process would report at least the parent's).
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**10  # kB
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the TIFF to write")
    parser.add_argument("--size", type=int, nargs="+", required=True, metavar="PX", help="side, or height width")
    parser.add_argument("--tissue-fraction", type=float, default=0.25, help="share of the slide that is tissue")
    parser.add_argument("--mpp", type=float, default=0.25, help="level-0 µm/px (default 0.25, 40x)")
    parser.add_argument("--tile", type=int, default=512, help="TIFF tile side")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--source", default=None, help="slide or image to take tissue from (default: bundled)")
    parser.add_argument("--workers", type=int, default=1, help="compression threads")
    args = parser.parse_args(argv)
    if len(args.size) not in (1, 2):
        parser.error("--size takes one side or height and width")
    size = (args.size[0], args.size[-1])
    started = time.perf_counter()
    layout = write_pyramidal_tiff(
        args.out, args.source, size, args.mpp, args.tile, args.tissue_fraction, seed=args.seed, workers=args.workers
    )
    seconds = time.perf_counter() - started
    levels = ", ".join(f"{w}x{h}" for h, w in layout.level_shapes_hw)
    print(
        f"{args.out}: {size[1]}x{size[0]} px at {args.mpp} µm/px, {len(layout.level_shapes_hw)} levels ({levels}); "
        f"{len(layout.cells)} tissue cells = {layout.tissue_px / 1e6:.1f} Mpx ({layout.tissue_fraction:.1%}); "
        f"{args.out.stat().st_size / 1e6:.1f} MB in {seconds:.1f} s; peak RSS {peak_rss_mb():.0f} MB"
    )


if __name__ == "__main__":
    main()

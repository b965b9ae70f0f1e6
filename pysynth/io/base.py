"""The slide reader protocol and reading at a physical resolution.

Every source of pixels (an OpenSlide slide, a plain image, an in-memory array) is a :class:`SlideReader`: a
pyramid of levels that can return any rectangle of any level as RGB. :func:`read_region` then serves any level-0
rectangle at any resolution in µm/px, choosing the pyramid level and resampling with exact sub-pixel geometry, so
coordinates computed at one resolution map to every other one without drift.
"""

from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

import cv2
import numpy as np

#: The method works at 40x, about 0.25 µm per pixel (20x material is upsampled 2x).
DEFAULT_MPP = 0.25

#: Resolution metadata outside this range (µm/px) is not a microscope's: TIFF writers put 72 dpi there by default.
PLAUSIBLE_MPP = (0.02, 50.0)

#: A pyramid level up to this much coarser than asked for is still used (levels are rarely exact powers of two).
LEVEL_TOLERANCE = 0.01


@runtime_checkable
class SlideReader(Protocol):
    """A pyramid of RGB levels with a known level-0 resolution.

    Attributes:
        name: What to call the source in messages (its path, or a name for in-memory data).
        mpp: Level-0 resolution in µm per pixel.
        mpp_source: ``"metadata"`` when ``mpp`` came from the file, ``"user"`` when it was given.
        level_shapes_hw: ``(height, width)`` of each level, level 0 first.
        level_downsamples: Level-0 pixels per pixel of each level (1.0 for level 0).
    """

    name: str
    mpp: float
    mpp_source: str
    level_shapes_hw: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]

    def read_level(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """Read a rectangle of one level.

        Args:
            level: Pyramid level (0 is the finest).
            x: Left edge in that level's pixels; may be negative.
            y: Top edge in that level's pixels; may be negative.
            w: Width in pixels (> 0).
            h: Height in pixels (> 0).

        Returns:
            RGB ``uint8`` array of shape ``(h, w, 3)``; pixels outside the level are white.
        """
        ...

    def close(self) -> None:
        """Release the file handle (reading afterwards is an error)."""
        ...


def resolve_mpp(name: str, metadata_mpp: float | None, input_mpp: float | None) -> tuple[float, str]:
    """Choose a source's level-0 µm/px: plausible metadata wins, else the user's value, else an error.

    Args:
        name: The source, for messages.
        metadata_mpp: Resolution found in the file, if any.
        input_mpp: Resolution given by the user (``--input-mpp``), if any.

    Returns:
        ``(mpp, source)`` with source ``"metadata"`` or ``"user"``.

    Raises:
        SlideError: If neither gives a usable resolution.
    """
    from pysynth.errors import SlideError

    lo, hi = PLAUSIBLE_MPP
    if metadata_mpp is not None and lo <= metadata_mpp <= hi:
        return float(metadata_mpp), "metadata"
    if input_mpp is not None:
        if not (lo <= input_mpp <= hi):
            raise SlideError(name, f"--input-mpp {input_mpp} is outside the plausible range {lo}-{hi} µm/px")
        return float(input_mpp), "user"
    if metadata_mpp is not None:
        raise SlideError(
            name,
            f"its resolution metadata ({metadata_mpp:.4g} µm/px) is not a microscope's; pass --input-mpp",
        )
    raise SlideError(name, "no resolution (µm/px) in its metadata; pass --input-mpp (0.25 for 40x, 0.5 for 20x)")


def best_level(reader: SlideReader, mpp: float) -> int:
    """The coarsest pyramid level that is still at least as fine as ``mpp`` (level 0 if none is).

    Args:
        reader: The source.
        mpp: Wanted resolution in µm/px.

    Returns:
        The level index.
    """
    fine_enough = [
        level
        for level, downsample in enumerate(reader.level_downsamples)
        if reader.mpp * downsample <= mpp * (1.0 + LEVEL_TOLERANCE)
    ]
    if not fine_enough:
        return 0
    return max(fine_enough, key=lambda level: reader.level_downsamples[level])


def level0_extent(reader: SlideReader, size_px: float, mpp: float) -> float:
    """How many level-0 pixels ``size_px`` pixels at ``mpp`` µm/px span."""
    return size_px * mpp / reader.mpp


def read_region(reader: SlideReader, x0: float, y0: float, shape_hw: tuple[int, int], mpp: float) -> np.ndarray:
    """Read pixels at a physical resolution.

    The output's pixel ``(i, j)`` covers level-0 coordinates ``x0 + j·f … x0 + (j+1)·f`` (likewise for rows) with
    ``f = mpp / reader.mpp``. The coarsest level at least as fine as ``mpp`` is read, then resampled with an
    exact affine map: Gaussian anti-aliasing and bilinear interpolation when shrinking, bicubic when enlarging
    (20x material read at 40x). A read at the native resolution and an integer position is returned unchanged.

    Args:
        reader: The source.
        x0: Left edge, level-0 pixels (may be fractional or outside the slide; outside is white).
        y0: Top edge, level-0 pixels.
        shape_hw: Output ``(height, width)`` in pixels at ``mpp``.
        mpp: Output resolution, µm per pixel.

    Returns:
        RGB ``uint8`` array of shape ``shape_hw + (3,)``.

    Raises:
        ValueError: If the shape or resolution is not positive.
    """
    out_h, out_w = (int(v) for v in shape_hw)
    if out_h <= 0 or out_w <= 0:
        raise ValueError(f"shape_hw must be positive, got {shape_hw}")
    if not (mpp > 0 and math.isfinite(mpp)):
        raise ValueError(f"mpp must be a positive number, got {mpp}")
    level = best_level(reader, mpp)
    downsample = reader.level_downsamples[level]
    scale = mpp / (reader.mpp * downsample)  # level pixels per output pixel (> 1 shrinks)
    fx, fy = x0 / downsample, y0 / downsample  # region origin in level pixels
    if abs(scale - 1.0) < 1e-9 and fx == int(fx) and fy == int(fy):
        return reader.read_level(level, int(fx), int(fy), out_w, out_h)

    sigma = max(0.0, (scale - 1.0) / 2.0)  # anti-aliasing as in skimage.transform.resize
    pad = math.ceil(3.0 * sigma) + 3
    wx0, wy0 = math.floor(fx) - pad, math.floor(fy) - pad
    wx1, wy1 = math.ceil(fx + out_w * scale) + pad, math.ceil(fy + out_h * scale) + pad
    window = reader.read_level(level, wx0, wy0, wx1 - wx0, wy1 - wy0)
    if sigma > 0.1:
        window = cv2.GaussianBlur(window, (0, 0), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REPLICATE)
    # Output pixel centre (j + 0.5) sits at level coordinate fx + (j + 0.5)·scale, i.e. window pixel index
    # fx + (j + 0.5)·scale - 0.5 - wx0.
    matrix = np.array(
        [
            [scale, 0.0, fx - wx0 + 0.5 * scale - 0.5],
            [0.0, scale, fy - wy0 + 0.5 * scale - 0.5],
        ],
        dtype=np.float64,
    )
    interpolation = cv2.INTER_LINEAR if scale >= 1.0 else cv2.INTER_CUBIC
    return cv2.warpAffine(
        window,
        matrix,
        (out_w, out_h),
        flags=interpolation | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_REPLICATE,
    )


def read_thumbnail(reader: SlideReader, mpp: float, *, max_window: int = 4096) -> np.ndarray:
    """The whole slide at ``mpp`` µm/px, read in tiles so memory stays bounded whatever the slide's size.

    Args:
        reader: The source.
        mpp: Output resolution (usually much coarser than the slide).
        max_window: Largest side, in pixels of the level read, of one tile's read.

    Returns:
        RGB ``uint8`` array of shape ``(round(H0·reader.mpp/mpp), round(W0·reader.mpp/mpp), 3)``.
    """
    h0, w0 = reader.level_shapes_hw[0]
    f = mpp / reader.mpp  # level-0 pixels per output pixel
    out_h, out_w = max(1, round(h0 / f)), max(1, round(w0 / f))
    level_scale = f / reader.level_downsamples[best_level(reader, mpp)]
    step = max(64, int(max_window / max(level_scale, 1.0)))
    out = np.empty((out_h, out_w, 3), np.uint8)
    for top in range(0, out_h, step):
        for left in range(0, out_w, step):
            rows, cols = min(step, out_h - top), min(step, out_w - left)
            out[top : top + rows, left : left + cols] = read_region(reader, left * f, top * f, (rows, cols), mpp)
    return out

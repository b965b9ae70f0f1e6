"""Stage "read": a region's window of the slide at the model's resolution, and the samples the colour fit uses."""

from __future__ import annotations

import numpy as np

from pysynth.io import SlideReader, read_region
from pysynth.io.tissue import TissueMask

from .plan import Region, window_box


def read_window(
    reader: SlideReader, region: Region, mpp: float, margin: int, slide_hw: tuple[int, int] | None = None
) -> np.ndarray:
    """A region's core with ``margin`` px of context on every side, at ``mpp``.

    With ``slide_hw`` (the slide's extent at ``mpp``) the window stops at the slide's edges (what ``infer``
    reads); without, it keeps its full size and what lies outside the slide is white.
    """
    f = mpp / reader.mpp
    x0, y0, x1, y1 = window_box(region, margin, slide_hw)
    return read_region(reader, x0 * f, y0 * f, (y1 - y0, x1 - x0), mpp)


def colour_samples(reader: SlideReader, tissue: TissueMask, mpp: float, n: int = 16, size: int = 384):
    """Up to ``n`` windows at ``mpp`` centred on tissue, at fixed positions (deterministic)."""
    where = np.flatnonzero(tissue.mask)
    if len(where) == 0:
        return []
    picks = where[np.linspace(0, len(where) - 1, num=min(n, len(where))).astype(int)]
    f = mpp / reader.mpp
    out = []
    for i in picks:
        y, x = divmod(int(i), tissue.mask.shape[1])
        cx, cy = (x + 0.5) * tissue.scale, (y + 0.5) * tissue.scale
        out.append(read_region(reader, cx - size / 2 * f, cy - size / 2 * f, (size, size), mpp))
    return out

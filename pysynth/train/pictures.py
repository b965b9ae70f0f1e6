"""Pictures of joint training: initial vs refined patches with their weights, and the weight histogram.

Both are written into a training run's folder (issue 5, item 6); the histogram is the paper's Fig. 7, weights
split by whether the discriminator finds the patch realistic.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from pysynth.fsutil import atomic_write_bytes

_COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40)]


def write_png(path: Path, rgb: np.ndarray) -> None:
    """Write an RGB ``uint8`` image as PNG, atomically."""
    atomic_write_bytes(path, cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))[1].tobytes())


def histogram_plot(
    groups: dict[str, np.ndarray],
    *,
    bins: int = 20,
    value_range: tuple[float, float] | None = None,
    title: str = "",
    xlabel: str = "",
    size: tuple[int, int] = (420, 720),
) -> np.ndarray:
    """Histograms of several groups of values on common bins, bars side by side, with counts in the legend.

    Drawn in the style of :func:`pysynth.viz.line_plot`. Non-finite values are left out; values outside
    ``value_range`` go to the first or last bin (clipped weights pile up at their bounds, where they belong).

    Args:
        groups: Name → values (any shape; an empty group is listed in the legend with its count 0).
        bins: Number of bins.
        value_range: ``(low, high)`` of the bins (default: the finite values' range).
        title: Text above the plot.
        xlabel: Text under the x axis.
        size: ``(height, width)`` of the picture.

    Returns:
        The picture, RGB ``uint8``.
    """
    if bins < 1:
        raise ValueError(f"bins must be at least 1, got {bins}")
    h, w = size
    image = np.full((h, w, 3), 255, np.uint8)
    left, right, top, bottom = 60, 20, 30, 40
    values = {k: np.asarray(v, np.float64).ravel() for k, v in groups.items()}
    values = {k: v[np.isfinite(v)] for k, v in values.items()}
    font, grey = cv2.FONT_HERSHEY_PLAIN, (60, 60, 60)
    cv2.putText(image, title, (left, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.55, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.rectangle(image, (left, top), (w - right, h - bottom), (0, 0, 0), 1)
    everything = np.concatenate([*values.values(), np.zeros(0)])
    if value_range is None:
        lo, hi = (float(everything.min()), float(everything.max())) if everything.size else (0.0, 1.0)
    else:
        lo, hi = (float(v) for v in value_range)
    hi = hi if hi > lo else lo + 1.0
    edges = np.linspace(lo, hi, bins + 1)
    counts = {
        k: np.bincount(np.clip(np.searchsorted(edges, v, side="right") - 1, 0, bins - 1), minlength=bins)
        for k, v in values.items()
    }
    peak = max([1, *(int(c.max()) for c in counts.values() if c.size)])
    plot_w, plot_h = w - left - right, h - top - bottom
    slot = plot_w / bins
    bar = max(1.0, (slot - 2) / max(1, len(counts)))
    for i, (name, count) in enumerate(counts.items()):
        colour = _COLOURS[i % len(_COLOURS)]
        for b, n in enumerate(count):
            if n:
                x0 = left + b * slot + 1 + i * bar
                y0 = h - bottom - n / peak * (plot_h - 10)
                cv2.rectangle(image, (round(x0), round(y0)), (round(x0 + bar) - 1, h - bottom - 1), colour, -1)
        label = f"{name} (n={len(values[name])})"
        cv2.putText(image, label, (w - right - 260, top + 18 + 16 * i), font, 1.0, colour, 1, cv2.LINE_AA)
    cv2.putText(image, str(peak), (4, top + 14), font, 0.9, grey, 1, cv2.LINE_AA)
    cv2.putText(image, "0", (4, h - bottom), font, 0.9, grey, 1, cv2.LINE_AA)
    cv2.putText(image, f"{lo:.3g}", (left, h - bottom + 16), font, 0.9, grey, 1, cv2.LINE_AA)
    cv2.putText(image, f"{hi:.3g}", (w - right - 40, h - bottom + 16), font, 0.9, grey, 1, cv2.LINE_AA)
    cv2.putText(image, xlabel, (w // 2 - 60, h - 8), font, 1.0, (0, 0, 0), 1, cv2.LINE_AA)
    return image


def refined_grid(
    initial: Sequence[np.ndarray],
    refined: Sequence[np.ndarray] | None,
    references: Sequence[np.ndarray],
    weights: Sequence[float] | None,
    d_real: Sequence[float] | None,
) -> np.ndarray:
    """Contact sheet of (initial, refined, reference) triplets, the refined patch captioned with its weight.

    Args:
        initial: Initial synthetic patches, RGB ``uint8``.
        refined: The refiner's output for each (``None`` without a refiner: initial and reference only).
        references: The reference patch each was refined towards.
        weights: Importance weight of each (``None`` without a discriminator).
        d_real: The discriminator's mean Pr(real) of each (``None`` without one).

    Returns:
        The sheet, RGB ``uint8``.
    """
    from pysynth.viz import contact_sheet

    images, captions = [], []
    for k, start in enumerate(initial):
        images.append(start)
        captions.append(f"#{k} initial")
        judged = f"#{k} w={weights[k]:.2f} D={d_real[k]:.2f}" if weights is not None and d_real is not None else ""
        if refined is not None:
            images.append(refined[k])
            captions.append(judged or f"#{k} refined")
        elif judged:
            captions[-1] = judged
        images.append(references[k])
        captions.append("reference")
    per = 3 if refined is not None else 2
    return contact_sheet(images, captions, columns=2 * per)

"""Pictures for people: contact sheets of patches and slide overviews with what was taken where."""

from __future__ import annotations

import math
from collections.abc import Sequence

import cv2
import numpy as np

_CAPTION_FONT, _CAPTION_SCALE = cv2.FONT_HERSHEY_PLAIN, 0.8
_ELLIPSIS = "..."  # OpenCV's Hershey fonts draw ASCII only


def _text_width(text: str) -> int:
    return cv2.getTextSize(text, _CAPTION_FONT, _CAPTION_SCALE, 1)[0][0]


def fit_caption(text: str, width_px: int) -> str:
    """``text`` as drawn under a contact-sheet cell ``width_px`` wide: whole if it fits, else middle elided.

    Names of patches share their beginning (the slide) and differ at the end (the patch number), so the end is
    kept: about a third of the kept characters from the start, two thirds from the end
    (``CMU-1-Small-Region_0003`` -> ``CMU-1-...-Region_0003``).
    """
    if _text_width(text) <= width_px:
        return text
    for keep in range(len(text) - 1, 0, -1):
        head = keep // 3
        short = f"{text[:head]}{_ELLIPSIS}{text[len(text) - (keep - head) :]}"
        if _text_width(short) <= width_px:
            return short
    return text[-1:]


def contact_sheet(
    images: Sequence[np.ndarray], captions: Sequence[str] | None = None, *, cell: int = 160, columns: int = 8
) -> np.ndarray:
    """Lay RGB images out on a grid, each shrunk to ``cell`` px, with an optional caption under each.

    Args:
        images: RGB ``uint8`` images of any size.
        captions: One short text per image (a long one loses its middle: :func:`fit_caption`).
        cell: Side of each grid cell in pixels.
        columns: Cells per row (fewer if there are fewer images).

    Returns:
        The sheet, RGB ``uint8``.
    """
    if not images:
        raise ValueError("contact_sheet needs at least one image")
    columns = max(1, min(columns, len(images)))
    rows = math.ceil(len(images) / columns)
    caption_h = 16 if captions else 0
    pad = 4
    sheet = np.full((rows * (cell + caption_h + pad) + pad, columns * (cell + pad) + pad, 3), 255, np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        top, left = pad + r * (cell + caption_h + pad), pad + c * (cell + pad)
        thumb = cv2.resize(image, (cell, cell), interpolation=cv2.INTER_AREA)
        sheet[top : top + cell, left : left + cell] = thumb
        if captions:
            text = fit_caption(captions[i], cell)
            cv2.putText(sheet, text, (left, top + cell + 12), _CAPTION_FONT, _CAPTION_SCALE, (0, 0, 0), 1, cv2.LINE_AA)
    return sheet


def slide_overview(thumbnail: np.ndarray, tissue: np.ndarray, boxes_xywh: np.ndarray, scale: float) -> np.ndarray:
    """A slide thumbnail with the tissue outline (green) and sampled regions (blue boxes).

    Args:
        thumbnail: RGB image of the whole slide, same shape as ``tissue``.
        tissue: Boolean tissue mask.
        boxes_xywh: Level-0 rectangles ``(n, 4)`` as ``x, y, w, h``.
        scale: Level-0 pixels per thumbnail pixel.

    Returns:
        The picture, RGB ``uint8``.
    """
    picture = np.ascontiguousarray(thumbnail.copy())
    contours, _ = cv2.findContours(tissue.astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
    thickness = max(1, round(max(picture.shape[:2]) / 600))
    cv2.drawContours(picture, contours, -1, (0, 170, 0), thickness)
    for x, y, w, h in np.asarray(boxes_xywh, np.float64).reshape(-1, 4) / scale:
        cv2.rectangle(picture, (round(x), round(y)), (round(x + w), round(y + h)), (30, 60, 230), thickness)
    return picture


_COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def line_plot(
    x: np.ndarray,
    series: dict[str, np.ndarray],
    *,
    title: str = "",
    xlabel: str = "",
    log_y: bool = False,
    size: tuple[int, int] = (480, 800),
) -> np.ndarray:
    """A simple line chart (RGB ``uint8``, ``size`` = (height, width)) with a legend and min/max tick labels.

    Non-finite and, with ``log_y``, non-positive values are skipped.
    """
    h, w = size
    image = np.full((h, w, 3), 255, np.uint8)
    left, right, top, bottom = 70, 20, 30, 40
    x = np.asarray(x, np.float64)
    values = {k: np.asarray(v, np.float64) for k, v in series.items()}
    ok = {k: np.isfinite(v) & np.isfinite(x) & ((v > 0) if log_y else True) for k, v in values.items()}
    ys = np.concatenate([v[ok[k]] for k, v in values.items()]) if values else np.zeros(0)
    cv2.putText(image, title, (left, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.55, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.rectangle(image, (left, top), (w - right, h - bottom), (0, 0, 0), 1)
    if ys.size == 0 or x.size == 0:
        return image
    fy = np.log10 if log_y else (lambda v: v)
    y_lo, y_hi = float(fy(ys.min())), float(fy(ys.max()))
    y_hi = y_hi if y_hi > y_lo else y_lo + 1.0
    x_lo, x_hi = float(np.nanmin(x)), float(np.nanmax(x))
    x_hi = x_hi if x_hi > x_lo else x_lo + 1.0

    def to_px(xv: np.ndarray, yv: np.ndarray) -> np.ndarray:
        px = left + (xv - x_lo) / (x_hi - x_lo) * (w - left - right)
        py = h - bottom - (fy(yv) - y_lo) / (y_hi - y_lo) * (h - top - bottom)
        return np.stack([px, py], axis=1).round().astype(np.int32)

    for i, (name, v) in enumerate(values.items()):
        colour = _COLOURS[i % len(_COLOURS)]
        pts = to_px(x[ok[name]], v[ok[name]])
        if len(pts) > 1:
            cv2.polylines(image, [pts], False, colour, 1, cv2.LINE_AA)
        elif len(pts) == 1:
            cv2.circle(image, tuple(int(c) for c in pts[0]), 2, colour, -1)
        cv2.putText(
            image, name, (w - right - 200, top + 18 + 16 * i), cv2.FONT_HERSHEY_PLAIN, 1.0, colour, 1, cv2.LINE_AA
        )
    font, grey = cv2.FONT_HERSHEY_PLAIN, (60, 60, 60)
    lo_text = f"{10**y_lo if log_y else y_lo:.3g}"
    hi_text = f"{10**y_hi if log_y else y_hi:.3g}"
    cv2.putText(image, hi_text, (4, top + 10), font, 0.9, grey, 1, cv2.LINE_AA)
    cv2.putText(image, lo_text, (4, h - bottom), font, 0.9, grey, 1, cv2.LINE_AA)
    cv2.putText(image, f"{x_lo:.4g}", (left, h - bottom + 16), font, 0.9, grey, 1, cv2.LINE_AA)
    cv2.putText(image, f"{x_hi:.4g}", (w - right - 50, h - bottom + 16), font, 0.9, grey, 1, cv2.LINE_AA)
    cv2.putText(
        image, xlabel + (" (log y)" if log_y else ""), (w // 2 - 40, h - 8), font, 1.0, (0, 0, 0), 1, cv2.LINE_AA
    )
    return image


def heatmap_over(thumbnail: np.ndarray, grid: np.ndarray, *, label: str = "", alpha: float = 0.55) -> np.ndarray:
    """A grid of values (NaN: no value) as a colour map blended over a thumbnail, with a scale bar (RGB ``uint8``).

    The grid is stretched over the whole thumbnail (cell edges kept sharp); colours run from 0 to the grid's 99th
    percentile (OpenCV's "inferno" map); cells without a value show the thumbnail alone. A strip below the picture
    gives the scale and ``label``.
    """
    if thumbnail.shape[1] < 256:  # a small image's thumbnail is a few pixels: enlarged, so the scale fits
        factor = math.ceil(256 / thumbnail.shape[1])
        thumbnail = cv2.resize(thumbnail, None, fx=factor, fy=factor, interpolation=cv2.INTER_NEAREST)
    h, w = thumbnail.shape[:2]
    values = np.asarray(grid, np.float64)
    finite = np.isfinite(values)
    top = float(np.percentile(values[finite], 99)) if finite.any() else 0.0
    top = top if top > 0 else 1.0
    scaled = np.where(finite, np.clip(values / top, 0, 1) * 255, 0).astype(np.uint8)
    colours = cv2.cvtColor(cv2.applyColorMap(scaled, cv2.COLORMAP_INFERNO), cv2.COLOR_BGR2RGB)
    colours = cv2.resize(colours, (w, h), interpolation=cv2.INTER_NEAREST)
    mask = cv2.resize(finite.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST).astype(bool)
    out = thumbnail.copy()
    out[mask] = (alpha * colours[mask] + (1 - alpha) * thumbnail[mask]).round().astype(np.uint8)
    strip = np.full((28, w, 3), 255, np.uint8)
    bar_w = max(10, min(200, w // 3))
    ramp = cv2.applyColorMap(np.linspace(0, 255, bar_w).astype(np.uint8)[None, :].repeat(10, 0), cv2.COLORMAP_INFERNO)
    strip[4:14, 4 : 4 + bar_w] = cv2.cvtColor(ramp, cv2.COLOR_BGR2RGB)
    text = fit_caption(f"0 - {top:.0f} {label}".replace("²", "2").replace("µ", "u"), max(10, w - bar_w - 12))
    cv2.putText(strip, text, (bar_w + 8, 14), _CAPTION_FONT, _CAPTION_SCALE, (0, 0, 0), 1, cv2.LINE_AA)
    return np.vstack([out, strip])

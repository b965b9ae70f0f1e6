"""Pictures for people: contact sheets of patches and slide overviews with what was taken where."""

from __future__ import annotations

import math
from collections.abc import Sequence

import cv2
import numpy as np


def contact_sheet(
    images: Sequence[np.ndarray], captions: Sequence[str] | None = None, *, cell: int = 160, columns: int = 8
) -> np.ndarray:
    """Lay RGB images out on a grid, each shrunk to ``cell`` px, with an optional caption under each.

    Args:
        images: RGB ``uint8`` images of any size.
        captions: One short text per image.
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
            text = captions[i][: max(4, cell // 7)]
            cv2.putText(sheet, text, (left, top + cell + 12), cv2.FONT_HERSHEY_PLAIN, 0.8, (0, 0, 0), 1, cv2.LINE_AA)
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

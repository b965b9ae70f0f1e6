"""A straightforward NumPy + OpenCV whole-patch synthesis: the baseline ``pysynth.bench.synthesis`` times.

It does per patch what a direct implementation of the published recipe does (the original code re-did all of it
for every patch): crop a real patch, colour-deconvolve it, find its nuclei by Otsu on hematoxylin, inpaint them
away (OpenCV Telea) for a nucleus-free background, draw random polygons one by one with an overlap check, texture
them from the eosin channel with noise, blur the mask and blend. It is a benchmark baseline, not library code: no
tile-level preparation is reused between patches, and every step is the plain library call.
"""

from __future__ import annotations

import cv2
import numpy as np

#: Ruifrok & Johnston stain matrix as in ``skimage.color`` (rows: hematoxylin, eosin, DAB optical density).
_RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
_HED_FROM_RGB = np.linalg.inv(_RGB_FROM_HED)
_LOG_ADJUST = np.log(1e-6)
_DILATE = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5))
_MAX_OVERLAP = 0.15
_TRIES = 4


def rgb2hed(rgb: np.ndarray) -> np.ndarray:
    """Colour deconvolution as ``skimage.color.rgb2hed`` does it, in NumPy: float64 ``(h, w, 3)`` H, E, D."""
    od = np.log(np.maximum(rgb / 255.0, 1e-6)) / _LOG_ADJUST
    return np.maximum(od @ _HED_FROM_RGB, 0.0)


def _star_polygon(rng: np.random.Generator, cx: float, cy: float, radius: float) -> np.ndarray:
    """A random star-shaped polygon (10–17 vertices, irregular angles, spiky radii), ``(n, 2)`` float."""
    n = int(rng.integers(10, 18))
    steps = rng.uniform(0.0, 2.0 * 2.0 * np.pi / n, n)
    angles = np.cumsum(steps * (2.0 * np.pi / steps.sum())) + rng.uniform(0.0, 2.0 * np.pi)
    radii = np.clip(rng.normal(radius, rng.uniform(0.04, 0.24) * radius, n), 0.0, 2.0 * radius)
    return np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], axis=1)


def _draw_polygons(rng: np.random.Generator, size: int, count: int) -> np.ndarray:
    """Up to ``count`` polygons drawn one by one with ``cv2.fillPoly``, each overlapping earlier ones ≤ 15%.

    Each polygon is drawn into a canvas of its bounding box; its overlap with the mask drawn so far is counted
    there, and it is kept or redrawn elsewhere (up to ``_TRIES`` times).

    Returns:
        Instance labels ``int32`` ``(size, size)``, 0 background.
    """
    labels = np.zeros((size, size), np.int32)
    scale = rng.uniform(0.7, 2.0)
    accepted = 0
    for _ in range(count):
        for _ in range(_TRIES):
            cx, cy = rng.uniform(0, size, 2)
            pts = np.round(_star_polygon(rng, cx, cy, rng.uniform(8.5, 13.0) * scale)).astype(np.int32)
            x0, y0 = np.maximum(pts.min(axis=0), 0)
            x1, y1 = np.minimum(pts.max(axis=0) + 1, size)
            if x1 <= x0 or y1 <= y0:
                continue
            canvas = np.zeros((y1 - y0, x1 - x0), np.uint8)
            cv2.fillPoly(canvas, [pts - np.array([x0, y0], np.int32)], 1)
            area = int(canvas.sum())
            if area == 0:
                continue
            inside = canvas > 0
            window = labels[y0:y1, x0:x1]
            if np.count_nonzero(window[inside]) > _MAX_OVERLAP * area:
                continue
            accepted += 1
            window[inside] = accepted
            break
    return labels


def baseline_patch(real_rgb: np.ndarray, rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic patch made from scratch out of a real tile, the direct way.

    Args:
        real_rgb: Real tissue, RGB ``uint8`` ``(h, w, 3)``, at least ``size`` on each side.
        rng: Random stream of this patch.
        size: Patch side in px.

    Returns:
        ``(image, labels)``: RGB ``uint8`` ``(size, size, 3)`` and instance labels ``int32`` ``(size, size)``.
    """
    h, w = real_rgb.shape[:2]
    x, y = int(rng.integers(0, w - size + 1)), int(rng.integers(0, h - size + 1))
    patch = np.ascontiguousarray(real_rgb[y : y + size, x : x + size])

    # Nucleus-free background: Otsu on hematoxylin, dilate, inpaint.
    hed = rgb2hed(patch)
    hema = hed[..., 0]
    lo, hi = np.percentile(hema, [1.0, 99.5])
    hema8 = np.clip((hema - lo) * (255.0 / (hi - lo + 1e-9)), 0, 255).astype(np.uint8)
    _, nuclei = cv2.threshold(hema8, 0, 1, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    nuclei = cv2.dilate(nuclei, _DILATE)
    background = cv2.inpaint(patch, nuclei, 3, cv2.INPAINT_TELEA)

    # Random polygon nuclei: about N(50, 40) per 400 × 400 px.
    count = int(max(0.0, rng.normal(50.0, 40.0)) * (size / 400.0) ** 2 + 0.5)
    labels = _draw_polygons(rng, size, count)

    # Nuclear texture from the eosin channel with noise; nuclei darken the background along hematoxylin.
    eosin = hed[..., 1]
    texture = (eosin - eosin.mean()) / (eosin.std() + 1e-6) + rng.normal(0.0, 0.5, eosin.shape)
    density = rng.uniform(0.8, 1.6) * np.clip(1.0 + 0.25 * texture, 0.2, 2.0)
    stain = _RGB_FROM_HED[0] / np.linalg.norm(_RGB_FROM_HED[0])
    nuclear = background * np.exp(-density[..., None] * stain)

    # Soft mask and blend A·M + B·(1 − M).
    mask = cv2.GaussianBlur((labels > 0).astype(np.float32), (0, 0), rng.uniform(0.5, 1.5))[..., None]
    image = nuclear * mask + background * (1.0 - mask)
    return np.clip(image + 0.5, 0, 255).astype(np.uint8), labels

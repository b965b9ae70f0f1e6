"""Low-resolution tissue masks and the tissue fraction of any region of a slide."""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from pysynth.io.base import SlideReader, read_thumbnail

#: Finest and coarsest mask resolution (µm/px), and the longest mask side aimed for in between.
MASK_MPP_RANGE = (1.0, 32.0)
MASK_MAX_SIDE = 4096

#: Summed optical density (RGB, natural log) of glass is about 0.1-0.15; of pale tissue 0.3 and up.
OD_THRESHOLD_RANGE = (0.2, 0.5)


def _disk(radius_px: float) -> np.ndarray:
    r = max(1, round(radius_px))
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))


def drop_small_objects(mask: np.ndarray, min_area_px: float) -> np.ndarray:
    """The 8-connected parts of a boolean mask with at least ``min_area_px`` pixels."""
    _count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    keep = stats[:, cv2.CC_STAT_AREA] >= min_area_px
    keep[0] = False
    return keep[labels]


def tissue_mask_from_rgb(
    rgb: np.ndarray,
    mpp: float,
    *,
    smooth_um: float = 2.0,
    close_um: float = 6.0,
    min_object_um2: float = 2000.0,
    max_hole_um2: float = 2000.0,
) -> np.ndarray:
    """Tissue pixels of a low-resolution RGB image of H&E.

    Summed optical density separates stained tissue from glass whatever the stain's hue: Otsu's threshold on it,
    clamped to :data:`OD_THRESHOLD_RANGE` so that an image that is all tissue (or all glass) is not split in two
    at an arbitrary level; then a closing, small holes filled and small specks (dust, debris) removed.

    Args:
        rgb: RGB ``uint8`` image ``(h, w, 3)``.
        mpp: Its resolution, µm per pixel (sizes below are physical).
        smooth_um: Gaussian smoothing before thresholding (sigma, µm).
        close_um: Radius of the morphological closing (µm).
        min_object_um2: Tissue pieces smaller than this are dropped (µm²).
        max_hole_um2: Holes smaller than this are filled (µm²).

    Returns:
        Boolean mask ``(h, w)``.
    """
    sigma = smooth_um / mpp
    image = cv2.GaussianBlur(rgb, (0, 0), sigma) if sigma > 0.3 else rgb
    od = -np.log((image.astype(np.float32) + 1.0) / 256.0).sum(axis=2)
    od_u8 = np.clip(od * (255.0 / 3.0), 0, 255).astype(np.uint8)  # OD 0..3 on 0..255 for Otsu
    otsu, _ = cv2.threshold(od_u8, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    lo, hi = OD_THRESHOLD_RANGE
    threshold = float(np.clip(otsu * 3.0 / 255.0, lo, hi))
    mask = (od > threshold).astype(np.uint8)
    if close_um / mpp >= 1:
        mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, _disk(close_um / mpp))
    px_area = mpp * mpp
    holes = drop_small_objects(mask == 0, max_hole_um2 / px_area + 1)
    # Background that touches the border is never a hole, whatever its size.
    return drop_small_objects(~holes, min_object_um2 / px_area)


@dataclass(frozen=True)
class TissueMask:
    """A boolean tissue mask over a slide's full level-0 extent, and region queries on it.

    Attributes:
        mask: Boolean array ``(h, w)``; pixel ``(i, j)`` covers level-0 ``[j·scale, (j+1)·scale)`` (rows alike).
        scale: Level-0 pixels per mask pixel.
        mpp: Mask resolution in µm/px.
    """

    mask: np.ndarray
    scale: float
    mpp: float

    def __post_init__(self) -> None:
        if self.mask.ndim != 2 or self.mask.dtype != np.bool_:
            raise ValueError(f"mask must be a 2-D bool array, got {self.mask.dtype} {self.mask.shape}")
        if not self.scale > 0:
            raise ValueError(f"scale must be positive, got {self.scale}")
        integral = cv2.integral(self.mask.astype(np.uint8), sdepth=cv2.CV_64F)
        object.__setattr__(self, "_integral", integral)

    @property
    def fraction(self) -> float:
        """Tissue fraction of the whole slide."""
        return float(self.mask.mean())

    def area_um2(self) -> float:
        """Tissue area in µm²."""
        return float(self.mask.sum()) * self.mpp * self.mpp

    def _integral_at(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        # The integral of a piecewise-constant image is bilinear inside each pixel, so bilinear interpolation of
        # the summed-area table at fractional corners gives the exact covered area.
        table = self._integral
        h, w = self.mask.shape
        x = np.clip(x, 0.0, w)
        y = np.clip(y, 0.0, h)
        x0 = np.minimum(np.floor(x).astype(np.int64), w - 1)
        y0 = np.minimum(np.floor(y).astype(np.int64), h - 1)
        fx, fy = x - x0, y - y0
        return (
            table[y0, x0] * (1 - fx) * (1 - fy)
            + table[y0, x0 + 1] * fx * (1 - fy)
            + table[y0 + 1, x0] * (1 - fx) * fy
            + table[y0 + 1, x0 + 1] * fx * fy
        )

    def region_fraction(self, x: np.ndarray | float, y: np.ndarray | float, w: float, h: float) -> np.ndarray:
        """Tissue fraction of level-0 rectangles (vectorised over ``x`` and ``y``).

        Parts of a rectangle outside the slide count as background.

        Args:
            x: Left edges, level-0 pixels.
            y: Top edges, level-0 pixels.
            w: Width, level-0 pixels (> 0).
            h: Height, level-0 pixels (> 0).

        Returns:
            Fractions in ``[0, 1]``, shaped like ``x`` and ``y`` broadcast.
        """
        s = self.scale
        x0, y0 = np.asarray(x, np.float64) / s, np.asarray(y, np.float64) / s
        x1, y1 = x0 + w / s, y0 + h / s
        covered = (
            self._integral_at(x1, y1)
            - self._integral_at(x0, y1)
            - self._integral_at(x1, y0)
            + self._integral_at(x0, y0)
        )
        return np.clip(covered / ((w / s) * (h / s)), 0.0, 1.0)


def mask_mpp_for(reader: SlideReader) -> float:
    """The mask resolution for a slide: about :data:`MASK_MAX_SIDE` px on the long side, within the range."""
    h0, w0 = reader.level_shapes_hw[0]
    lo, hi = MASK_MPP_RANGE
    return float(np.clip(max(h0, w0) * reader.mpp / MASK_MAX_SIDE, max(lo, reader.mpp), hi))


def compute_tissue_mask(reader: SlideReader, mpp: float | None = None) -> TissueMask:
    """Tissue mask of a whole slide, from a thumbnail read in bounded memory.

    Args:
        reader: The slide.
        mpp: Mask resolution in µm/px (default: :func:`mask_mpp_for`).

    Returns:
        The :class:`TissueMask`.
    """
    mpp = mask_mpp_for(reader) if mpp is None else float(mpp)
    thumbnail = read_thumbnail(reader, mpp)
    mask = tissue_mask_from_rgb(thumbnail, mpp)
    h0, w0 = reader.level_shapes_hw[0]
    # The thumbnail's size is rounded; use the exact level-0 pixels per mask pixel along the longer side.
    scale = max(h0 / mask.shape[0], w0 / mask.shape[1])
    return TissueMask(mask, scale, mpp)

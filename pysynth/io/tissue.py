"""Low-resolution tissue masks and the tissue fraction of any region of a slide."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import cv2
import numpy as np

from pysynth.io.base import SlideReader, read_thumbnail

#: Finest and coarsest mask resolution (µm/px), and the longest mask side aimed for in between.
MASK_MPP_RANGE = (1.0, 32.0)
MASK_MAX_SIDE = 4096

#: Summed optical density (RGB, natural log) of glass is about 0.1-0.15; of pale tissue 0.3 and up.
OD_THRESHOLD_RANGE = (0.2, 0.5)

#: A mask pixel whose every channel is below this (0-255) is near-black: scanner padding, out-of-slide areas, black
#: ink, never stained tissue. In the (smoothed, ≥ 1 µm/px) mask image the darkest tissue of the bundled slide, the
#: 30 MoNuSeg tiles and BRCA-M2C has a brightest channel of 38 or more; hematoxylin is dark blue, not black.
NEAR_BLACK_MAX = 25

#: Median chroma (max - min channel, 0-255) of tissue pixels below which an image is taken as greyscale. Real H&E
#: tissue has 28 or more (bundled slide, MoNuSeg, BRCA-M2C); R = G = B has 0.
GREYSCALE_MAX_CHROMA = 8.0
#: The warning logged for such a source (``%`` with its name).
GREYSCALE_WARNING = "%s: looks greyscale, not H&E-stained; results will be unreliable"

log = logging.getLogger("pysynth")


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
    at an arbitrary level; then a closing, small holes filled and small specks (dust, debris) removed. Near-black
    pixels (all channels below :data:`NEAR_BLACK_MAX` after smoothing) are never tissue, nor part of Otsu's
    histogram: black padding or ink has the highest density of all but holds no stained tissue.

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
    black = image.max(axis=2) < NEAR_BLACK_MAX
    if black.all():
        return np.zeros(rgb.shape[:2], bool)
    otsu, _ = cv2.threshold(od_u8[~black].reshape(-1, 1), 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    lo, hi = OD_THRESHOLD_RANGE
    threshold = float(np.clip(otsu * 3.0 / 255.0, lo, hi))
    mask = ((od > threshold) & ~black).astype(np.uint8)
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
        greyscale: Whether the tissue has no colour (:func:`looks_greyscale`): not H&E, results unreliable (for
            callers that report per source, e.g. from worker processes whose log is not shown).
    """

    mask: np.ndarray
    scale: float
    mpp: float
    greyscale: bool = False

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


#: Sources already warned about as greyscale in this process.
_WARNED_GREYSCALE: set[str] = set()


def mask_mpp_for(reader: SlideReader) -> float:
    """The mask resolution for a slide: about :data:`MASK_MAX_SIDE` px on the long side, within the range."""
    h0, w0 = reader.level_shapes_hw[0]
    lo, hi = MASK_MPP_RANGE
    return float(np.clip(max(h0, w0) * reader.mpp / MASK_MAX_SIDE, max(lo, reader.mpp), hi))


def looks_greyscale(rgb: np.ndarray, mask: np.ndarray | None = None) -> bool:
    """Whether an RGB image's tissue has (almost) no colour, unlike H&E: median chroma below the threshold.

    Args:
        rgb: RGB ``uint8`` image ``(h, w, 3)``, e.g. a tissue-mask thumbnail.
        mask: Its tissue pixels (default: all). With no tissue there is nothing to judge: False.

    Returns:
        True when the median of ``max - min`` channel over the pixels is below :data:`GREYSCALE_MAX_CHROMA`.
    """
    pixels = rgb.reshape(-1, rgb.shape[-1]) if mask is None else rgb[mask]
    if len(pixels) == 0:
        return False
    chroma = pixels.max(axis=-1).astype(np.int16) - pixels.min(axis=-1)
    return bool(np.median(chroma) < GREYSCALE_MAX_CHROMA)


def warn_if_greyscale(name: str, rgb: np.ndarray, mask: np.ndarray | None = None) -> bool:
    """Log a warning (logger ``pysynth``) when :func:`looks_greyscale`; returns whether it did."""
    if not looks_greyscale(rgb, mask):
        return False
    log.warning(GREYSCALE_WARNING, name)
    return True


def compute_tissue_mask(reader: SlideReader, mpp: float | None = None) -> TissueMask:
    """Tissue mask of a whole slide, from a thumbnail read in bounded memory.

    A slide whose tissue has no colour (:func:`looks_greyscale`) is logged as a warning, once per process.

    Args:
        reader: The slide.
        mpp: Mask resolution in µm/px (default: :func:`mask_mpp_for`).

    Returns:
        The :class:`TissueMask`.
    """
    mpp = mask_mpp_for(reader) if mpp is None else float(mpp)
    thumbnail = read_thumbnail(reader, mpp)
    mask = tissue_mask_from_rgb(thumbnail, mpp)
    greyscale = looks_greyscale(thumbnail, mask)
    if greyscale and reader.name not in _WARNED_GREYSCALE:  # sample --preview, for one, masks each source twice
        _WARNED_GREYSCALE.add(reader.name)
        log.warning(GREYSCALE_WARNING, reader.name)
    h0, w0 = reader.level_shapes_hw[0]
    # The thumbnail's size is rounded; use the exact level-0 pixels per mask pixel along the longer side.
    scale = max(h0 / mask.shape[0], w0 / mask.shape[1])
    return TissueMask(mask, scale, mpp, greyscale)

"""Per-tile preparation of real tissue for synthesis, done once per source tile and reused for every patch.

A real tile becomes: a nucleus-free background (its nuclei found by a generous "super-segmentation" of the
hematoxylin channel and inpainted away), the tile's own nuclear stain colour, the densities of its real nuclei
(pale to dark), an eosin texture for chromatin, its tissue mask, and its nuclear density and size, to which the
count and size of synthetic nuclei adapt.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import cv2
import numpy as np

from pysynth.io.tissue import drop_small_objects
from pysynth.synth.config import SynthConfig

if TYPE_CHECKING:
    from pysynth.synth.guide import GuideMaps, NucleusBank

#: Ruifrok & Johnston stain vectors (optical density of hematoxylin, eosin, DAB), as in skimage.color.
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=np.float64)
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)

#: Natural-log optical density per 8-bit level: OD = -ln((I + 1) / 256).
OD_LUT = (-np.log((np.arange(256, dtype=np.float64) + 1.0) / 256.0)).astype(np.float32)


def optical_density(rgb: np.ndarray) -> np.ndarray:
    """Per-channel optical density ``-ln((I + 1) / 256)`` of an RGB ``uint8`` image, float32 ``(h, w, 3)``."""
    return OD_LUT[rgb]


def _otsu(values: np.ndarray, lo: float, hi: float) -> float:
    scaled = np.clip((values - lo) / (hi - lo) * 255.0, 0, 255).astype(np.uint8)
    t, _ = cv2.threshold(scaled.reshape(-1, 1), 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    return lo + t / 255.0 * (hi - lo)


@dataclass
class SourceTile:
    """A real tile prepared for synthesis (all arrays at the synthesis resolution).

    Attributes:
        name: Where it came from.
        rgb: The real tile, RGB ``uint8`` ``(h, w, 3)`` (references are crops of it).
        background: The tile with its nuclei inpainted away, RGB ``uint8``.
        tissue: Where nuclei may be placed, bool ``(h, w)``.
        super_mask: The super-segmentation that was inpainted, bool ``(h, w)`` (None once saved and reloaded).
        stain: Unit optical-density colour of this tile's nuclei, float32 ``(3,)``.
        darkness: Optical density of the tile's real nuclei along ``stain``, float32 ``(k,)``, pale to dark.
        texture: Zero-mean, unit-sd high-pass eosin texture, float32 ``(h, w)``.
        density: Otsu nuclear foreground fraction of the tile's tissue.
        median_area: Median area of its nuclear components in px (0 if none were found).
        darkness_min: No labelled synthetic nucleus of this tile is painted fainter than this (optical density
            along ``stain``; from ``SynthConfig.darkness_floor``, 0 when off).
        bank: Real nuclei of the tile for transplanting (a guide's confident ones), or None.
    """

    name: str
    rgb: np.ndarray
    background: np.ndarray
    tissue: np.ndarray
    super_mask: np.ndarray | None
    stain: np.ndarray
    darkness: np.ndarray
    texture: np.ndarray
    density: float
    median_area: float
    darkness_min: float = 0.0
    bank: NucleusBank | None = None


def segment_nuclear_material(
    rgb: np.ndarray, config: SynthConfig
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float, np.ndarray]:
    """Otsu, super- and sub-segmentation of the hematoxylin channel.

    The super-segmentation must contain all nuclear material, pale nuclei included: Otsu's foreground with its
    threshold moved so it is ``super_percentile_shift`` larger, united with pixels clearly darker in hematoxylin
    than their 8 µm surroundings, then dilated.

    Args:
        rgb: Real tile, RGB ``uint8``.
        config: Synthesis parameters.

    Returns:
        ``(otsu_fg, super_mask, sub_mask, density, hematoxylin)``.
    """
    od = optical_density(rgb)
    hema = cv2.GaussianBlur((od @ HED_FROM_RGB[:, 0].astype(np.float32)), (0, 0), 1.0)
    tissue_px = od.sum(axis=2) > 0.25
    values = hema[tissue_px] if tissue_px.any() else hema.ravel()
    lo, hi = float(np.percentile(values, 0.5)), float(np.percentile(values, 99.9)) + 1e-3
    threshold = _otsu(values, lo, hi)
    otsu_fg = (hema > threshold) & tissue_px
    density = float(otsu_fg.sum() / max(1, tissue_px.sum()))
    grown = min(0.95, density * (1.0 + config.super_percentile_shift))
    super_threshold = float(np.percentile(values, 100.0 * (1.0 - grown))) if density > 0 else threshold
    sigma_local = 8.0 / config.mpp / 2.0
    local = hema - cv2.GaussianBlur(hema, (0, 0), sigma_local)
    super_mask = ((hema > min(super_threshold, threshold)) | (local > config.local_contrast)) & tissue_px
    super_mask = cv2.morphologyEx(super_mask.astype(np.uint8), cv2.MORPH_OPEN, np.ones((2, 2), np.uint8))
    super_mask = drop_small_objects(super_mask > 0, 12)
    if config.super_dilate:
        k = 2 * config.super_dilate + 1
        disk = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))
        super_mask = cv2.dilate(super_mask.astype(np.uint8), disk).astype(bool)
    shrunk = max(1e-4, density * (1.0 - config.super_percentile_shift))
    sub_threshold = float(np.percentile(values, 100.0 * (1.0 - shrunk)))
    top = float(np.percentile(values, 99.0))
    sub_mask = (hema > max(sub_threshold, threshold)) & (hema < top) & tissue_px
    return otsu_fg, super_mask, sub_mask, density, hema


def prepare_source(
    rgb: np.ndarray, config: SynthConfig, name: str = "<array>", guide: GuideMaps | None = None
) -> SourceTile:
    """Prepare a real tile (already at ``config.mpp``) for synthesis.

    Args:
        rgb: RGB ``uint8`` ``(h, w, 3)``, at least ``config.size`` on each side.
        config: Synthesis parameters.
        name: Where the tile came from, for messages.
        guide: A guide model's view of the tile (:func:`pysynth.synth.guide.guide_maps`); then its nuclei, not
            the hematoxylin super-segmentation, are inpainted, and its sure nuclei give the real densities and
            the transplant bank.

    Returns:
        The :class:`SourceTile`.

    Raises:
        ValueError: If the tile is smaller than a patch or not RGB ``uint8``.
    """
    from pysynth.io import tissue_mask_from_rgb

    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"{name}: a source tile must be RGB uint8 (h, w, 3), got {rgb.dtype} {rgb.shape}")
    if min(rgb.shape[:2]) < config.synth_size:
        raise ValueError(
            f"{name}: tile {rgb.shape[1]}×{rgb.shape[0]} px is smaller than a {config.synth_size} px patch"
        )
    if guide is not None and guide.labels.shape != rgb.shape[:2]:
        raise ValueError(f"{name}: guide maps {guide.labels.shape} do not fit the tile {rgb.shape[:2]}")
    rgb = np.ascontiguousarray(rgb)
    otsu_fg, super_mask, sub_mask, density, _ = segment_nuclear_material(rgb, config)
    sure = None
    if guide is not None:
        sure_ids = guide.confidence >= config.guide_confident
        sure_ids[0] = False
        sure = sure_ids[guide.labels]
        # The guide's nuclei, and whatever is darker than Otsu's threshold: a dark nucleus the guide missed (a thin
        # spindle, say) must not stay in a background as a "not a nucleus" lesson; pale purple it does not call
        # a nucleus stays.
        nuclear = (guide.segmentation > config.guide_threshold) | (guide.labels > 0) | otsu_fg
        if config.guide_dilate:
            k = 2 * config.guide_dilate + 1
            disk = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))
            nuclear = cv2.dilate(nuclear.astype(np.uint8), disk).astype(bool)
        super_mask = nuclear
        core = cv2.erode(sure.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
        if core.sum() > 50:
            sub_mask = core
    background = inpaint_background(rgb, super_mask)
    od = optical_density(rgb)
    od_bg = optical_density(background)
    stain = np.array([0.65, 0.70, 0.29], np.float32)  # hematoxylin's textbook colour when nothing better is known
    if sub_mask.sum() > 50:
        diff = (od[sub_mask] - od_bg[sub_mask]).mean(axis=0)
        if np.all(np.isfinite(diff)) and diff.sum() > 0.05:
            stain = np.clip(diff, 0.02, None).astype(np.float32)
    stain = stain / np.linalg.norm(stain)
    along = (od - od_bg) @ stain
    if guide is not None and sure is not None and sure.any():
        real = _component_means(np.where(sure, guide.labels, 0), along, min_area=30)
        darkness = real
    else:
        darkness = _component_means(_components(super_mask), along, min_area=30)
        real = _component_means(_components(otsu_fg), along, min_area=30)
    darkness = darkness[darkness > 0.05].astype(np.float32)
    darkness_min = 0.0
    real = real[real > 0.05]
    if config.darkness_floor > 0 and real.size >= 5:
        darkness_min = float(np.quantile(real, config.darkness_floor))
        kept = darkness[darkness >= darkness_min]
        darkness = kept if kept.size >= 5 else np.maximum(darkness, darkness_min)
    if darkness.size < 5:
        darkness = np.array([0.5, 0.7, 0.9, 1.1, 1.3], np.float32)
    _, _, fg_stats, _ = cv2.connectedComponentsWithStats(otsu_fg.astype(np.uint8), connectivity=8)
    fg_areas = fg_stats[1:, cv2.CC_STAT_AREA]
    fg_areas = fg_areas[fg_areas >= 30]
    median_area = float(np.median(fg_areas)) if fg_areas.size else 0.0
    eosin = od @ HED_FROM_RGB[:, 1].astype(np.float32)
    high = eosin - cv2.GaussianBlur(eosin, (0, 0), 4.0)
    texture = (high / (high.std() + 1e-6)).astype(np.float32)
    tissue = tissue_mask_from_rgb(rgb, config.mpp, min_object_um2=200.0, max_hole_um2=200.0)
    bank = None
    if guide is not None and config.transplant_fraction > 0:
        from pysynth.synth.guide import nucleus_bank

        codes = None
        if config.transplant_classes:
            from pysynth.synth.lymphocytes import real_nucleus_classes

            codes = real_nucleus_classes(guide.labels, along, sure_ids, config)
        bank = nucleus_bank(od, od_bg, guide, confident=config.guide_confident, classes=codes)
    return SourceTile(
        name=name,
        rgb=rgb,
        background=background,
        tissue=tissue,
        super_mask=super_mask,
        stain=stain,
        darkness=np.sort(darkness).astype(np.float32),
        texture=texture,
        density=density,
        median_area=median_area,
        darkness_min=darkness_min,
        bank=bank,
    )


def _components(mask: np.ndarray) -> np.ndarray:
    _, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
    return labels


def _component_means(labels: np.ndarray, values: np.ndarray, *, min_area: int) -> np.ndarray:
    """Mean of ``values`` over each labelled component of at least ``min_area`` px (float64, label order)."""
    n = int(labels.max()) if labels.size else 0
    areas = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    sums = np.bincount(labels.ravel(), weights=values.ravel(), minlength=n + 1)[1:]
    return (sums / np.maximum(areas, 1))[areas >= min_area]


def inpaint_background(rgb: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Fill ``mask`` with surrounding tissue texture (push-pull with transplanted detail; no Telea streaks)."""
    from pysynth.synth.inpaint import inpaint

    if mask.all():
        return rgb.copy()
    return inpaint(rgb, mask, seed=0)

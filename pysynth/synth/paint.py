"""Painting nuclei into a background by Beer–Lambert optics in one pass (C++ kernel + NumPy twin).

Per pixel, with ``l`` the (slightly dilated) nucleus label and optical densities ``OD = -ln((I + 1) / 256)``::

    d   = darkness[l] · gain · (1 + contrast · (0.6 · texture + 0.4 · speckle))
    d  *= clear_factor   on interior pixels (region 2) of clear-chromatin nuclei where thin < thin_threshold
    d  *= rim_gain       on rim pixels (region 1)
    OD  = (OD(background) + extra · stain + alpha · max(d, 0) · stain · nuclear_jitter) · global_jitter
    out = 8-bit level of exp(-OD), OD quantised to 1/512

Shape:
    background: (h, w, 3) uint8; extra, alpha, texture, speckle, gain, thin: (h, w) float32;
    label_ext: (h, w) int32; region: (h, w) uint8; darkness: (n + 1,) float32; clear: (n + 1,) bool.
"""

from __future__ import annotations

import numpy as np

from pysynth import _core

OD_STEPS = 512
OD_MAX = 10
_OD = (-np.log((np.arange(256, dtype=np.float64) + 1.0) / 256.0)).astype(np.float32)
_U8 = np.clip(np.round(np.exp(-np.arange(OD_STEPS * OD_MAX + 1) / OD_STEPS) * 256.0 - 1.0), 0, 255).astype(np.uint8)


def _plane(a: np.ndarray, name: str, shape: tuple[int, int]) -> np.ndarray:
    if a.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {a.shape}")
    if a.dtype != np.float32 or a.strides[1] != 4:
        a = np.ascontiguousarray(a, dtype=np.float32)
    return a


def paint_nuclei(
    background: np.ndarray,
    label_ext: np.ndarray,
    region: np.ndarray,
    alpha: np.ndarray,
    darkness: np.ndarray,
    clear: np.ndarray,
    texture: np.ndarray,
    speckle: np.ndarray,
    gain: np.ndarray,
    thin: np.ndarray,
    *,
    stain: np.ndarray,
    contrast: float = 0.3,
    thin_threshold: float = 0.0,
    clear_factor: float = 0.35,
    rim_gain: float = 1.3,
    nuclear_jitter: np.ndarray | None = None,
    global_jitter: np.ndarray | None = None,
    extra: np.ndarray | None = None,
) -> np.ndarray:
    """Paint nuclei (see the module for the formula); texture planes may be crops of larger images.

    Returns:
        RGB ``uint8`` ``(h, w, 3)``.

    Raises:
        ValueError: If shapes disagree or a label exceeds ``len(darkness) - 1``.
    """
    background = np.ascontiguousarray(background, dtype=np.uint8)
    if background.ndim != 3 or background.shape[2] != 3:
        raise ValueError(f"background must be RGB (h, w, 3), got {background.shape}")
    shape = background.shape[:2]
    label_ext = np.ascontiguousarray(label_ext, dtype=np.int32)
    region = np.ascontiguousarray(region, dtype=np.uint8)
    alpha = np.ascontiguousarray(alpha, dtype=np.float32)
    for name, a in (("label_ext", label_ext), ("region", region), ("alpha", alpha)):
        if a.shape != shape:
            raise ValueError(f"{name} must have shape {shape}, got {a.shape}")
    darkness = np.ascontiguousarray(darkness, dtype=np.float32)
    clear = np.ascontiguousarray(clear, dtype=np.uint8)
    if darkness.shape != clear.shape or darkness.ndim != 1:
        raise ValueError(f"darkness and clear must be (n + 1,) alike, got {darkness.shape} and {clear.shape}")
    if label_ext.size and (label_ext.min() < 0 or label_ext.max() >= len(darkness)):
        raise ValueError(f"labels must lie in [0, {len(darkness) - 1}]")
    planes = [
        _plane(a, n, shape) for a, n in ((texture, "texture"), (speckle, "speckle"), (gain, "gain"), (thin, "thin"))
    ]
    ones = np.ones(3, np.float32)
    vectors = [
        np.ascontiguousarray(v if v is not None else ones, dtype=np.float32).reshape(3)
        for v in (stain, nuclear_jitter, global_jitter)
    ]
    if extra is not None:
        extra = np.ascontiguousarray(extra, dtype=np.float32)
        if extra.shape != shape:
            raise ValueError(f"extra must have shape {shape}, got {extra.shape}")
    out = np.empty(background.shape, np.uint8)
    _core.paint_nuclei(
        background,
        extra,
        label_ext,
        region,
        alpha,
        darkness,
        clear,
        *planes,
        float(thin_threshold),
        float(clear_factor),
        float(rim_gain),
        float(contrast),
        *vectors,
        out,
    )
    return out


def paint_nuclei_reference(
    background: np.ndarray,
    label_ext: np.ndarray,
    region: np.ndarray,
    alpha: np.ndarray,
    darkness: np.ndarray,
    clear: np.ndarray,
    texture: np.ndarray,
    speckle: np.ndarray,
    gain: np.ndarray,
    thin: np.ndarray,
    *,
    stain: np.ndarray,
    contrast: float = 0.3,
    thin_threshold: float = 0.0,
    clear_factor: float = 0.35,
    rim_gain: float = 1.3,
    nuclear_jitter: np.ndarray | None = None,
    global_jitter: np.ndarray | None = None,
    extra: np.ndarray | None = None,
) -> np.ndarray:
    """The specification of :func:`paint_nuclei`, in NumPy (float32 like the kernel)."""
    f32 = np.float32
    ones = np.ones(3, f32)
    stain = np.asarray(stain, f32)
    nj = np.asarray(nuclear_jitter if nuclear_jitter is not None else ones, f32)
    gj = np.asarray(global_jitter if global_jitter is not None else ones, f32)
    od = _OD[background]
    if extra is not None:
        od = od + extra[..., None].astype(f32) * stain
    d = (
        np.asarray(darkness, f32)[label_ext]
        * gain.astype(f32)
        * (f32(1) + f32(contrast) * (f32(0.6) * texture.astype(f32) + f32(0.4) * speckle.astype(f32)))
    )
    thin_here = (region == 2) & np.asarray(clear, bool)[label_ext] & (thin < f32(thin_threshold))
    d = np.where(thin_here, d * f32(clear_factor), d)
    d = np.where(region == 1, d * f32(rim_gain), d)
    paint = (label_ext > 0) & (alpha > 0)
    d = np.where(paint, np.maximum(d, f32(0)) * alpha, f32(0))
    od = od + d[..., None] * (stain * nj)
    index = np.clip(od * gj * f32(OD_STEPS) + f32(0.5), 0, OD_STEPS * OD_MAX).astype(np.int64)
    return _U8[index]

"""Painting nuclei into a background by Beer–Lambert optics in one pass (C++ kernel + NumPy twin).

Per pixel, with optical densities ``OD = -ln((I + 1) / 256)``::

    l     = labels, or where 0, grown (labels dilated: a blurred edge takes its nucleus' density)
    alpha = (sharp + mix · (soft − sharp)) / 255     (the mask blurred at two widths, mixed by a smooth field)
    d     = darkness[l] · (gain_lo + gain_span · gain) · (1 + contrast · (0.6 · texture + 0.4 · speckle))
    d    *= clear_factor   on interior pixels (region 2) of clear-chromatin nuclei where thin < thin_threshold
    d    *= rim_gain       on rim pixels (region 1)
    OD    = (OD(background) + extra · stain + alpha · max(d, 0) · stain · nuclear_jitter) · global_jitter
    out   = 8-bit level of exp(-OD), OD quantised to 1/512

Shape:
    background: (h, w, 3) uint8; labels: (h, w) int32; grown: (h, w) uint16; region, sharp, soft: (h, w) uint8;
    mix, texture, speckle, gain, thin, extra: (h, w) float32 (these planes may be crops of larger images);
    darkness: (n + 1,) float32; clear: (n + 1,) bool.
"""

from __future__ import annotations

import numpy as np

from pysynth import _core
from pysynth.synth.source import OD_LUT as _OD

OD_STEPS = 512
OD_MAX = 10
_U8 = np.clip(np.round(np.exp(-np.arange(OD_STEPS * OD_MAX + 1) / OD_STEPS) * 256.0 - 1.0), 0, 255).astype(np.uint8)
_PLANES = ("mix", "texture", "speckle", "gain", "thin")


def _plane(a: np.ndarray, name: str, shape: tuple[int, int]) -> np.ndarray:
    if a.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {a.shape}")
    if a.dtype != np.float32 or a.strides[1] != 4:
        a = np.ascontiguousarray(a, dtype=np.float32)
    return a


def paint_nuclei(
    background: np.ndarray,
    labels: np.ndarray,
    grown: np.ndarray,
    region: np.ndarray,
    sharp: np.ndarray,
    soft: np.ndarray,
    mix: np.ndarray,
    darkness: np.ndarray,
    clear: np.ndarray,
    texture: np.ndarray,
    speckle: np.ndarray,
    gain: np.ndarray,
    thin: np.ndarray,
    *,
    stain: np.ndarray,
    gain_lo: float = 0.0,
    gain_span: float = 1.0,
    contrast: float = 0.3,
    thin_threshold: float = 0.0,
    clear_factor: float = 0.35,
    rim_gain: float = 1.3,
    nuclear_jitter: np.ndarray | None = None,
    global_jitter: np.ndarray | None = None,
    extra: np.ndarray | None = None,
    check_labels: bool = True,
) -> np.ndarray:
    """Paint nuclei (see the module for the formula).

    ``check_labels=False`` skips the two passes over the label maps that prove every label indexes
    ``darkness``; only for callers that build labels and ``darkness`` together (the synthesis recipe).

    Returns:
        RGB ``uint8`` ``(h, w, 3)``.

    Raises:
        ValueError: If shapes disagree or a label exceeds ``len(darkness) - 1``.
    """
    background = np.ascontiguousarray(background, dtype=np.uint8)
    if background.ndim != 3 or background.shape[2] != 3:
        raise ValueError(f"background must be RGB (h, w, 3), got {background.shape}")
    shape = background.shape[:2]
    labels = np.ascontiguousarray(labels, dtype=np.int32)
    grown = np.ascontiguousarray(grown, dtype=np.uint16)
    region, sharp, soft = (np.ascontiguousarray(a, dtype=np.uint8) for a in (region, sharp, soft))
    for name, a in (("labels", labels), ("grown", grown), ("region", region), ("sharp", sharp), ("soft", soft)):
        if a.shape != shape:
            raise ValueError(f"{name} must have shape {shape}, got {a.shape}")
    darkness = np.ascontiguousarray(darkness, dtype=np.float32)
    clear = np.ascontiguousarray(clear, dtype=np.uint8)
    if darkness.shape != clear.shape or darkness.ndim != 1:
        raise ValueError(f"darkness and clear must be (n + 1,) alike, got {darkness.shape} and {clear.shape}")
    top = len(darkness) - 1
    if check_labels and (
        (labels.size and (labels.min() < 0 or labels.max() > top)) or (grown.size and grown.max() > top)
    ):
        raise ValueError(f"labels must lie in [0, {top}]")
    planes = [_plane(a, n, shape) for a, n in zip((mix, texture, speckle, gain, thin), _PLANES, strict=True)]
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
        labels,
        grown,
        region,
        sharp,
        soft,
        planes[0],
        darkness,
        clear,
        *planes[1:],
        float(gain_lo),
        float(gain_span),
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
    labels: np.ndarray,
    grown: np.ndarray,
    region: np.ndarray,
    sharp: np.ndarray,
    soft: np.ndarray,
    mix: np.ndarray,
    darkness: np.ndarray,
    clear: np.ndarray,
    texture: np.ndarray,
    speckle: np.ndarray,
    gain: np.ndarray,
    thin: np.ndarray,
    *,
    stain: np.ndarray,
    gain_lo: float = 0.0,
    gain_span: float = 1.0,
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
    label = np.where(labels > 0, labels, grown.astype(np.int32))
    s0 = sharp.astype(f32)
    alpha = (s0 + mix.astype(f32) * (soft.astype(f32) - s0)) * f32(1 / 255)
    d = (
        np.asarray(darkness, f32)[label]
        * (f32(gain_lo) + f32(gain_span) * gain.astype(f32))
        * (f32(1) + f32(contrast) * (f32(0.6) * texture.astype(f32) + f32(0.4) * speckle.astype(f32)))
    )
    thin_here = (region == 2) & np.asarray(clear, bool)[label] & (thin < f32(thin_threshold))
    d = np.where(thin_here, d * f32(clear_factor), d)
    d = np.where(region == 1, d * f32(rim_gain), d)
    paint = (label > 0) & (alpha > 0)
    d = np.where(paint, np.maximum(d, f32(0)) * alpha, f32(0))
    od = od + d[..., None] * (stain * nj)
    index = np.clip(od * gj * f32(OD_STEPS) + f32(0.5), 0, OD_STEPS * OD_MAX).astype(np.int64)
    return _U8[index]

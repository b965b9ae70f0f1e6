"""Compositing nuclei into background tissue with boundaries of spatially varying sharpness.

``I = A·M' + B·(1 - M')`` per channel, rounded half up to uint8, with ``M' = clip(s·G_sharp(M) + (1 -
s)·G_soft(M), 0, 1)``: the mask ``M`` blurred by a narrow and a wide Gaussian, blended per pixel by the
sharpness ``s`` in ``[0, 1]`` (1: crisp boundary, 0: soft, out-of-focus boundary). The Gaussians are OpenCV's
for float images (``cv2.GaussianBlur(M, (0, 0), sigma)``: ``2·round(4·sigma) + 1`` taps, reflect-101 borders),
so the reference below is that call twice and a NumPy blend.
"""

from __future__ import annotations

import functools

import cv2
import numpy as np

from pysynth import _core

__all__ = ["composite_nuclei", "composite_nuclei_reference", "gaussian_taps"]

#: Largest blur accepted, in pixels (a nucleus boundary is blurred by a few pixels at most).
MAX_SIGMA = 16.0


@functools.lru_cache(maxsize=32)
def gaussian_taps(sigma: float) -> np.ndarray:
    """OpenCV's float32 Gaussian kernel for ``sigma`` (``[1]`` for ``sigma == 0``).

    Args:
        sigma: Standard deviation in pixels, ``>= 0``.

    Returns:
        Read-only float32 taps, odd length ``2·round(4·sigma) + 1``, summing to 1.
    """
    if sigma == 0:
        taps = np.ones(1, np.float32)
    else:
        ksize = int(np.floor(sigma * 8 + 1 + 0.5)) | 1  # cvRound(sigma * 4 * 2 + 1) | 1 for float images
        x = np.arange(ksize) - (ksize - 1) / 2
        g = np.exp(-(x**2) / (2 * sigma**2))
        taps = (g / g.sum()).astype(np.float32)
    taps.setflags(write=False)
    return taps


def _check(fg, bg, mask, sharpness, sigma_sharp: float, sigma_soft: float):
    fg, bg = np.asarray(fg), np.asarray(bg)
    for name, img in (("foreground", fg), ("background", bg)):
        if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3 or 0 in img.shape:
            raise ValueError(f"{name} must be a non-empty uint8 array of shape (H, W, 3), got {img.dtype} {img.shape}")
    if fg.shape != bg.shape:
        raise ValueError(f"foreground and background shapes differ: {fg.shape} vs {bg.shape}")
    mask = np.asarray(mask)
    if mask.shape != fg.shape[:2]:
        raise ValueError(f"mask must have shape {fg.shape[:2]}, got {mask.shape}")
    if not (mask.dtype == bool or np.issubdtype(mask.dtype, np.floating)):
        raise ValueError(f"mask must be bool or float with values in [0, 1], got {mask.dtype}")
    if sharpness is not None:
        sharpness = np.asarray(sharpness)
        if sharpness.shape != fg.shape[:2] or not np.issubdtype(sharpness.dtype, np.floating):
            raise ValueError(
                f"sharpness must be a float array of shape {fg.shape[:2]}, got {sharpness.dtype} {sharpness.shape}"
            )
        sharpness = np.ascontiguousarray(sharpness, dtype=np.float32)
    for name, sigma in (("sigma_sharp", sigma_sharp), ("sigma_soft", sigma_soft)):
        if not (0 <= sigma <= MAX_SIGMA):
            raise ValueError(f"{name} must be in [0, {MAX_SIGMA}] px, got {sigma}")
    return (
        np.ascontiguousarray(fg),
        np.ascontiguousarray(bg),
        np.ascontiguousarray(mask, dtype=np.float32),
        sharpness,
    )


def composite_nuclei(
    foreground: np.ndarray,
    background: np.ndarray,
    mask: np.ndarray,
    sharpness: np.ndarray | None = None,
    *,
    sigma_sharp: float = 0.5,
    sigma_soft: float = 1.5,
) -> np.ndarray:
    """Paint the foreground over the background through a blurred mask (formula in the module docstring).

    Args:
        foreground: Nuclear texture ``A``, uint8 RGB.
        background: Nucleus-free tissue ``B``, uint8 RGB.
        mask: ``M``, the fraction of nucleus per pixel: float in ``[0, 1]`` (e.g. the coverage of
            :func:`~pysynth.synth.raster.rasterize_polygons`) or bool.
        sharpness: Per-pixel ``s`` in ``[0, 1]`` (clipped); ``None`` for 1 everywhere (only the sharp blur).
        sigma_sharp: Standard deviation of the narrow Gaussian, px (0: none).
        sigma_soft: Standard deviation of the wide Gaussian, px.

    Returns:
        The composite, uint8 RGB (new array). Where ``M' == 0`` it equals the background exactly, where
        ``M' == 1`` the foreground.

    Raises:
        ValueError: On images that are not uint8 ``(H, W, 3)`` of one shape, a mask or sharpness map of
            another shape or dtype, or a sigma outside ``[0, MAX_SIGMA]``.

    Shape:
        - foreground, background: ``(H, W, 3)`` uint8.
        - mask, sharpness: ``(H, W)``.
        - Output: ``(H, W, 3)`` uint8.
    """
    fg, bg, mask, sharpness = _check(foreground, background, mask, sharpness, sigma_sharp, sigma_soft)
    out = np.empty_like(fg)
    _core.composite(fg, bg, mask, sharpness, gaussian_taps(float(sigma_sharp)), gaussian_taps(float(sigma_soft)), out)
    return out


def composite_nuclei_reference(
    foreground: np.ndarray,
    background: np.ndarray,
    mask: np.ndarray,
    sharpness: np.ndarray | None = None,
    *,
    sigma_sharp: float = 0.5,
    sigma_soft: float = 1.5,
) -> np.ndarray:
    """The specification of :func:`composite_nuclei`: :func:`cv2.GaussianBlur` twice and a NumPy blend.

    Args:
        foreground: As for :func:`composite_nuclei`.
        background: As for :func:`composite_nuclei`.
        mask: As for :func:`composite_nuclei`.
        sharpness: As for :func:`composite_nuclei`.
        sigma_sharp: As for :func:`composite_nuclei`.
        sigma_soft: As for :func:`composite_nuclei`.

    Returns:
        As for :func:`composite_nuclei`.

    Raises:
        ValueError: As :func:`composite_nuclei`.

    Shape:
        As for :func:`composite_nuclei`.
    """
    fg, bg, mask, sharpness = _check(foreground, background, mask, sharpness, sigma_sharp, sigma_soft)

    def blur(sigma: float) -> np.ndarray:
        return mask if sigma == 0 else cv2.GaussianBlur(mask, (0, 0), sigma, sigmaY=sigma)

    m = blur(sigma_sharp)
    if sharpness is not None:
        s = np.clip(sharpness, 0, 1)
        m = s * m + (1 - s) * blur(sigma_soft)
    m = np.clip(m, 0, 1)[..., None].astype(np.float64)
    out = bg + m * (fg.astype(np.float64) - bg)
    return np.floor(out + 0.5).astype(np.uint8)

"""Colour deconvolution (Ruifrok & Johnston 2001): RGB to hematoxylin, eosin and DAB densities and back.

The definitions are scikit-image's (:func:`skimage.color.rgb2hed` / :func:`skimage.color.hed2rgb`): with ``v``
the RGB value scaled to ``[0, 1]``, the optical density is ``log(max(v, 1e-6)) / log(1e-6)`` (0 for white, 1
for black) and the stain densities are ``max(0, od @ HED_FROM_RGB)``. Back: ``rgb = clip(exp(log(1e-6) · (hed
@ RGB_FROM_HED)), 0, 1)``, here rounded half up to uint8. No deliberate difference from scikit-image: uint8
input goes through a 256-entry density table computed in float64, and the arithmetic is float32.
"""

from __future__ import annotations

import numpy as np

from pysynth import _core

__all__ = [
    "HED_FROM_RGB",
    "RGB_FROM_HED",
    "hed_to_rgb",
    "hed_to_rgb_reference",
    "rgb_to_hed",
    "rgb_to_hed_reference",
]

#: The stain matrix: rows are the optical density (RGB absorbance) vectors of hematoxylin, eosin and DAB.
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
RGB_FROM_HED.setflags(write=False)

#: Its inverse: optical densities (row vector) times this gives stain densities.
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)
HED_FROM_RGB.setflags(write=False)

_LOG_ADJUST = np.log(1e-6)


def _check_matrix(matrix: np.ndarray | None, default: np.ndarray, name: str) -> np.ndarray:
    m = default if matrix is None else np.asarray(matrix)
    if m.shape != (3, 3) or not np.isfinite(m).all():
        raise ValueError(f"{name} must be a finite 3 x 3 matrix, got shape {m.shape}")
    return np.ascontiguousarray(m, dtype=np.float32)


def rgb_to_hed(rgb: np.ndarray, *, hed_from_rgb: np.ndarray | None = None) -> np.ndarray:
    """Stain densities of a uint8 RGB image, as :func:`skimage.color.rgb2hed` computes them.

    Args:
        rgb: The image, uint8 RGB.
        hed_from_rgb: Inverse stain matrix (default :data:`HED_FROM_RGB`); pass another to separate other
            stains (e.g. vectors estimated from the slide).

    Returns:
        float32 densities ``(hematoxylin, eosin, DAB)``, each ``>= 0`` (about 0-3 for real tissue).

    Raises:
        ValueError: If ``rgb`` is not uint8 of shape ``(..., 3)``, or the matrix is not a finite 3 x 3.

    Shape:
        - rgb: ``(..., 3)`` uint8, typically ``(H, W, 3)``.
        - Output: same shape, float32.
    """
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or rgb.ndim < 1 or rgb.shape[-1] != 3:
        raise ValueError(f"rgb must be a uint8 array of shape (..., 3), got {rgb.dtype} {rgb.shape}")
    matrix = _check_matrix(hed_from_rgb, HED_FROM_RGB, "hed_from_rgb")
    rgb = np.ascontiguousarray(rgb)
    out = np.empty(rgb.shape, np.float32)
    _core.rgb_to_stains(rgb, matrix, out)
    return out


def hed_to_rgb(hed: np.ndarray, *, rgb_from_hed: np.ndarray | None = None) -> np.ndarray:
    """uint8 RGB from stain densities, as :func:`skimage.color.hed2rgb` computes it, rounded half up.

    Args:
        hed: Densities ``(hematoxylin, eosin, DAB)``, any real dtype (converted to float32); negative
            densities brighten (the result is clipped to ``[0, 255]``).
            Non-finite values give unspecified colours.
        rgb_from_hed: Stain matrix (default :data:`RGB_FROM_HED`).

    Returns:
        The uint8 RGB image.

    Raises:
        ValueError: If ``hed`` is not real-valued of shape ``(..., 3)``, or the matrix is not a finite 3 x 3.

    Shape:
        - hed: ``(..., 3)``, typically ``(H, W, 3)``.
        - Output: same shape, uint8.
    """
    hed = np.asarray(hed)
    if hed.ndim < 1 or hed.shape[-1] != 3 or not (np.issubdtype(hed.dtype, np.floating) or hed.dtype == np.uint8):
        raise ValueError(f"hed must be a real array of shape (..., 3), got {hed.dtype} {hed.shape}")
    matrix = _check_matrix(rgb_from_hed, RGB_FROM_HED, "rgb_from_hed")
    hed = np.ascontiguousarray(hed, dtype=np.float32)
    out = np.empty(hed.shape, np.uint8)
    _core.stains_to_rgb(hed, matrix, out)
    return out


def rgb_to_hed_reference(rgb: np.ndarray, *, hed_from_rgb: np.ndarray | None = None) -> np.ndarray:
    """The specification of :func:`rgb_to_hed`: scikit-image's formula in float64, written out in NumPy.

    Args:
        rgb: As for :func:`rgb_to_hed`.
        hed_from_rgb: As for :func:`rgb_to_hed`.

    Returns:
        float64 densities.

    Raises:
        ValueError: As :func:`rgb_to_hed`.

    Shape:
        As for :func:`rgb_to_hed` (float64 output).
    """
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or rgb.ndim < 1 or rgb.shape[-1] != 3:
        raise ValueError(f"rgb must be a uint8 array of shape (..., 3), got {rgb.dtype} {rgb.shape}")
    matrix = HED_FROM_RGB if hed_from_rgb is None else np.asarray(hed_from_rgb, np.float64)
    od = np.log(np.maximum(rgb / 255.0, 1e-6)) / _LOG_ADJUST
    return np.maximum(od @ matrix, 0.0)


def hed_to_rgb_reference(hed: np.ndarray, *, rgb_from_hed: np.ndarray | None = None) -> np.ndarray:
    """The specification of :func:`hed_to_rgb`: scikit-image's formula in float64, rounded half up.

    Args:
        hed: As for :func:`hed_to_rgb`.
        rgb_from_hed: As for :func:`hed_to_rgb`.

    Returns:
        uint8 RGB.

    Raises:
        ValueError: If ``hed`` is not of shape ``(..., 3)``.

    Shape:
        As for :func:`hed_to_rgb`.
    """
    hed = np.asarray(hed, dtype=np.float64)
    if hed.ndim < 1 or hed.shape[-1] != 3:
        raise ValueError(f"hed must be of shape (..., 3), got {hed.shape}")
    matrix = RGB_FROM_HED if rgb_from_hed is None else np.asarray(rgb_from_hed, np.float64)
    rgb = np.clip(np.exp(_LOG_ADJUST * (hed @ matrix)), 0.0, 1.0)
    return np.floor(rgb * 255.0 + 0.5).astype(np.uint8)

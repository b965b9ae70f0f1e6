"""Inpainting nuclei away: multi-scale push-pull filling with fine tissue texture transplanted into the holes.

Push-pull (Gortler et al. 1996, the lumigraph's pull-push): *pull* halves the image repeatedly, each coarse
pixel the weight-averaged colour of its 2 x 2 children with weight ``min(1, Σ child weights)`` (known pixels
weigh 1, holes 0), until a level has no empty pixel; *push* goes back coarse to fine, each level's colour
becoming ``W·C + (1 - W)·U`` with ``U`` the bilinear 2x upsampling of the coarser result. Holes fill smoothly
from their rims with no streaks or star patterns (artefacts of Telea/Navier-Stokes inpainting that only
synthetic patches would carry).

A smooth fill is itself a cue (flat blobs where nuclei were), so on the finest ``texture_levels`` levels the
fill also gets ``texture x D``, where ``D = C - U`` is the detail (one pyramid band) of the same level at a
pixel shifted by a random offset into fully known tissue: real texture of the same patch, at the right scale
and contrast. Offsets are drawn from ``seed``; each hole pixel takes the first of :data:`N_OFFSETS` offsets
whose source is inside the image and fully known.
"""

from __future__ import annotations

import numpy as np

from pysynth import _core

__all__ = ["inpaint", "inpaint_reference", "texture_offsets"]

#: Candidate texture offsets per call.
N_OFFSETS = 6


def texture_offsets(
    shape_hw: tuple[int, int], texture_levels: int, seed: int | np.random.Generator | None
) -> np.ndarray:
    """The random ``(dy, dx)`` texture source offsets for one call, multiples of ``2**(texture_levels - 1)``.

    Lengths are drawn between a sixth and a third of the shorter side (at least 4 px), in uniform directions.

    Args:
        shape_hw: Image ``(height, width)``.
        texture_levels: Pyramid levels that get texture.
        seed: Seed or generator.

    Returns:
        int32 array of shape ``(N_OFFSETS, 2)``.
    """
    rng = np.random.default_rng(seed)
    side = min(shape_hw)
    lo = max(4.0, side / 6)
    hi = max(lo + 1.0, side / 3)
    radius = rng.uniform(lo, hi, N_OFFSETS)
    angle = rng.uniform(0.0, 2.0 * np.pi, N_OFFSETS)
    step = 1 << max(texture_levels - 1, 0)
    d = np.stack([radius * np.sin(angle), radius * np.cos(angle)], axis=1)
    return (np.round(d / step) * step).astype(np.int32)


def _check(image, mask, texture: float, texture_levels: int) -> tuple[np.ndarray, np.ndarray]:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or 0 in image.shape:
        raise ValueError(f"image must be a non-empty uint8 array of shape (H, W, 3), got {image.dtype} {image.shape}")
    mask = np.asarray(mask)
    if mask.shape != image.shape[:2]:
        raise ValueError(f"mask must have the image's shape {image.shape[:2]}, got {mask.shape}")
    if mask.dtype != bool and mask.dtype != np.uint8:
        raise ValueError(f"mask must be bool or uint8 (nonzero = fill), got {mask.dtype}")
    if not (np.isfinite(texture) and texture >= 0):
        raise ValueError(f"texture must be a finite number >= 0, got {texture}")
    if not (isinstance(texture_levels, int | np.integer) and 0 <= texture_levels <= 8):
        raise ValueError(f"texture_levels must be an integer in 0..8, got {texture_levels}")
    mask = np.ascontiguousarray(mask).view(np.uint8)
    if mask.all():
        raise ValueError("mask covers the whole image: there is no pixel to fill from")
    return np.ascontiguousarray(image), mask


def inpaint(
    image: np.ndarray,
    mask: np.ndarray,
    *,
    texture: float = 1.0,
    texture_levels: int = 2,
    seed: int | np.random.Generator | None = None,
) -> np.ndarray:
    """Fill the masked pixels of an RGB image from their surroundings (push-pull plus texture, see module).

    Args:
        image: uint8 RGB image.
        mask: Pixels to fill: bool, or uint8 with nonzero = fill.
        texture: Gain of the transplanted detail (0: a smooth push-pull fill).
        texture_levels: Finest pyramid levels that get detail (1: 1-2 px texture; 2 adds 2-4 px; 0: none).
        seed: Seed or generator for the texture offsets (same seed, same result).

    Returns:
        The filled image (new array); unmasked pixels are unchanged.

    Raises:
        ValueError: If the image is not non-empty uint8 ``(H, W, 3)``, the mask not bool/uint8 of shape
            ``(H, W)`` or covering everything, or ``texture``/``texture_levels`` out of range.

    Shape:
        - image: ``(H, W, 3)`` uint8.
        - mask: ``(H, W)``.
        - Output: ``(H, W, 3)`` uint8.
    """
    image, mask = _check(image, mask, texture, texture_levels)
    if not mask.any():
        return image.copy()
    offsets = texture_offsets(image.shape[:2], texture_levels, seed)
    out = np.empty_like(image)
    _core.inpaint_push_pull(image, mask, offsets, int(texture_levels), float(texture), out)
    return out


def _pull(c: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One pull step: 2 x 2 weighted means (odd edges have fewer children), weight min(1, sum)."""
    h, wd = w.shape
    ph, pw = h + h % 2, wd + wd % 2
    cp = np.zeros((ph, pw, 3))
    wp = np.zeros((ph, pw))
    cp[:h, :wd] = c * w[..., None]
    wp[:h, :wd] = w
    sw = wp.reshape(ph // 2, 2, pw // 2, 2).sum(axis=(1, 3))
    sc = cp.reshape(ph // 2, 2, pw // 2, 2, 3).sum(axis=(1, 3))
    with np.errstate(invalid="ignore", divide="ignore"):
        cc = np.where(sw[..., None] > 0, sc / sw[..., None], 0.0)
    return cc, np.minimum(sw, 1.0)


def _upsample(c: np.ndarray, shape_hw: tuple[int, int]) -> np.ndarray:
    """Bilinear 2x upsampling, pixel centres aligned (fine p at coarse p/2 - 1/4), borders replicated."""

    def axis_weights(n_fine: int, n_coarse: int) -> tuple[np.ndarray, np.ndarray]:
        p = np.arange(n_fine)
        near = p // 2
        far = np.clip(np.where(p % 2 == 1, near + 1, near - 1), 0, n_coarse - 1)
        return near, far

    ni, fi = axis_weights(shape_hw[0], c.shape[0])
    nj, fj = axis_weights(shape_hw[1], c.shape[1])
    rows = 0.75 * c[ni] + 0.25 * c[fi]
    return 0.75 * rows[:, nj] + 0.25 * rows[:, fj]


def inpaint_reference(
    image: np.ndarray,
    mask: np.ndarray,
    *,
    texture: float = 1.0,
    texture_levels: int = 2,
    seed: int | np.random.Generator | None = None,
) -> np.ndarray:
    """The specification of :func:`inpaint`: the same push-pull written plainly in NumPy (float64). Slow.

    Args:
        image: As for :func:`inpaint`.
        mask: As for :func:`inpaint`.
        texture: As for :func:`inpaint`.
        texture_levels: As for :func:`inpaint`.
        seed: As for :func:`inpaint`.

    Returns:
        As for :func:`inpaint`.

    Raises:
        ValueError: As :func:`inpaint`.

    Shape:
        As for :func:`inpaint`.
    """
    image, mask = _check(image, mask, texture, texture_levels)
    if not mask.any():
        return image.copy()
    offsets = texture_offsets(image.shape[:2], texture_levels, seed)
    known = mask == 0
    colours = [np.where(known[..., None], image.astype(np.float64), 0.0)]
    weights = [known.astype(np.float64)]
    while weights[-1].size > 1:
        c, w = _pull(colours[-1], weights[-1])
        colours.append(c)
        weights.append(w)
        if (w > 0).all():
            break
    filled = colours[-1]
    for level in range(len(colours) - 2, -1, -1):
        c, w = colours[level], weights[level]
        up = _upsample(filled, w.shape)
        detail = np.zeros_like(c)
        if level < texture_levels and texture != 0:
            todo = w < 1
            h, wd = w.shape
            ii, jj = np.nonzero(todo)
            done = np.zeros(len(ii), bool)
            for dy, dx in offsets // (1 << level):
                si, sj = ii + dy, jj + dx
                ok = ~done & (si >= 0) & (si < h) & (sj >= 0) & (sj < wd)
                ok[ok] = w[si[ok], sj[ok]] >= 1
                detail[ii[ok], jj[ok]] = texture * (c[si[ok], sj[ok]] - up[si[ok], sj[ok]])
                done |= ok
        filled = w[..., None] * c + (1 - w[..., None]) * (up + detail)
    return np.floor(np.clip(filled, 0, 255) + 0.5).astype(np.uint8)

"""One synthetic patch: random polygon nuclei painted into a real tile's nucleus-free background.

Nuclei are painted by Beer–Lambert optics: inside a nucleus the background is attenuated by the tile's own
nuclear stain, ``A = B · exp(−d · stain)``, so pale nuclei stay translucent over their surroundings and dark ones
saturate, as in real H&E; then ``I = A·M' + B·(1 − M')`` with ``M'`` the mask after clearing, rim and a boundary
blur of spatially varying sharpness.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from pysynth.synth.config import SynthConfig
from pysynth.synth.source import OD_LUT, SourceTile, rgb_from_od


@dataclass
class SynthPatch:
    """A synthetic patch and everything known about it.

    Attributes:
        image: RGB ``uint8`` ``(S, S, 3)``.
        labels: Instance labels ``uint16`` ``(S, S)``, 0 background, 1..n nuclei.
        centres: Centre of each nucleus visible in the patch, float32 ``(n, 2)`` as ``(x, y)`` px; row k is label k+1.
        reference_xy: Top-left ``(x, y)`` in the source tile of the reference patch (another crop of the same tile).
        patch_xy: Top-left ``(x, y)`` in the source tile of the background crop.
    """

    image: np.ndarray
    labels: np.ndarray
    centres: np.ndarray
    reference_xy: tuple[int, int]
    patch_xy: tuple[int, int]


def _smooth_field(rng: np.random.Generator, size: int, lo: float, hi: float, cells: int = 4) -> np.ndarray:
    """A smooth random field in ``[lo, hi]`` over ``size × size`` (bicubic upsampling of a coarse grid)."""
    coarse = rng.uniform(lo, hi, (cells, cells)).astype(np.float32)
    return np.clip(cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC), lo, hi)


def random_polygon(rng: np.random.Generator, radius: float, config: SynthConfig) -> np.ndarray:
    """Vertices ``(N, 2)`` of a random star-shaped polygon centred at the origin (method.md §2)."""
    n = int(rng.integers(config.vertices[0], config.vertices[1] + 1))
    step = 2.0 * np.pi / n
    delta = config.irregularity * step
    angles = rng.uniform(step - delta, step + delta, n)
    angles = np.cumsum(angles / angles.sum() * 2.0 * np.pi) + rng.uniform(0, 2 * np.pi)
    spike = rng.uniform(*config.spikiness)
    radii = np.clip(rng.normal(radius, spike * radius, n), 0.0, 2.0 * radius)
    xy = np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)
    for _ in range(config.smooth_polygons):
        xy = chaikin(xy)
    return xy


def chaikin(xy: np.ndarray) -> np.ndarray:
    """One round of Chaikin corner cutting of a closed polygon ``(N, 2)`` → ``(2N, 2)``."""
    nxt = np.roll(xy, -1, axis=0)
    out = np.empty((2 * len(xy), 2), xy.dtype)
    out[0::2] = 0.75 * xy + 0.25 * nxt
    out[1::2] = 0.25 * xy + 0.75 * nxt
    return out


def random_homography(rng: np.random.Generator, size: int, amount: float) -> np.ndarray:
    """A perspective map of the patch onto itself with corners moved by up to ``amount × size``."""
    src = np.array([[0, 0], [size, 0], [size, size], [0, size]], np.float32)
    dst = src + rng.uniform(-amount * size, amount * size, (4, 2)).astype(np.float32)
    return cv2.getPerspectiveTransform(src, dst).astype(np.float64)


def _apply_homography(h: np.ndarray, xy: np.ndarray) -> np.ndarray:
    p = xy @ h[:2, :2].T + h[:2, 2]
    w = xy @ h[2, :2] + h[2, 2]
    return p / w[:, None]


def place_nuclei(
    rng: np.random.Generator, tissue: np.ndarray, config: SynthConfig, count: int, size_factor: float
) -> tuple[np.ndarray, int]:
    """Draw up to ``count`` polygon nuclei inside tissue, each overlapping the others by ≤ ``max_overlap``.

    A random perspective warp of the whole patch is applied to every nucleus' shape through its local Jacobian,
    so neighbours share a correlated, anisotropic deformation.

    Args:
        rng: Random stream.
        tissue: Bool ``(S, S)``, where centres may fall.
        config: Parameters.
        count: Nuclei wanted.
        size_factor: Per-patch scale of radii.

    Returns:
        ``(labels, n)``: int32 instance labels ``(S, S)`` numbered 1..n, and n.
    """
    size = tissue.shape[0]
    labels = np.zeros((size, size), np.int32)
    if count == 0:
        return labels, 0
    h = random_homography(rng, size, config.warp)
    scratch = np.zeros((size, size), np.uint8)
    n = 0
    for _ in range(count):
        for _ in range(config.redraws):
            cx, cy = rng.uniform(-4, size + 4, 2)
            ix, iy = min(size - 1, max(0, int(cx))), min(size - 1, max(0, int(cy)))
            if not tissue[iy, ix]:
                continue
            radius = rng.uniform(*config.radius) * size_factor
            local = random_polygon(rng, radius, config)
            # Local Jacobian of the warp at the centre, by finite differences.
            c = np.array([[cx, cy], [cx + 1, cy], [cx, cy + 1]])
            wc = _apply_homography(h, c)
            jac = np.stack([wc[1] - wc[0], wc[2] - wc[0]], axis=1)
            vertices = local @ jac.T + np.array([cx, cy])
            pts = np.round(vertices * 16).astype(np.int32).reshape(-1, 1, 2)
            x0, y0 = np.floor(vertices.min(axis=0)).astype(int)
            x1, y1 = np.ceil(vertices.max(axis=0)).astype(int) + 1
            x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, size), min(y1, size)
            if x1 <= x0 or y1 <= y0:
                continue
            window = scratch[y0:y1, x0:x1]
            window[:] = 0
            cv2.fillPoly(window, [pts - np.array([x0 * 16, y0 * 16], np.int32)], 1, lineType=cv2.LINE_8, shift=4)
            area = int(window.sum())
            if area < 8:
                continue
            existing = labels[y0:y1, x0:x1]
            if np.count_nonzero(existing[window > 0]) > config.max_overlap * area:
                continue
            n += 1
            existing[(window > 0) & (existing == 0)] = n
            break
    return labels, n


def synthesize_patch(source: SourceTile, rng: np.random.Generator, config: SynthConfig) -> SynthPatch:
    """Make one synthetic patch from a prepared real tile.

    Args:
        source: The prepared tile.
        rng: The patch's own random stream (derive it from the dataset seed and the patch index).
        config: Parameters.

    Returns:
        The :class:`SynthPatch`.
    """
    s = config.size
    th, tw = source.rgb.shape[:2]
    px, py = int(rng.integers(0, tw - s + 1)), int(rng.integers(0, th - s + 1))
    rx, ry = int(rng.integers(0, tw - s + 1)), int(rng.integers(0, th - s + 1))
    background_od = OD_LUT[source.background[py : py + s, px : px + s]]
    tissue = source.tissue[py : py + s, px : px + s]
    scale_area = (s / 400.0) ** 2

    # Unlabelled distractors go into the background first.
    background_od = _paint_distractors(background_od, rng, source, config, scale_area)

    # How many nuclei, how big: published priors, adapted to this tile's nuclear density and size.
    count_mean, count_sd = config.count_per_400
    size_mean, size_sd, size_lo, size_hi = config.size_factor
    if config.adapt_density:
        count_mean *= float(np.clip(source.density / config.reference_density, *config.density_clip))
        if source.median_area > 0:
            size_mean *= float(np.clip(np.sqrt(source.median_area / 420.0), 0.75, 1.35))
    if rng.random() < config.empty_fraction:
        count = 0
    else:
        count = int(np.clip(rng.normal(count_mean, count_sd), 0, config.max_count_per_400) * scale_area + 0.5)
    size_factor = float(np.clip(rng.normal(size_mean, size_sd), size_lo, size_hi))
    labels, n = place_nuclei(rng, tissue, config, count, size_factor)

    image_od = background_od
    centres = np.zeros((0, 2), np.float32)
    if n:
        fg = labels > 0
        # Per-nucleus properties looked up through the label map.
        darkness = rng.choice(source.darkness, n + 1) * rng.uniform(
            1 - config.darkness_jitter, 1 + config.darkness_jitter, n + 1
        )
        darkness[0] = 0.0
        clear = rng.random(n + 1) < config.clear_chromatin
        clear[0] = False
        contrast = rng.uniform(*config.texture_contrast)
        tx, ty = int(rng.integers(0, tw - s + 1)), int(rng.integers(0, th - s + 1))
        texture = source.texture[ty : ty + s, tx : tx + s]
        speckle = cv2.GaussianBlur(rng.standard_normal((s, s)).astype(np.float32), (0, 0), 0.8) * 1.6
        gain = _smooth_field(rng, s, *config.gain_range)
        density = darkness.astype(np.float32)[labels] * gain * (1.0 + contrast * (0.6 * texture + 0.4 * speckle))
        # Clear (vesicular) chromatin: interiors thinned where another texture is low; the rim stays.
        eroded = cv2.erode(fg.astype(np.uint8), np.ones((3, 3), np.uint8), iterations=2).astype(bool)
        rim = fg & ~eroded
        clear_px = clear[labels] & eroded
        if clear_px.any():
            tex2 = source.texture[ry : ry + s, rx : rx + s]
            thin = tex2 < np.percentile(tex2, rng.uniform(30, 70))
            density = np.where(clear_px & thin, density * rng.uniform(0.2, 0.5), density)
        density = np.where(rim, density * (1.0 + rng.uniform(*config.rim)), density)
        density = np.maximum(density, 0.0)
        # Boundary blur with spatially varying sharpness.
        alpha = fg.astype(np.float32)
        sharp = cv2.GaussianBlur(alpha, (0, 0), config.blur_sigma[0])
        soft = cv2.GaussianBlur(alpha, (0, 0), config.blur_sigma[1])
        mix = _smooth_field(rng, s, 0.0, 1.0, cells=3)
        alpha = sharp * (1 - mix) + soft * mix
        density = cv2.GaussianBlur(density, (0, 0), 0.6)
        nuclear_od = density[..., None] * _jitter(rng, source.stain, config.colour_jitter)[None, None, :]
        image_od = background_od + alpha[..., None] * nuclear_od
        centres = _centres(labels, n)
    image_od = image_od * _jitter(rng, np.ones(3, np.float32), config.colour_jitter)[None, None, :]
    image = rgb_from_od(image_od)
    return SynthPatch(image, labels.astype(np.uint16), centres, (rx, ry), (px, py))


def _jitter(rng: np.random.Generator, vector: np.ndarray, amount: float) -> np.ndarray:
    return (vector * rng.uniform(1 - amount, 1 + amount, 3)).astype(np.float32)


def _centres(labels: np.ndarray, n: int) -> np.ndarray:
    """Pixel centroid ``(x, y)`` of labels 1..n (NaN for a label with no pixel left)."""
    ys, xs = np.indices(labels.shape, dtype=np.float32)
    flat = labels.ravel()
    count = np.bincount(flat, minlength=n + 1)[1:].astype(np.float32)
    cx = np.bincount(flat, weights=xs.ravel() + 0.5, minlength=n + 1)[1:]
    cy = np.bincount(flat, weights=ys.ravel() + 0.5, minlength=n + 1)[1:]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.stack([cx / count, cy / count], axis=1).astype(np.float32)


def _paint_distractors(
    od: np.ndarray, rng: np.random.Generator, source: SourceTile, config: SynthConfig, scale_area: float
) -> np.ndarray:
    """Dark debris specks and pale, out-of-focus blobs: things that are not nuclei (no label)."""
    s = od.shape[0]
    n_debris = rng.poisson(config.debris_rate * scale_area)
    n_blobs = rng.poisson(config.blob_rate * scale_area)
    if n_debris + n_blobs == 0:
        return od
    extra = np.zeros((s, s), np.float32)
    for _ in range(n_debris):
        cx, cy = rng.uniform(0, s, 2)
        for _ in range(int(rng.integers(3, 12))):  # a cluster of speckles
            x, y = cx + rng.normal(0, 3), cy + rng.normal(0, 3)
            cv2.circle(extra, (int(x), int(y)), int(rng.integers(1, 3)), float(rng.uniform(0.6, 1.5)), -1)
    blobs = np.zeros((s, s), np.float32)
    for _ in range(n_blobs):
        centre = (int(rng.uniform(0, s)), int(rng.uniform(0, s)))
        axes = (int(rng.uniform(6, 16)), int(rng.uniform(6, 16)))
        cv2.ellipse(blobs, centre, axes, float(rng.uniform(0, 180)), 0, 360, float(rng.uniform(0.08, 0.2)), -1)
    blobs = cv2.GaussianBlur(blobs, (0, 0), rng.uniform(3, 6))
    extra = cv2.GaussianBlur(extra, (0, 0), 0.7) + blobs
    return od + extra[..., None] * source.stain[None, None, :]

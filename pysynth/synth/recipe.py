"""One synthetic patch: random polygon nuclei painted into a real tile's nucleus-free background.

Nuclei are painted by Beer–Lambert optics: inside a nucleus the background is attenuated by the tile's own
nuclear stain, ``A = B · exp(−d · stain)``, so pale nuclei stay translucent over their surroundings and dark ones
saturate, as in real H&E; then ``I = A·M' + B·(1 − M')`` with ``M'`` the mask after clearing, rim and a boundary
blur of spatially varying sharpness.
"""

from __future__ import annotations

from dataclasses import dataclass
from statistics import NormalDist

import cv2
import numpy as np

from pysynth.synth.config import SynthConfig
from pysynth.synth.source import SourceTile


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


_NOISE_BANK: dict[int, np.ndarray] = {}


def noise_bank(side: int = 1024) -> np.ndarray:
    """Blurred Gaussian noise (unit sd) shared by all patches of a process; patches take random crops of it.

    It is a fixed function of ``side`` (seeded), so every process holds the same bank and results do not depend
    on which process made a patch.
    """
    bank = _NOISE_BANK.get(side)
    if bank is None:
        noise = np.random.default_rng(20190616).standard_normal((side, side)).astype(np.float32)
        bank = cv2.GaussianBlur(noise, (0, 0), 0.8, borderType=cv2.BORDER_REFLECT)
        bank /= bank.std()
        _NOISE_BANK[side] = bank
    return bank


def random_polygons(
    rng: np.random.Generator, centres: np.ndarray, radii: np.ndarray, config: SynthConfig
) -> tuple[np.ndarray, np.ndarray]:
    """Random star-shaped polygons around ``centres`` (method.md §2), all drawn at once.

    Vertices lie on a circle at angular steps ``U(2π/N − δ, 2π/N + δ)`` renormalised to 2π (δ = irregularity·2π/N)
    with radii ``clip(Normal(R, spike·R), 0, 2R)``; then ``smooth_polygons`` rounds of Chaikin corner cutting.

    Args:
        rng: Random stream.
        centres: ``(K, 2)`` polygon centres ``(x, y)``.
        radii: ``(K,)`` mean radii.
        config: Parameters.

    Returns:
        ``(xy, offsets)``: local vertex offsets ``(V, 2)`` (relative to each centre) and ``(K + 1,)`` offsets.
    """
    k = len(centres)
    n = rng.integers(config.vertices[0], config.vertices[1] + 1, k)
    starts = np.concatenate([[0], np.cumsum(n)[:-1]])
    owner = np.repeat(np.arange(k), n)
    step = (2.0 * np.pi / n)[owner]
    delta = config.irregularity * step
    angles = rng.uniform(step - delta, step + delta)
    angles *= (2.0 * np.pi / np.add.reduceat(angles, starts))[owner]
    cum = np.cumsum(angles)
    cum -= np.repeat(cum[starts] - angles[starts], n)
    cum += rng.uniform(0, 2 * np.pi, k)[owner]
    spike = rng.uniform(*config.spikiness, k)
    r = radii[owner]
    rad = np.clip(rng.normal(r, (spike * radii)[owner]), 0.0, 2.0 * r)
    xy = np.stack([rad * np.cos(cum), rad * np.sin(cum)], axis=1)
    for _ in range(config.smooth_polygons):
        nxt = np.arange(1, len(xy) + 1)
        nxt[starts + n - 1] = starts
        out = np.empty((2 * len(xy), 2))
        out[0::2] = 0.75 * xy + 0.25 * xy[nxt]
        out[1::2] = 0.25 * xy + 0.75 * xy[nxt]
        xy, n, starts = out, 2 * n, 2 * starts
    return xy, np.concatenate([[0], np.cumsum(n)])


def random_homography(rng: np.random.Generator, size: int, amount: float) -> np.ndarray:
    """A perspective map of the patch onto itself with corners moved by up to ``amount × size``."""
    src = np.array([[0, 0], [size, 0], [size, size], [0, size]], np.float32)
    dst = src + rng.uniform(-amount * size, amount * size, (4, 2)).astype(np.float32)
    return cv2.getPerspectiveTransform(src, dst).astype(np.float64)


def homography_jacobians(h: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """Jacobian ``(K, 2, 2)`` of the perspective map ``h`` at points ``(K, 2)``."""
    x, y = xy[:, 0], xy[:, 1]
    den = h[2, 0] * x + h[2, 1] * y + h[2, 2]
    u = (h[0, 0] * x + h[0, 1] * y + h[0, 2]) / den
    v = (h[1, 0] * x + h[1, 1] * y + h[1, 2]) / den
    jac = np.empty((len(xy), 2, 2))
    jac[:, 0, 0] = (h[0, 0] - u * h[2, 0]) / den
    jac[:, 0, 1] = (h[0, 1] - u * h[2, 1]) / den
    jac[:, 1, 0] = (h[1, 0] - v * h[2, 0]) / den
    jac[:, 1, 1] = (h[1, 1] - v * h[2, 1]) / den
    return jac


def draw_nuclei(
    rng: np.random.Generator, tissue: np.ndarray, config: SynthConfig, count: int, size_factor: float
) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``count`` polygon nuclei centred in tissue, each overlapping earlier ones by ≤ ``max_overlap``.

    Candidates (up to ``redraws`` per wanted nucleus, a few times ``count`` in practice) are drawn at once and
    placed in order by the C++ kernel. One random perspective warp of the patch deforms every nucleus through its
    local Jacobian, so neighbours share a correlated, anisotropic change of shape and size.

    Returns:
        ``(labels, centres)``: int32 ``(S, S)`` labels 1..n and float32 ``(n, 2)`` centres ``(x, y)``.
    """
    from pysynth.synth.place import place_polygons

    size = tissue.shape[0]
    if count == 0:
        return np.zeros((size, size), np.int32), np.zeros((0, 2), np.float32)
    k = min(count * min(config.redraws, 4) + 8, 4096)
    centres = rng.uniform(-4, size + 4, (k, 2))
    ix = np.clip(centres.astype(np.int64), 0, size - 1)
    centres = centres[tissue[ix[:, 1], ix[:, 0]]]
    if len(centres) == 0:
        return np.zeros((size, size), np.int32), np.zeros((0, 2), np.float32)
    radii = rng.uniform(*config.radius, len(centres)) * size_factor
    local, offsets = random_polygons(rng, centres, radii, config)
    jac = homography_jacobians(random_homography(rng, size, config.warp), centres)
    owner = np.repeat(np.arange(len(centres)), np.diff(offsets))
    xy = np.einsum("vij,vj->vi", jac[owner], local) + centres[owner]
    return place_polygons(xy, offsets, (size, size), max_overlap=config.max_overlap, max_accept=count)


def _smooth_field(rng: np.random.Generator, size: int, lo: float, hi: float, cells: int = 4) -> np.ndarray:
    """A smooth random field in about ``[lo, hi]`` over ``size × size`` (bilinear upsampling of a coarse grid)."""
    coarse = rng.uniform(lo, hi, (cells, cells)).astype(np.float32)
    return cv2.resize(coarse, (size, size), interpolation=cv2.INTER_LINEAR)


_ERODE = np.ones((3, 3), np.uint8)
_DILATE = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5))


def synthesize_patch(source: SourceTile, rng: np.random.Generator, config: SynthConfig) -> SynthPatch:
    """Make one synthetic patch from a prepared real tile.

    Args:
        source: The prepared tile.
        rng: The patch's own random stream (derive it from the dataset seed and the patch index).
        config: Parameters.

    Returns:
        The :class:`SynthPatch`.
    """
    from pysynth.synth.paint import paint_nuclei

    s = config.size
    th, tw = source.rgb.shape[:2]

    def corner() -> tuple[int, int]:
        return int(rng.integers(0, tw - s + 1)), int(rng.integers(0, th - s + 1))

    (px, py), (rx, ry), (tx, ty), (qx, qy) = corner(), corner(), corner(), corner()
    background = source.background[py : py + s, px : px + s]
    tissue = source.tissue[py : py + s, px : px + s]
    scale_area = (s / 400.0) ** 2
    extra = _distractors(rng, s, config, scale_area)

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
    labels, centres = draw_nuclei(rng, tissue, config, count, size_factor)
    n = len(centres)

    fg = (labels > 0).astype(np.uint8)
    region = fg + cv2.erode(fg, _ERODE, iterations=2)  # 1 rim, 2 interior
    labels16 = labels.astype(np.uint16)
    label_ext = np.where(fg > 0, labels16, cv2.dilate(labels16, _DILATE)).astype(np.int32)
    fgf = fg.astype(np.float32)
    sharp = cv2.GaussianBlur(fgf, (0, 0), config.blur_sigma[0])
    soft = cv2.GaussianBlur(fgf, (0, 0), config.blur_sigma[1])
    mix = _smooth_field(rng, s, 0.0, 1.0, cells=3)
    alpha = sharp + mix * (soft - sharp)

    darkness = (
        rng.choice(source.darkness, n + 1) * rng.uniform(1 - config.darkness_jitter, 1 + config.darkness_jitter, n + 1)
    ).astype(np.float32)
    darkness[0] = 0.0
    clear = rng.random(n + 1) < config.clear_chromatin
    bank = noise_bank()
    nx, ny = (int(v) for v in rng.integers(0, bank.shape[0] - s + 1, 2))
    thin_fraction = rng.uniform(0.3, 0.7)
    image = paint_nuclei(
        background,
        label_ext,
        region,
        alpha,
        darkness,
        clear,
        source.texture[ty : ty + s, tx : tx + s],
        bank[ny : ny + s, nx : nx + s],
        _smooth_field(rng, s, *config.gain_range),
        source.texture[qy : qy + s, qx : qx + s],
        stain=source.stain,
        contrast=rng.uniform(*config.texture_contrast),
        thin_threshold=NormalDist().inv_cdf(thin_fraction),
        clear_factor=rng.uniform(0.2, 0.5),
        rim_gain=1.0 + rng.uniform(*config.rim),
        nuclear_jitter=rng.uniform(1 - config.colour_jitter, 1 + config.colour_jitter, 3),
        global_jitter=rng.uniform(1 - config.colour_jitter, 1 + config.colour_jitter, 3),
        extra=extra,
    )
    return SynthPatch(image, labels16, centres, (rx, ry), (px, py))


def _distractors(rng: np.random.Generator, s: int, config: SynthConfig, scale_area: float) -> np.ndarray | None:
    """Optical density (along the nuclear stain) of dark debris specks and pale out-of-focus blobs, unlabelled."""
    n_debris = rng.poisson(config.debris_rate * scale_area)
    n_blobs = rng.poisson(config.blob_rate * scale_area)
    if n_debris + n_blobs == 0:
        return None
    extra = np.zeros((s, s), np.float32)
    for _ in range(n_debris):
        cx, cy = rng.uniform(0, s, 2)
        for _ in range(int(rng.integers(3, 12))):  # a cluster of speckles
            x, y = cx + rng.normal(0, 3), cy + rng.normal(0, 3)
            cv2.circle(extra, (int(x), int(y)), int(rng.integers(1, 3)), float(rng.uniform(0.6, 1.5)), -1)
    if n_debris:
        extra = cv2.GaussianBlur(extra, (0, 0), 0.7)
    if n_blobs:
        blobs = np.zeros((s, s), np.float32)
        for _ in range(n_blobs):
            centre = (int(rng.uniform(0, s)), int(rng.uniform(0, s)))
            axes = (int(rng.uniform(6, 16)), int(rng.uniform(6, 16)))
            cv2.ellipse(blobs, centre, axes, float(rng.uniform(0, 180)), 0, 360, float(rng.uniform(0.08, 0.2)), -1)
        extra += cv2.GaussianBlur(blobs, (0, 0), rng.uniform(3, 6))
    return extra

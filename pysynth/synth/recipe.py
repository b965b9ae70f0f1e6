"""One synthetic patch: random polygon nuclei painted into a real tile's nucleus-free background.

Nuclei are painted by Beer–Lambert optics: inside a nucleus the background is attenuated by the tile's own
nuclear stain, ``A = B · exp(−d · stain)``, so pale nuclei stay translucent over their surroundings and dark ones
saturate, as in real H&E; with ``M'`` the mask after clearing, rim and a boundary blur of spatially varying
sharpness, the result is ``A·M' + B·(1 − M')`` in optical density (:mod:`pysynth.synth.paint`).

Everything per pixel runs in C++ (:func:`~pysynth.synth.place.draw_nuclei`,
:func:`~pysynth.synth.paint.paint_nuclei`, OpenCV's blurs); random fields that need no per-patch computation
(chromatin speckle, smooth gain and sharpness fields, distractor sprites) are crops of banks made once per
process from a fixed seed, so they cost nothing per patch and do not depend on the process.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cache
from statistics import NormalDist

import cv2
import numpy as np

from pysynth.synth.config import SynthConfig
from pysynth.synth.guide import NucleusBank
from pysynth.synth.lymphocytes import LYMPHOCYTE, add_lymphocytes, lymphocyte_count, lymphocyte_darkness
from pysynth.synth.source import SourceTile

_BANK_SIDE = 1024
_ERODE = np.ones((5, 5), np.uint8)
_DILATE = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5))


@dataclass
class SynthPatch:
    """A synthetic patch and everything known about it.

    Attributes:
        image: RGB ``uint8`` ``(S, S, 3)``.
        labels: Instance labels ``uint16`` ``(S, S)``, 0 background, 1..n nuclei.
        centres: Centre of each nucleus, float32 ``(n, 2)`` as ``(x, y)`` px; row k is label k+1.
        reference_xy: Top-left ``(x, y)`` in the source tile of the reference patch (another crop of the same tile).
        patch_xy: Top-left ``(x, y)`` in the source tile of the background crop.
        classes: Class of each nucleus, uint8 ``(n,)`` (row k is label k+1; :mod:`pysynth.synth.lymphocytes`:
            0 other, 1 lymphocyte, 255 unknown for transplanted real nuclei).
    """

    image: np.ndarray
    labels: np.ndarray
    centres: np.ndarray
    reference_xy: tuple[int, int]
    patch_xy: tuple[int, int]
    classes: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.classes is None:
            self.classes = np.zeros(len(self.centres), np.uint8)


@cache
def noise_bank() -> np.ndarray:
    """Fine chromatin speckle: Gaussian noise blurred by 0.8 px, unit sd (fixed seed; crops are per patch)."""
    noise = np.random.default_rng(20190616).standard_normal((_BANK_SIDE, _BANK_SIDE)).astype(np.float32)
    bank = cv2.GaussianBlur(noise, (0, 0), 0.8, borderType=cv2.BORDER_REFLECT)
    return bank / bank.std()


@cache
def smooth_bank() -> np.ndarray:
    """Smooth random field in [0, 1] varying over ~50-100 px (fixed seed; crops make gain and sharpness maps)."""
    coarse = np.random.default_rng(20190617).random((_BANK_SIDE // 48, _BANK_SIDE // 48)).astype(np.float32)
    field = cv2.resize(coarse, (_BANK_SIDE, _BANK_SIDE), interpolation=cv2.INTER_CUBIC)
    field -= field.min()
    return field / field.max()


@cache
def sprite_bank() -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Distractor sprites (optical density along the nuclear stain): dark debris clusters and pale, blurred blobs."""
    rng = np.random.default_rng(20190618)
    debris, blobs = [], []
    for _ in range(48):
        sprite = np.zeros((24, 24), np.float32)
        for _ in range(int(rng.integers(3, 12))):  # a cluster of speckles
            x, y = 12 + rng.normal(0, 3), 12 + rng.normal(0, 3)
            cv2.circle(sprite, (int(x), int(y)), int(rng.integers(1, 3)), float(rng.uniform(0.6, 1.5)), -1)
        debris.append(cv2.GaussianBlur(sprite, (0, 0), 0.7))
        blob = np.zeros((64, 64), np.float32)
        axes = (int(rng.uniform(6, 16)), int(rng.uniform(6, 16)))
        cv2.ellipse(blob, (32, 32), axes, float(rng.uniform(0, 180)), 0, 360, float(rng.uniform(0.08, 0.2)), -1)
        blobs.append(cv2.GaussianBlur(blob, (0, 0), rng.uniform(3, 6)))
    return debris, blobs


def _crop(rng: np.random.Generator, bank: np.ndarray, s: int) -> np.ndarray:
    y, x = (int(v) for v in rng.integers(0, bank.shape[0] - s + 1, 2))
    return bank[y : y + s, x : x + s]


def random_homography(rng: np.random.Generator, size: int, amount: float) -> np.ndarray:
    """A perspective map of the patch onto itself with corners moved by up to ``amount × size``."""
    src = np.array([[0, 0], [size, 0], [size, size], [0, size]], np.float32)
    dst = src + rng.uniform(-amount * size, amount * size, (4, 2)).astype(np.float32)
    return cv2.getPerspectiveTransform(src, dst).astype(np.float64)


def draw_patch_nuclei(
    rng: np.random.Generator, tissue: np.ndarray, config: SynthConfig, count: int, size_factor: float
) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``count`` polygon nuclei centred in tissue, each overlapping earlier ones by ≤ ``max_overlap``.

    Up to 4 candidates per wanted nucleus (capped by ``redraws``), drawn and placed in order by the C++ kernel
    (:func:`pysynth.synth.place.draw_nuclei`) under one random perspective warp of the patch.

    Returns:
        ``(labels, centres)``: int32 ``(S, S)`` labels 1..n and float32 ``(n, 2)`` centres ``(x, y)``.
    """
    from pysynth.synth.place import draw_nuclei

    size = tissue.shape[0]
    if count == 0:
        return np.zeros((size, size), np.int32), np.zeros((0, 2), np.float32)
    return draw_nuclei(
        int(rng.integers(0, 2**63)),
        min(count * min(config.redraws, 4) + 8, 4096),
        tissue,
        random_homography(rng, size, config.warp),
        vertices=config.vertices,
        irregularity=config.irregularity,
        spikiness=config.spikiness,
        smooth_rounds=config.smooth_polygons,
        radius=config.radius,
        size_factor=size_factor,
        max_overlap=config.max_overlap,
        max_accept=count,
    )


def nucleus_count_and_size(rng: np.random.Generator, source: SourceTile, config: SynthConfig) -> tuple[int, float]:
    """Nuclei in one patch and its size factor: published priors adapted to the tile's nuclear density and size."""
    count_mean, count_sd = config.count_per_400
    size_mean, size_sd, size_lo, size_hi = config.size_factor
    if config.adapt_density:
        lo, hi = config.density_clip
        count_mean *= min(hi, max(lo, source.density / config.reference_density))
        if source.median_area > 0:
            size_mean *= min(1.35, max(0.75, (source.median_area / 420.0) ** 0.5))
    scale_area = (config.size / 400.0) ** 2
    count = 0
    if rng.random() >= config.empty_fraction:
        # Empty patches are exactly the configured share: the count of the others is a normal truncated to at
        # least one nucleus (clipping it at 0 made 20-30% of small patches of sparse tiles empty as well).
        floor = 1.0 / scale_area
        value = rng.normal(count_mean, count_sd)
        for _ in range(16):
            if value >= floor:
                break
            value = rng.normal(count_mean, count_sd)
        count = max(1, int(min(config.max_count_per_400, max(floor, value)) * scale_area + 0.5))
    return count, min(size_hi, max(size_lo, rng.normal(size_mean, size_sd)))


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

    if config.factor > 1:  # made at the calibrated resolution, stored at the model's
        fine = replace(config, size=config.synth_size, output_mpp=0.0)
        return downsample_patch(synthesize_patch(source, rng, fine), config.factor)
    s = config.size
    th, tw = source.rgb.shape[:2]
    corners = rng.integers(
        0, [tw - s + 1, th - s + 1, tw - s + 1, th - s + 1, tw - s + 1, th - s + 1, tw - s + 1, th - s + 1]
    )
    px, py, rx, ry, tx, ty, qx, qy = (int(v) for v in corners)
    tissue = source.tissue[py : py + s, px : px + s]
    count, size_factor = nucleus_count_and_size(rng, source, config)
    transplants = 0
    if config.transplant_fraction > 0 and source.bank is not None and len(source.bank) and count:
        transplants = int(rng.binomial(count, config.transplant_fraction))
    lymphocytes = lymphocyte_count(rng, count - transplants, config)
    labels, centres = draw_patch_nuclei(rng, tissue, config, count - transplants - lymphocytes, size_factor)
    others = len(centres)
    if lymphocytes:
        labels, centres, lymphocytes = add_lymphocytes(rng, tissue, labels, centres, lymphocytes, config)
    n = len(centres)

    labels16 = labels.astype(np.uint16)
    fg = np.not_equal(labels16, 0).view(np.uint8)
    region = fg + cv2.erode(fg, _ERODE)  # 1 rim, 2 interior (2 px from the edge)
    fg = fg * np.uint8(255)
    sharp = blur_mask(fg, config.blur_sigma[0])
    soft = blur_mask(fg, config.blur_sigma[1])
    darkness = source.darkness[rng.integers(0, len(source.darkness), n + 1)].astype(np.float32)
    darkness *= rng.uniform(1 - config.darkness_jitter, 1 + config.darkness_jitter, n + 1).astype(np.float32)
    if lymphocytes:
        darkness[others + 1 :] = lymphocyte_darkness(rng, source.darkness, lymphocytes, config)
    np.maximum(darkness, np.float32(max(config.min_darkness, source.darkness_min)), out=darkness)
    jitter = rng.uniform(1 - config.colour_jitter, 1 + config.colour_jitter, 6)
    gain = _crop(rng, smooth_bank(), s)
    cleared = rng.random(n + 1) < config.clear_chromatin
    cleared[others + 1 :] = False  # dense chromatin
    image = paint_nuclei(
        source.background[py : py + s, px : px + s],
        labels,
        cv2.dilate(labels16, _DILATE),
        region,
        sharp,
        soft,
        gain,
        darkness,
        cleared,
        source.texture[ty : ty + s, tx : tx + s],
        _crop(rng, noise_bank(), s),
        _crop(rng, smooth_bank(), s),
        source.texture[qy : qy + s, qx : qx + s],
        stain=source.stain,
        gain_lo=config.gain_range[0],
        gain_span=config.gain_range[1] - config.gain_range[0],
        contrast=rng.uniform(*config.texture_contrast),
        thin_threshold=NormalDist().inv_cdf(rng.uniform(0.3, 0.7)),
        clear_factor=rng.uniform(0.2, 0.5),
        rim_gain=1.0 + rng.uniform(*config.rim),
        nuclear_jitter=jitter[:3],
        global_jitter=jitter[3:],
        extra=distractors(rng, s, config),
        check_labels=False,  # labels 1..n come from draw_nuclei and darkness has n + 1 entries
    )
    if config.red_cell_rate or config.fibre_rate or config.pigment_rate:
        from pysynth.synth.negatives import paint_negatives

        image = paint_negatives(rng, image, labels16, source.stain, config)
    classes = np.zeros(n, np.uint8)
    classes[others:] = LYMPHOCYTE
    if transplants:
        image, labels16, centres, used = transplant_nuclei(
            rng, image, labels16, centres, tissue, source.bank, transplants
        )
        classes = np.concatenate([classes, np.array([source.bank.class_of(k) for k in used], np.uint8)])
    return SynthPatch(image, labels16, centres, (rx, ry), (px, py), classes)


def block_majority(labels: np.ndarray, factor: int) -> np.ndarray:
    """Labels ``factor`` times coarser: each block takes the label that covers most of it.

    A tie (e.g. a block half nucleus, half background) goes to the nucleus on one colour of a checkerboard and to
    the other label on the other, so outlines neither grow nor shrink on average.
    """
    h, w = labels.shape[0] // factor, labels.shape[1] // factor
    blocks = labels[: h * factor, : w * factor].reshape(h, factor, w, factor).transpose(0, 2, 1, 3)
    blocks = blocks.reshape(h, w, factor * factor)
    even = (np.arange(h)[:, None] + np.arange(w)[None, :]) % 2 == 0
    best = blocks[..., 0].copy()
    best_score = np.full((h, w), -1, np.int64)
    for j in range(factor * factor):
        candidate = blocks[..., j]
        count = (blocks == candidate[..., None]).sum(axis=-1)
        score = 2 * count + ((candidate != 0) == even)
        take = score > best_score
        best[take] = candidate[take]
        best_score[take] = score[take]
    return best


def downsample_patch(patch: SynthPatch, factor: int) -> SynthPatch:
    """A patch ``factor`` times coarser: the image area-averaged, labels by block majority, renumbered 1..n.

    Nuclei that no block keeps are dropped with their class; centres are the new labels' centroids (pixel ``i``
    spans ``[i, i + 1)``); the crop positions stay those of the source tile at the synthesis resolution.
    """
    if factor == 1:
        return patch
    s = patch.image.shape[0] // factor
    image = cv2.resize(patch.image[: s * factor, : s * factor], (s, s), interpolation=cv2.INTER_AREA)
    coarse = block_majority(patch.labels, factor)
    kept = np.unique(coarse[coarse > 0])
    lut = np.zeros(int(patch.labels.max()) + 1, np.uint16)
    lut[kept] = np.arange(1, len(kept) + 1, dtype=np.uint16)
    labels = lut[coarse]
    n = len(kept)
    ys, xs = np.nonzero(labels)
    ids = labels[ys, xs]
    count = np.maximum(np.bincount(ids, minlength=n + 1)[1:], 1).astype(np.float64)
    cx = np.bincount(ids, xs + 0.5, minlength=n + 1)[1:] / count
    cy = np.bincount(ids, ys + 0.5, minlength=n + 1)[1:] / count
    centres = np.stack([cx, cy], axis=1).astype(np.float32).reshape(-1, 2)
    classes = np.asarray(patch.classes)[kept.astype(np.int64) - 1] if n else np.zeros(0, np.uint8)
    return SynthPatch(image, labels, centres, patch.reference_xy, patch.patch_xy, classes.astype(np.uint8))


_FEATHER = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5))


def transplant_nuclei(
    rng: np.random.Generator,
    image: np.ndarray,
    labels: np.ndarray,
    centres: np.ndarray,
    tissue: np.ndarray,
    bank: NucleusBank,
    count: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[int]]:
    """Paste up to ``count`` real nuclei of the bank into a painted patch, as labelled instances after the others.

    Each nucleus is turned by a random symmetry of the square and placed where its centre is in tissue and it
    keeps 2 px from every other nucleus. Its optical density above its own (inpainted) background is added to the
    patch's (Beer–Lambert: densities add), weighted by its mask grown by 2 px and softened, so its own blurred edge
    comes along without a seam; its label is the guide's mask.

    Returns:
        ``(image, labels, centres, used)`` with the new nuclei appended (labels n+1.., centres as ``(x, y)``);
        ``used``: the bank index of each pasted nucleus, in label order.
    """
    from pysynth.synth.source import optical_density

    s = image.shape[0]
    od = optical_density(image).copy()
    labels = labels.copy()
    occupied = cv2.dilate(np.not_equal(labels, 0).view(np.uint8), _FEATHER)
    added: list[tuple[float, float]] = []
    used: list[int] = []
    next_id = int(labels.max()) + 1 if labels.size else 1
    for _ in range(4 * count):
        if len(added) == count or next_id > np.iinfo(labels.dtype).max:
            break
        pick = int(rng.integers(len(bank)))
        delta, mask = bank.get(pick)
        turns, mirror = int(rng.integers(4)), bool(rng.random() < 0.5)
        delta, mask = np.rot90(delta, turns), np.rot90(mask, turns)
        if mirror:
            delta, mask = delta[:, ::-1], mask[:, ::-1]
        delta, mask = np.ascontiguousarray(delta), np.ascontiguousarray(mask)
        h, w = mask.shape
        if h > s or w > s:
            continue
        y, x = int(rng.integers(0, s - h + 1)), int(rng.integers(0, s - w + 1))
        ys, xs = np.nonzero(mask)
        cy, cx = float(ys.mean()) + 0.5, float(xs.mean()) + 0.5
        if not tissue[min(s - 1, int(y + cy)), min(s - 1, int(x + cx))] or occupied[y : y + h, x : x + w][mask].any():
            continue
        weight = cv2.GaussianBlur(cv2.dilate(mask.view(np.uint8), _FEATHER).astype(np.float32), (5, 5), 1.0)
        od[y : y + h, x : x + w] += delta * weight[..., None]
        labels[y : y + h, x : x + w][mask] = next_id
        occupied[y : y + h, x : x + w] |= cv2.dilate(mask.view(np.uint8), _FEATHER)
        added.append((x + cx, y + cy))
        used.append(pick)
        next_id += 1
    if not added:
        return image, labels, centres, used
    out = np.clip(256.0 * np.exp(-od) - 1.0 + 0.5, 0, 255).astype(np.uint8)
    return out, labels, np.concatenate([centres, np.array(added, np.float32).reshape(-1, 2)]), used


@cache
def _box_widths(sigma: float) -> tuple[int, int]:
    """Two odd box widths whose cascade has variance closest to sigma² (a box of width w adds (w² − 1)/12)."""
    widths = range(1, 16, 2)
    return min(
        ((a, b) for a in widths for b in widths if a <= b),
        key=lambda ab: abs((ab[0] ** 2 + ab[1] ** 2 - 2) / 12.0 - sigma * sigma),
    )


def blur_mask(mask: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian-like blur of a uint8 mask: 3×3 Gaussian up to sigma 0.8, else two box filters of equal variance.

    Boxes cost the same at any width (OpenCV's running sums), about a quarter of an 11-tap Gaussian here.
    """
    if sigma <= 0.8:
        return cv2.GaussianBlur(mask, (3, 3), sigma) if sigma > 0 else mask
    a, b = _box_widths(float(sigma))
    out = cv2.blur(mask, (a, a)) if a > 1 else mask
    return cv2.blur(out, (b, b)) if b > 1 else out


def distractors(rng: np.random.Generator, s: int, config: SynthConfig) -> np.ndarray | None:
    """Optical density (along the nuclear stain) of unlabelled dark debris and pale out-of-focus blobs, or None."""
    scale_area = (s / 400.0) ** 2
    n_debris = rng.poisson(config.debris_rate * scale_area)
    n_blobs = rng.poisson(config.blob_rate * scale_area)
    if n_debris + n_blobs == 0:
        return None
    debris, blobs = sprite_bank()
    extra = np.zeros((s, s), np.float32)
    for bank, count in ((debris, n_debris), (blobs, n_blobs)):
        for _ in range(count):
            sprite = bank[int(rng.integers(len(bank)))]
            h, w = sprite.shape
            x, y = int(rng.integers(-w // 2, s - w // 2)), int(rng.integers(-h // 2, s - h // 2))
            x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, s), min(y + h, s)
            extra[y0:y1, x0:x1] += sprite[y0 - y : y1 - y, x0 - x : x1 - x]
    return extra

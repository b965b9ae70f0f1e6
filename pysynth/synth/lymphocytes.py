"""Synthetic lymphocytes: a class of synthetic nuclei that are small, round and dark (the paper's §5.4).

A lymphocyte is "round and dark, around 7 microns in diameter" (the paper), with dense chromatin and little visible
cytoplasm; lymphocytes gather in infiltrates. Here each is a near-circular polygon, slightly elongated at random,
placed after the patch's other nuclei under the same overlap rule, part of them in clusters. The painter gives
them the upper range of the tile's real nuclear densities and no cleared chromatin.

Its size is what a tissue section shows of a sphere (:func:`profile_diameter`): the nucleus' diameter ``D`` is
drawn in µm (``SynthConfig.lymphocyte_diameter``, 6 ± 0.6 µm: a small lymphocyte is about 7 µm across, the paper's
"around 7 microns", and its round nucleus fills all of it but a thin rim of cytoplasm), and a section of thickness
``t`` (``SynthConfig.section_thickness``, 4 µm) at a uniformly random height shows the largest cross-section the
slab holds: all of ``D`` when the slab holds the equator (chance ``t / (D + t)``), a smaller circle when it cuts a
cap. The profiles then average about 5.4 µm across (median 5.6), and a few are much smaller: the classical
corpuscle problem of stereology (Wicksell 1925), the reason nuclei measured in sections are smaller than the
nuclei themselves.

The other nuclei stay as they are, small ones included: size alone must not be what tells the classes apart.

Classes of synthetic instances (one ``uint8`` per nucleus in the dataset's ``classes``):
:data:`OTHER` (0), :data:`LYMPHOCYTE` (1), :data:`UNKNOWN` (255, transplanted real nuclei: no class loss).
"""

from __future__ import annotations

import cv2
import numpy as np

from pysynth.synth.config import SynthConfig

OTHER = 0
LYMPHOCYTE = 1
UNKNOWN = 255
#: Class names by code, as written into datasets and model cards.
CLASS_NAMES = {OTHER: "other", LYMPHOCYTE: "lymphocyte", UNKNOWN: "unknown"}
_SHIFT = 4  # fillPoly sub-pixel bits


def label_classes(classes: np.ndarray | None, n: int) -> np.ndarray:
    """Class code of each label 0..n, uint8 ``(n + 1,)``.

    Label k gets ``classes[k - 1]``; the background and labels ``classes`` does not cover (all of them, without
    ``classes``) get :data:`UNKNOWN`.
    """
    codes = np.full(n + 1, UNKNOWN, np.uint8)
    if classes is not None:
        k = min(n, len(classes))
        codes[1 : k + 1] = np.asarray(classes, np.uint8)[:k]
    return codes


def lymphocyte_count(rng: np.random.Generator, count: int, config: SynthConfig) -> int:
    """How many of a patch's ``count`` synthetic nuclei are lymphocytes.

    The patch's share is Beta-distributed with mean ``lymphocyte_fraction`` (concentration 2): most patches have
    few, some are dense infiltrates, as in real tissue.
    """
    f = config.lymphocyte_fraction
    if f <= 0 or count <= 0:
        return 0
    share = 1.0 if f >= 1 else float(rng.beta(2 * f, 2 * (1 - f)))
    return int(rng.binomial(count, share))


def profile_diameter(rng: np.random.Generator, diameter: float, thickness: float) -> float:
    """Diameter of the profile a slab of ``thickness`` at a uniformly random height shows of a sphere.

    The slab's centre lies within ``(D + t) / 2`` of the sphere's centre (else it misses the sphere); the profile
    is the sphere's largest cross-section inside the slab: ``D`` when the slab holds the equator, else the circle
    at the slab face nearest the equator.
    """
    r = 0.5 * diameter
    offset = abs(rng.uniform(-(r + 0.5 * thickness), r + 0.5 * thickness))
    nearest = max(0.0, offset - 0.5 * thickness)  # height of the slab face closest to the equator
    return 2.0 * float(np.sqrt(max(r * r - nearest * nearest, 0.0)))


def lymphocyte_polygon(rng: np.random.Generator, radius: float) -> np.ndarray:
    """Vertices ``(V, 2)`` of one lymphocyte outline centred at 0: a smooth, slightly irregular near-circle."""
    n = int(rng.integers(18, 28))
    angles = np.sort(rng.uniform(0, 2 * np.pi, n))
    angles = 0.7 * angles + 0.3 * np.linspace(0, 2 * np.pi, n, endpoint=False) + rng.uniform(0, 2 * np.pi)
    angles = np.sort(np.mod(angles, 2 * np.pi))
    wobble = rng.normal(0, rng.uniform(0.02, 0.06), n)
    wobble = (wobble + np.roll(wobble, 1) + np.roll(wobble, -1)) / 3  # smooth, not spiky
    r = radius * (1 + wobble)
    squash = rng.uniform(0.8, 1.0) if rng.random() < 0.85 else rng.uniform(0.6, 0.8)  # some cut obliquely
    xy = np.stack([r * np.cos(angles), squash * r * np.sin(angles)], axis=1)
    turn = rng.uniform(0, np.pi)
    rot = np.array([[np.cos(turn), -np.sin(turn)], [np.sin(turn), np.cos(turn)]])
    return xy @ rot.T


def add_lymphocytes(
    rng: np.random.Generator,
    tissue: np.ndarray,
    labels: np.ndarray,
    centres: np.ndarray,
    count: int,
    config: SynthConfig,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Place up to ``count`` lymphocytes into a patch's labels after its other nuclei.

    A candidate's centre must fall in ``tissue``; it is refused when more than ``max_overlap`` of its pixels are
    taken (as every synthetic nucleus is); an accepted one takes its free pixels and the next label. A share
    ``lymphocyte_clustering`` of the candidates falls around 1-3 cluster centres (spread 10 µm), the rest anywhere.

    Args:
        rng: The patch's random stream.
        tissue: Bool ``(S, S)``: where centres may fall.
        labels: int32 ``(S, S)`` labels 1..n of the other nuclei (not modified).
        centres: float32 ``(n, 2)`` their centres ``(x, y)``.
        count: Lymphocytes wanted.
        config: ``lymphocyte_diameter``, ``lymphocyte_clustering``, ``max_overlap``, ``mpp``.

    Returns:
        ``(labels, centres, added)``: labels with the lymphocytes numbered n+1..n+added, centres appended.
    """
    labels = labels.copy()
    s = labels.shape[0]
    if count <= 0:
        return labels, centres, 0
    mean_um, sd_um = config.lymphocyte_diameter
    spread = 10.0 / config.mpp
    hubs = rng.uniform(0, s, (int(rng.integers(1, 4)), 2))
    next_id = int(labels.max()) + 1 if labels.size else 1
    added: list[tuple[float, float]] = []
    canvas = np.zeros((s, s), np.uint8)
    for _ in range(min(4 * count, 4096)):
        if len(added) == count:
            break
        if rng.random() < config.lymphocyte_clustering:
            cx, cy = hubs[int(rng.integers(len(hubs)))] + rng.normal(0, spread, 2)
        else:
            cx, cy = rng.uniform(0, s, 2)
        diameter = float(np.clip(rng.normal(mean_um, sd_um), 0.6 * mean_um, 1.4 * mean_um))
        diameter = profile_diameter(rng, diameter, config.section_thickness)
        if diameter < 0.4 * mean_um:  # a grazing cut: a pale fleck, not something to label as a lymphocyte
            continue
        poly = lymphocyte_polygon(rng, 0.5 * diameter / config.mpp) + np.array([cx, cy])
        if not (0 <= cx < s and 0 <= cy < s) or not tissue[int(cy), int(cx)]:
            continue
        x0, y0 = (max(0, int(np.floor(v)) - 1) for v in poly.min(axis=0))
        x1, y1 = (min(s, int(np.ceil(v)) + 2) for v in poly.max(axis=0))
        if x1 <= x0 or y1 <= y0:
            continue
        box = canvas[y0:y1, x0:x1]
        box[:] = 0
        # Pixel (j, i) is inside when its centre (j + 0.5, i + 0.5) is: shift the polygon by -0.5 px.
        pts = np.round((poly - (x0 + 0.5, y0 + 0.5)) * (1 << _SHIFT)).astype(np.int32)
        cv2.fillPoly(box, [pts], 1, lineType=cv2.LINE_8, shift=_SHIFT)
        inside = box.astype(bool)
        area = int(inside.sum())
        if area < 8:
            continue
        region = labels[y0:y1, x0:x1]
        if np.count_nonzero(region[inside]) > config.max_overlap * area:
            continue
        free = inside & (region == 0)
        region[free] = next_id
        ys, xs = np.nonzero(free)
        added.append((x0 + xs.mean() + 0.5, y0 + ys.mean() + 0.5))
        next_id += 1
    if added:
        centres = np.concatenate([centres.reshape(-1, 2), np.array(added, np.float32)])
    return labels, centres.astype(np.float32), len(added)


def lymphocyte_darkness(rng: np.random.Generator, darkness: np.ndarray, k: int, config: SynthConfig) -> np.ndarray:
    """Optical densities of ``k`` lymphocytes: the tile's darker real nuclei, a little darker still.

    Drawn from the tile's real nuclear densities above their ``lymphocyte_dark_quantile`` quantile, times U(1.05, 1.35):
    lymphocytes have the densest chromatin of a tissue's nuclei.
    """
    start = min(len(darkness) - 1, int(config.lymphocyte_dark_quantile * len(darkness)))
    chosen = darkness[rng.integers(start, len(darkness), k)].astype(np.float32)
    return chosen * rng.uniform(1.05, 1.35, k).astype(np.float32)


#: A real nucleus is called round (lymphocyte-like) at this circularity (``4πA / P²``) or more.
ROUND = 0.85


def real_nucleus_classes(labels: np.ndarray, darkness: np.ndarray, sure: np.ndarray, config: SynthConfig) -> np.ndarray:
    """Class code of each real nucleus of a tile by what a lymphocyte is, with no label: uint8 ``(n + 1,)``.

    The criteria are the synthetic lymphocytes' own, measured on the tile's real nuclei (a guide's instances):

    - a section of a sphere of diameter ``D`` shows a profile no wider than ``D``: with the synthetic lymphocytes'
      ``D`` of mean ``m`` and sd ``s`` (``SynthConfig.lymphocyte_diameter``), a profile wider than ``m + 3s``
      (never more than the ``1.4 m`` the synthesis clips at) is no lymphocyte: :data:`OTHER`;
    - a profile between ``m / 2`` and ``m + 2s`` wide (the equivalent diameter ``2√(A/π)``), round (circularity
      at least :data:`ROUND`) and dark (mean density at least the ``lymphocyte_dark_quantile`` of the tile's sure
      nuclei, the quantile synthetic lymphocytes are painted above) is a :data:`LYMPHOCYTE`;
    - everything else (small but pale or irregular, in-between sizes, too small to tell) is :data:`UNKNOWN`, and
      so is every nucleus of a tile with fewer than 5 sure nuclei (no reference density).

    Args:
        labels: int ``(h, w)`` instances of the tile, 0 background, at ``config.mpp``.
        darkness: float ``(h, w)`` nuclear-stain optical density above the background.
        sure: bool ``(n + 1,)``: the instances whose densities make the tile's reference (index 0 ignored).
        config: Synthesis parameters (µm/px and the lymphocyte prior).
    """
    from pysynth.shape import shape_features

    n = int(labels.max()) if labels.size else 0
    codes = np.full(n + 1, UNKNOWN, np.uint8)
    if n == 0:
        return codes
    ids = labels.ravel().astype(np.int64)
    area_px = np.bincount(ids, minlength=n + 1).astype(np.float64)
    mean_dark = np.bincount(ids, weights=darkness.ravel().astype(np.float64), minlength=n + 1) / np.maximum(area_px, 1)
    reference = mean_dark[1:][np.asarray(sure[1:], bool) & (area_px[1:] > 0)]
    if reference.size < 5:
        return codes
    dark = float(np.quantile(reference, config.lymphocyte_dark_quantile))
    m, s = (float(v) for v in config.lymphocyte_diameter)
    diameter = 2.0 * np.sqrt(area_px / np.pi) * config.mpp
    circularity = shape_features(labels.astype(np.int32, copy=False), config.mpp).circularity
    present = area_px > 0
    other = present & (diameter > min(m + 3 * s, 1.4 * m))
    lymphocyte = present & (diameter >= 0.5 * m) & (diameter <= m + 2 * s) & (circularity >= ROUND)
    lymphocyte &= mean_dark >= dark
    codes[other] = OTHER
    codes[lymphocyte] = LYMPHOCYTE
    codes[0] = UNKNOWN
    return codes

"""Unlabelled hard negatives in their own colours: red blood cells, fibres and pigment (``SynthConfig``).

The distractors of :mod:`pysynth.synth.recipe` are painted along the tile's nuclear stain; these are not. Each
kind is a sprite of optical density times a colour of its own, added to the painted patch in optical density
(Beer–Lambert: densities add) where it keeps clear of every labelled nucleus, so the network sees round,
dark-rimmed, nucleus-sized objects that are *not* nuclei because of their colour and texture:

* **red blood cells**: biconcave discs of 6–8 µm (denser rim, paler centre) in an eosin-red, alone or in a
  cluster of overlapping ones, as in vessels and haemorrhage;
* **fibres**: thin curved strands 1–2 µm wide and 10–40 µm long, pink to purple (eosin mixed with some of the
  tile's nuclear stain), as collagen and elastic fibres are;
* **pigment**: small granular clumps in brown (the DAB-like colour of haemosiderin, melanin and formalin pigment).

Sizes are in µm and converted with ``SynthConfig.mpp``; the sprite banks are made once per process from a fixed
seed (at 0.25 µm/px, resampled for other resolutions), so patches do not depend on the process.
"""

from __future__ import annotations

from functools import cache

import cv2
import numpy as np

from pysynth.synth.config import SynthConfig

#: Optical-density colours (unit vectors, RGB): a red cell's eosin-red and pigment's brown.
RED_CELL = np.array([0.10, 0.78, 0.62], np.float32) / np.linalg.norm([0.10, 0.78, 0.62])
EOSIN = np.array([0.07, 0.99, 0.11], np.float32) / np.linalg.norm([0.07, 0.99, 0.11])
PIGMENT = np.array([0.27, 0.57, 0.78], np.float32) / np.linalg.norm([0.27, 0.57, 0.78])
_BANK_MPP = 0.25
_KEEP_CLEAR = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5))


def _red_cell(rng: np.random.Generator) -> np.ndarray:
    """One biconcave disc: optical density (peak about 1) with a denser rim and a paler centre."""
    radius = rng.uniform(3.0, 4.0) / _BANK_MPP  # 6-8 µm across
    squash = rng.uniform(0.8, 1.0)  # seen a little obliquely
    side = int(2 * radius + 8) | 1
    yy, xx = np.mgrid[:side, :side].astype(np.float32) - side // 2
    angle = rng.uniform(0, np.pi)
    u = xx * np.cos(angle) + yy * np.sin(angle)
    v = (-xx * np.sin(angle) + yy * np.cos(angle)) / squash
    r = np.sqrt(u * u + v * v) / radius
    centre = rng.uniform(0.35, 0.7)  # how pale the middle is, relative to the rim
    profile = np.where(r <= 1.0, centre + (1.0 - centre) * np.clip(r, 0, 1) ** 2, 0.0).astype(np.float32)
    return cv2.GaussianBlur(profile, (0, 0), rng.uniform(0.6, 1.2))


def _fibre(rng: np.random.Generator) -> np.ndarray:
    """One curved strand (a quadratic curve), 1-2 µm wide, 10-40 µm long, peak density about 1."""
    length = rng.uniform(10.0, 40.0) / _BANK_MPP
    width = max(1, round(rng.uniform(1.0, 2.0) / _BANK_MPP / 2))
    side = int(length + 4 * width + 8)
    canvas = np.zeros((side, side), np.float32)
    angle = rng.uniform(0, np.pi)
    c = side / 2
    a = np.array([c - 0.5 * length * np.cos(angle), c - 0.5 * length * np.sin(angle)])
    b = np.array([c + 0.5 * length * np.cos(angle), c + 0.5 * length * np.sin(angle)])
    bend = np.array([-np.sin(angle), np.cos(angle)]) * rng.normal(0, 0.15) * length
    t = np.linspace(0, 1, 48)[:, None]
    curve = (1 - t) ** 2 * a + 2 * t * (1 - t) * (c + bend) + t**2 * b
    cv2.polylines(canvas, [np.round(curve).astype(np.int32)], False, 1.0, thickness=width, lineType=cv2.LINE_AA)
    return cv2.GaussianBlur(canvas, (0, 0), 0.8)


def _pigment(rng: np.random.Generator) -> np.ndarray:
    """One granular clump of 1-3 µm granules, peak density about 1."""
    side = 32
    canvas = np.zeros((side, side), np.float32)
    for _ in range(int(rng.integers(3, 15))):
        x, y = 16 + rng.normal(0, 3.5), 16 + rng.normal(0, 3.5)
        radius = int(rng.uniform(0.5, 1.5) / _BANK_MPP / 2) + 1
        cv2.circle(canvas, (int(x), int(y)), radius, float(rng.uniform(0.6, 1.0)), -1, lineType=cv2.LINE_AA)
    return cv2.GaussianBlur(np.minimum(canvas * 1.5, 1.0), (0, 0), 0.6)


@cache
def negative_bank(mpp: float) -> dict[str, list[np.ndarray]]:
    """Sprites of each kind at ``mpp`` µm/px (fixed seed; made at 0.25 µm/px and resampled)."""
    rng = np.random.default_rng(20190619)
    bank = {
        "red_cell": [_red_cell(rng) for _ in range(48)],
        "fibre": [_fibre(rng) for _ in range(48)],
        "pigment": [_pigment(rng) for _ in range(48)],
    }
    scale = _BANK_MPP / mpp
    if abs(scale - 1.0) > 1e-6:
        bank = {
            kind: [cv2.resize(s, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA) for s in sprites]
            for kind, sprites in bank.items()
        }
    return bank


def paint_negatives(
    rng: np.random.Generator, image: np.ndarray, labels: np.ndarray, stain: np.ndarray, config: SynthConfig
) -> np.ndarray:
    """Add red cells, fibres and pigment to a painted patch, clear of its labelled nuclei; labels are unchanged.

    Counts are Poisson with the config's rates per 400×400 px at 0.25 µm/px (scaled by the patch's area in µm²);
    a red-cell event is a cluster of 1-12 overlapping cells. A sprite that would touch a labelled nucleus (grown
    by 2 px) is moved, up to 4 tries, then dropped.

    Args:
        rng: The patch's random stream.
        image: The painted patch, RGB ``uint8`` ``(S, S, 3)``.
        labels: Its instance labels ``(S, S)`` (0 background).
        stain: The tile's unit nuclear stain colour (fibres mix some of it in).
        config: The rates (``red_cell_rate``, ``fibre_rate``, ``pigment_rate``) and ``mpp``.

    Returns:
        The patch with the negatives, RGB ``uint8`` (the input itself when none were drawn).
    """
    s = image.shape[0]
    area = (s * config.mpp / 100.0) ** 2  # in units of a 400 x 400 px patch at 0.25 µm/px (100 µm square)
    events = {
        "red_cell": rng.poisson(config.red_cell_rate * area),
        "fibre": rng.poisson(config.fibre_rate * area),
        "pigment": rng.poisson(config.pigment_rate * area),
    }
    if not any(events.values()):
        return image
    bank = negative_bank(float(config.mpp))
    blocked = cv2.dilate((labels != 0).astype(np.uint8), _KEEP_CLEAR).astype(bool)
    out = image.copy()
    step = 6.0 / config.mpp  # a red cell's diameter: the spacing inside a cluster
    for kind, count in events.items():
        for _ in range(int(count)):
            if kind == "red_cell":
                cx, cy = rng.uniform(0, s, 2)
                members = [(cx, cy)] + [
                    (cx + rng.normal(0, step), cy + rng.normal(0, step)) for _ in range(int(rng.integers(0, 12)))
                ]
                density, colour = rng.uniform(0.4, 1.0), RED_CELL
            elif kind == "fibre":
                members = [tuple(rng.uniform(0, s, 2))]
                mix = rng.uniform(0.0, 0.5)
                colour = (1 - mix) * EOSIN + mix * np.asarray(stain, np.float32)
                colour = colour / np.linalg.norm(colour)
                density = rng.uniform(0.15, 0.5)
            else:
                members = [tuple(rng.uniform(0, s, 2))]
                density, colour = rng.uniform(0.5, 1.5), PIGMENT
            for mx, my in members:
                sprite = bank[kind][int(rng.integers(len(bank[kind])))]
                for _attempt in range(4):
                    if _add(out, blocked, sprite, int(mx), int(my), density * colour):
                        break
                    mx, my = rng.uniform(0, s, 2)
    return out


def _add(image: np.ndarray, blocked: np.ndarray, sprite: np.ndarray, x: int, y: int, colour: np.ndarray) -> bool:
    """Add ``sprite × colour`` in optical density centred at ``(x, y)`` unless it touches ``blocked``.

    Only the sprite's own box is converted (the patch edge clips it), in place.
    """
    from pysynth.synth.source import OD_LUT

    s = image.shape[0]
    h, w = sprite.shape
    x, y = x - w // 2, y - h // 2
    x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, s), min(y + h, s)
    if x0 >= x1 or y0 >= y1:
        return False
    part = sprite[y0 - y : y1 - y, x0 - x : x1 - x]
    if (blocked[y0:y1, x0:x1] & (part > 0.05)).any():
        return False
    od = OD_LUT[image[y0:y1, x0:x1]] + part[..., None] * colour
    image[y0:y1, x0:x1] = np.clip(256.0 * np.exp(-od) - 1.0 + 0.5, 0, 255).astype(np.uint8)
    return True

"""A trained segmenter as the guide of synthesis: which pixels of a real tile are nuclei, and which nuclei are sure.

The plain preparation of a source tile inpaints a generous "super-segmentation" of its hematoxylin channel: every
purple thing goes, cytoplasm included, so the segmenter never sees purple cytoplasm as background and learns
"purple blob = nucleus". A guide model (the shipped one, or the previous round's) decides instead: only what it
takes for a nucleus (its segmentation probability above a low, high-recall threshold, slightly dilated) is
inpainted, and the rest of the tile's real purple structure stays in the background as an unlabelled negative.
Its confident nuclei also give the tile's real nuclear densities (the faintest labelled synthetic nucleus is no
fainter than them) and a bank of real nuclei that patches can carry, with their own pixels, beside the polygons.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from pysynth.errors import PysynthError
from pysynth.synth.lymphocytes import UNKNOWN


@dataclass
class GuideMaps:
    """What a guide model says about one real tile (at the synthesis resolution).

    Attributes:
        segmentation: Nuclear-pixel probability, float32 ``(h, w)``.
        labels: The model's nucleus instances, int32 ``(h, w)``.
        confidence: Mean segmentation probability of each instance, float32 ``(n + 1,)`` (index 0 unused).
    """

    segmentation: np.ndarray
    labels: np.ndarray
    confidence: np.ndarray


def resolve_guide(spec: str) -> Path:
    """The model folder a ``SynthConfig.guide`` names: ``"default"`` is the shipped model.

    Raises:
        PysynthError: If the folder is not a model.
    """
    from pysynth.models.io import META, WEIGHTS, resolve_model_dir

    folder = resolve_model_dir(spec)
    if not (folder / META).is_file() or not (folder / WEIGHTS).is_file():
        raise PysynthError(f"synthesis guide {spec}: not a model folder (needs {WEIGHTS} and {META})")
    return folder


def guide_maps(spec: str, rgb: np.ndarray, mpp: float, tta: int = 4) -> GuideMaps:
    """Run the guide model named by ``spec`` on a real tile at ``mpp`` µm/px (flip test-time augmentation).

    The tile is resampled to the model's grid as ``infer`` reads a slide, and the maps are mapped back by the
    pixel-centre rule (:func:`pysynth.segment.to_model_grid`, :func:`~pysynth.segment.to_image_grid`).
    """
    from pysynth.infer import inference_model
    from pysynth.instances import find_instances
    from pysynth.segment import predict_maps, to_image_grid, to_model_grid

    model, info = inference_model(str(resolve_guide(spec)))
    scaled = np.ascontiguousarray(to_model_grid(rgb, mpp, info.mpp))
    det, seg = predict_maps(model, scaled, tta=tta)
    # every object the guide sees, whatever its model's minimum confidence: what is unsure must still be inpainted
    found = find_instances(det, seg, replace(info.instances, min_confidence=0.0))
    hw = rgb.shape[:2]
    labels = to_image_grid(found.labels, hw, mpp, info.mpp)
    seg = to_image_grid(seg, hw, mpp, info.mpp)
    return GuideMaps(seg.astype(np.float32), labels.astype(np.int32), found.confidence.astype(np.float32))


@dataclass
class NucleusBank:
    """Real nuclei cut out of a tile: each one's optical density above the nucleus-free background, and its mask.

    Attributes:
        boxes: int64 ``(k, 3)``: height, width and offset of each nucleus' crop in the flat arrays.
        delta: float16 flat: optical density of the tile minus that of its inpainted background, per channel
            (``h·w·3`` values per nucleus).
        mask: bool flat: the guide's mask of the nucleus in its crop (``h·w`` values per nucleus).
        classes: uint8 ``(k,)``: each nucleus' class code (:mod:`pysynth.synth.lymphocytes`), or None: all
            unknown.
    """

    boxes: np.ndarray
    delta: np.ndarray
    mask: np.ndarray
    classes: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.boxes)

    def get(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Nucleus ``k``: ``(delta float32 (h, w, 3), mask bool (h, w))``."""
        h, w, offset = (int(v) for v in self.boxes[k])
        delta = self.delta[3 * offset : 3 * (offset + h * w)].astype(np.float32).reshape(h, w, 3)
        return delta, self.mask[offset : offset + h * w].reshape(h, w)

    def class_of(self, k: int) -> int:
        """Class code of nucleus ``k`` (unknown, 255, without classes)."""
        return UNKNOWN if self.classes is None else int(self.classes[k])


#: Margin of context around each banked nucleus (px), so its own blurred edge comes along.
BANK_PAD = 3


def nucleus_bank(
    od: np.ndarray,
    od_background: np.ndarray,
    guide: GuideMaps,
    *,
    confident: float,
    min_area: int = 60,
    max_area: int = 4000,
    limit: int = 256,
    classes: np.ndarray | None = None,
) -> NucleusBank:
    """The guide's confident, isolated, whole nuclei of a tile, as a :class:`NucleusBank` (at most ``limit``).

    ``classes`` (one code per guide label, :func:`pysynth.synth.lymphocytes.real_nucleus_classes`) gives the
    banked nuclei their classes; None: the bank has none.

    A nucleus is banked when its confidence is at least ``confident``, its area lies in ``[min_area, max_area]``,
    it does not touch the tile's edge, and no other instance lies within :data:`BANK_PAD` px of it (its crop then
    holds it alone). The crops are in a fixed, content-derived order (by label), so the bank is deterministic.
    """
    labels = guide.labels
    h, w = labels.shape
    n = int(labels.max()) if labels.size else 0
    empty = NucleusBank(np.zeros((0, 3), np.int64), np.zeros(0, np.float16), np.zeros(0, bool))
    if n == 0:
        return empty
    areas = np.bincount(labels.ravel(), minlength=n + 1)
    top, left, bottom, right = bounding_boxes(labels, n)
    boxes = []
    deltas, masks, codes = [], [], []
    offset = 0
    for label in range(1, n + 1):
        if len(boxes) >= limit:
            break
        if not (guide.confidence[label] >= confident and min_area <= areas[label] <= max_area):
            continue
        y0, y1 = top[label] - BANK_PAD, bottom[label] + BANK_PAD
        x0, x1 = left[label] - BANK_PAD, right[label] + BANK_PAD
        if y0 < 0 or x0 < 0 or y1 > h or x1 > w:
            continue
        window = labels[y0:y1, x0:x1]
        if np.any((window != 0) & (window != label)):  # another nucleus within reach: not cut out cleanly
            continue
        mask = window == label
        delta = np.clip(od[y0:y1, x0:x1] - od_background[y0:y1, x0:x1], 0.0, None)
        boxes.append((y1 - y0, x1 - x0, offset))
        deltas.append(delta.astype(np.float16).ravel())
        masks.append(mask.ravel())
        if classes is not None:
            codes.append(int(classes[label]))
        offset += mask.size
    if not boxes:
        return empty
    return NucleusBank(
        np.array(boxes, np.int64),
        np.concatenate(deltas),
        np.concatenate(masks),
        None if classes is None else np.array(codes, np.uint8),
    )


def bounding_boxes(labels: np.ndarray, n: int) -> tuple[np.ndarray, ...]:
    """``(top, left, bottom, right)`` of labels 0..n, int64 (bottom and right exclusive; absent labels all 0)."""
    ys, xs = np.nonzero(labels)
    ids = labels[ys, xs]
    big = np.iinfo(np.int64).max
    top, left = np.full(n + 1, big, np.int64), np.full(n + 1, big, np.int64)
    bottom, right = np.zeros(n + 1, np.int64), np.zeros(n + 1, np.int64)
    np.minimum.at(top, ids, ys)
    np.minimum.at(left, ids, xs)
    np.maximum.at(bottom, ids, ys + 1)
    np.maximum.at(right, ids, xs + 1)
    absent = bottom == 0
    top[absent] = left[absent] = 0
    return top, left, bottom, right

"""Segmenting images with a trained model: network pass, instances with confidences, outputs (labels, GeoJSON, overlay).

Images are resampled to the model's resolution exactly as ``pysynth infer`` reads slides
(:func:`pysynth.io.read_region`). The network sees the image the way ``infer`` sees a slide: in one pass up to
:data:`CORE` px a side, beyond that in cores of :data:`CORE` px, each run with :data:`CONTEXT` px of context on every
side (cut at the image's edges) and kept on its core only (no blending). Instances are made from the maps
(:func:`pysynth.instances.find_instances`, each with its confidence) and mapped back to the image's own pixel grid
by the model pixel that holds each image pixel's centre, the way ``infer``'s polygons fall on a slide's pixels.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from pysynth.dye import dye_labels
from pysynth.errors import PysynthError
from pysynth.fsutil import atomic_write_bytes, atomic_write_text
from pysynth.instances import InstanceConfig, Instances, find_instances, largest_parts, trace_contours
from pysynth.io.grid import tile_grid
from pysynth.models.io import ModelInfo, normalise
from pysynth.models.unet import UNet
from pysynth.qupath import (  # noqa: F401 (the names segment's users import from here)
    CLASS_COLOURS,
    CONFIDENCE,
    DETECTION_PEAK,
    LYMPHOCYTE,
    LYMPHOCYTE_PROBABILITY,
    NUCLEUS,
    classification,
    detection,
    valid_ring,
)

#: Largest image `segment` reads whole, in pixels at the model's resolution (whole slides: `pysynth infer`).
MAX_PIXELS = 400_000_000

#: Side of the cores `segment` runs the network on, and the context around each: ``infer``'s region defaults, so
#: both commands give the same maps on the same pixels.
CORE = 2048
CONTEXT = 128


def _ramp(n: int, margin: int) -> np.ndarray:
    """Weights along one tile axis: rising linearly over ``margin`` px from each edge, never zero."""
    i = np.arange(n, dtype=np.float32)
    d = np.minimum(i + 0.5, n - 0.5 - i)
    return np.clip(d / max(1, margin), 1e-3, 1.0)


def resolve_device(device: str = "auto") -> torch.device:
    """``"auto"`` → the CUDA GPU if there is one, else the CPU; otherwise the named device.

    Raises:
        PysynthError: If the named device is not available.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise PysynthError(f"--device {device}: {exc}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise PysynthError(f"--device {device}: no CUDA GPU is available to this PyTorch")
    return dev


#: Test-time augmentation: how many of the 8 flips/rotations of the square's symmetry group to average.
TTA_CHOICES = (1, 2, 4, 8)


def dihedral_transforms(n: int) -> list[tuple[int, bool]]:
    """The first ``n`` of the 8 symmetries as ``(quarter turns, mirror)``.

    1: identity; 2: + left-right mirror; 4: + the half turn and the up-down mirror (flips only: no
    transposition, so anisotropic scanner artefacts stay along their axes); 8: the whole group.
    """
    if n not in TTA_CHOICES:
        raise ValueError(f"tta must be one of {TTA_CHOICES}, got {n!r}")
    order = [(0, False), (0, True), (2, False), (2, True), (1, False), (1, True), (3, False), (3, True)]
    return order[:n]


def _forward(a: np.ndarray, turns: int, mirror: bool) -> np.ndarray:
    a = np.rot90(a, turns, axes=(0, 1))
    return a[:, ::-1] if mirror else a


def _inverse(a: np.ndarray, turns: int, mirror: bool) -> np.ndarray:
    a = a[:, ::-1] if mirror else a
    return np.rot90(a, -turns, axes=(0, 1))


def predict_maps(
    model: UNet,
    rgb: np.ndarray,
    *,
    tile: int = 1024,
    overlap: int = 64,
    batch: int = 2,
    precision: str = "fp32",
    tta: int = 1,
    context: int | None = None,
    classes: bool = False,
) -> tuple[np.ndarray, ...]:
    """The detection and segmentation probability maps of an RGB image, averaged over ``tta`` symmetries.

    With ``tta > 1`` the image is also passed flipped and rotated (:func:`dihedral_transforms`) and the
    probability maps, mapped back, are averaged: ``tta`` times the network's cost.

    With ``context`` the image is cut into cores of ``tile`` px (a regular grid from the top left corner; one pass
    when the image fits one core), each passed with ``context`` px of the image around it (less at the image's
    edges) and kept on its core only: ``segment``'s and ``infer``'s layout. Without it, tiles of ``tile`` px are
    blended across ``overlap`` (see :func:`_predict_maps_once`).

    Args:
        model: The network (eval mode).
        rgb: ``(h, w, 3)`` uint8 at the model's resolution.
        tile: Tile side, or core side with ``context``.
        overlap: Overlap of blended tiles (without ``context``).
        batch: Tiles per forward pass (without ``context``).
        precision: Network arithmetic (``fp32``, ``bf16``, ``fp16``).
        tta: Symmetries averaged (1, 2, 4 or 8).
        context: Context around each core (None: blended tiles).
        classes: Also return the class output's lymphocyte probability map (the model must have one).

    Returns:
        ``(detection, segmentation)``, or ``(detection, segmentation, lymphocyte)`` with ``classes``; float32
        ``(h, w)`` each.

    Raises:
        ValueError: If ``classes`` is asked of a network without a class output.
    """
    if classes and not model.config.classes:
        raise ValueError("the network has no class output")
    transforms = dihedral_transforms(tta)
    if context is not None:
        if context < 0:
            raise ValueError(f"context must be non-negative, got {context}")

        def once(image: np.ndarray) -> tuple[np.ndarray, ...]:
            return _predict_cores(model, image, core=tile, context=context, precision=precision)
    else:

        def once(image: np.ndarray) -> tuple[np.ndarray, ...]:
            return _predict_maps_once(model, image, tile=tile, overlap=overlap, batch=batch, precision=precision)

    keep = 3 if classes else 2
    if len(transforms) == 1:
        return once(rgb)[:keep]
    total = [np.zeros(rgb.shape[:2], np.float32) for _ in range(keep)]
    for turns, mirror in transforms:
        view = np.ascontiguousarray(_forward(rgb, turns, mirror))
        for acc, m in zip(total, once(view)[:keep], strict=False):
            acc += _inverse(m, turns, mirror)
    for acc in total:
        acc /= len(transforms)
    return tuple(total)


def core_splits(n: int, core: int, multiple: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of the cores that cut ``n`` px into ``ceil(n / core)`` near-equal parts.

    Every start is a multiple of ``multiple`` (the network's pooling grid), so a core seen with a context that is
    a multiple of it sits on the same grid as in one pass of the whole image; the last part takes the rest.
    """
    k = max(1, math.ceil(n / core))
    step = max(multiple, math.ceil(n / k / multiple) * multiple)
    starts = list(range(0, n, step))
    return [(a, min(n, a + step)) for a in starts]


def _predict_cores(model: UNet, rgb: np.ndarray, *, core: int, context: int, precision: str) -> tuple[np.ndarray, ...]:
    """Maps over cores of about ``core`` px, each seen in one pass with ``context`` px around it (cut at the edges).

    With ``context`` at least the network's reach (128 px for the shipped depth-4 U-Nets, a multiple of its
    pooling grid), the maps equal those of one pass of the whole image bit for bit: only the cache footprint of
    the activations changes.
    """
    h, w = rgb.shape[:2]
    if h <= core and w <= core:
        return _predict_maps_once(model, rgb, tile=max(h, w), overlap=0, batch=1, precision=precision)
    multiple = 2**model.config.depth
    out = [np.empty((h, w), np.float32) for _ in range(2 + model.config.classes)]
    for y, y_end in core_splits(h, core, multiple):
        for x, x_end in core_splits(w, core, multiple):
            y0, x0 = max(0, y - context), max(0, x - context)
            y1, x1 = min(h, y_end + context), min(w, x_end + context)
            window = np.ascontiguousarray(rgb[y0:y1, x0:x1])
            maps = _predict_maps_once(
                model, window, tile=max(y1 - y0, x1 - x0), overlap=0, batch=1, precision=precision
            )
            for whole, part in zip(out, maps, strict=True):
                whole[y:y_end, x:x_end] = part[y - y0 : y_end - y0, x - x0 : x_end - x0]
    return tuple(out)


@torch.no_grad()
def _predict_maps_once(
    model: UNet,
    rgb: np.ndarray,
    *,
    tile: int = 1024,
    overlap: int = 64,
    batch: int = 2,
    precision: str = "fp32",
) -> tuple[np.ndarray, ...]:
    """The probability maps of an RGB image of any size: detection, segmentation (and the class output's).

    Args:
        model: The network (eval mode).
        rgb: ``(h, w, 3)`` uint8 at the model's resolution.
        tile: Tile side (rounded up to a multiple of ``2**depth``). An image at most 1.5 times that on each side
            runs in one pass (tiling it would cost more pixels than it saves memory).
        overlap: Overlap of neighbouring tiles; outputs are blended across it.
        batch: Tiles per forward pass.
        precision: ``"fp32"``, or ``"bf16"``/``"fp16"`` autocast on the model's device (fp16 on GPUs only).

    Returns:
        ``(detection, segmentation)`` (and ``lymphocyte`` for a network with a class output), float32 ``(h, w)``.
    """
    multiple = 2**model.config.depth
    device = next(model.parameters()).device
    if precision not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"precision must be fp32, bf16 or fp16, got {precision!r}")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    h, w = rgb.shape[:2]
    tile = math.ceil(tile / multiple) * multiple
    ph, pw = (-h) % multiple, (-w) % multiple
    image = cv2.copyMakeBorder(rgb, 0, ph, 0, pw, cv2.BORDER_REFLECT_101) if ph or pw else rgb
    H, W = image.shape[:2]
    if max(H, W) <= 1.5 * tile:
        tile = max(H, W)
    grid = tile_grid((H, W), tile, max(0, min(overlap, tile - multiple)), edge="shift")
    total = np.zeros((2 + model.config.classes, H, W), np.float32)
    weight = np.zeros((H, W), np.float32)
    for start in range(0, len(grid), batch):
        group = grid[start : start + batch]
        shapes = {(int(th), int(tw)) for _, _, th, tw in group}
        for th, tw in shapes:  # tiles of one shape per forward pass (edge tiles of a small axis differ)
            boxes = [g for g in group if (int(g[2]), int(g[3])) == (th, tw)]
            x = np.stack([image[y : y + th, x0 : x0 + tw] for y, x0, _, _ in boxes])
            t = torch.from_numpy(x).to(device, non_blocking=True).permute(0, 3, 1, 2)
            t = normalise(t).contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                p = torch.sigmoid(model(t).float()).cpu().numpy()
            wt = _ramp(th, overlap // 2)[:, None] * _ramp(tw, overlap // 2)[None, :]
            for (y, x0, _, _), maps in zip(boxes, p, strict=True):
                total[:, y : y + th, x0 : x0 + tw] += maps * wt
                weight[y : y + th, x0 : x0 + tw] += wt
    total /= weight
    return tuple(total[c, :h, :w] for c in range(total.shape[0]))


def model_extent(hw: tuple[int, int], mpp: float, model_mpp: float) -> tuple[int, int]:
    """``(height, width)`` at ``model_mpp`` of an image of ``hw`` px at ``mpp`` (``infer``'s slide extent)."""
    f = mpp / model_mpp  # model pixels per image pixel
    return max(1, math.ceil(hw[0] * f - 1e-9)), max(1, math.ceil(hw[1] * f - 1e-9))


def to_model_grid(rgb: np.ndarray, mpp: float, model_mpp: float) -> np.ndarray:
    """The image resampled to ``model_mpp`` as ``infer`` reads a slide (:func:`pysynth.io.read_region`)."""
    from pysynth.io import ArrayReader, read_region

    shape = model_extent(rgb.shape[:2], mpp, model_mpp)
    if shape == rgb.shape[:2] and abs(mpp - model_mpp) < 1e-12:
        return rgb
    return read_region(ArrayReader(rgb, mpp), 0, 0, shape, model_mpp)


def to_image_grid(labels: np.ndarray, hw: tuple[int, int], mpp: float, model_mpp: float) -> np.ndarray:
    """Labels at ``model_mpp`` mapped to an image's pixels: each takes the model pixel holding its centre."""
    if labels.shape == tuple(hw) and abs(mpp - model_mpp) < 1e-12:
        return labels
    f = mpp / model_mpp
    rows = np.minimum(np.floor((np.arange(hw[0]) + 0.5) * f).astype(np.int64), labels.shape[0] - 1)
    cols = np.minimum(np.floor((np.arange(hw[1]) + 0.5) * f).astype(np.int64), labels.shape[1] - 1)
    return np.ascontiguousarray(labels[rows[:, None], cols[None, :]])


def segment_image(
    model: UNet,
    info: ModelInfo,
    rgb: np.ndarray,
    mpp: float,
    instances: InstanceConfig | None = None,
    *,
    precision: str = "fp32",
    tta: int = 1,
    core: int = CORE,
    context: int = CONTEXT,
    drop_dye: bool = True,
) -> Instances:
    """Nuclei of an RGB image at ``mpp`` µm/px with their confidences, labels on the image's own pixel grid.

    Args:
        model: The network (eval mode).
        info: Its description (resolution, post-processing).
        rgb: ``(h, w, 3)`` uint8.
        mpp: The image's µm/px.
        instances: Post-processing (default: the model's, ``min_confidence`` included).
        precision: Network arithmetic.
        tta: Flips/rotations averaged (:func:`predict_maps`).
        core: Cores the network runs on (px at the model's resolution).
        context: Context around each core.
        drop_dye: Drop the objects of tissue-marking dye's colours (:mod:`pysynth.dye`).

    Returns:
        :class:`~pysynth.instances.Instances` whose labels are int32 ``(h, w)``; confidences are computed at the
        model's resolution and carried per label (a nucleus too small to hold an image pixel's centre keeps its
        entry but no pixel).

    Raises:
        PysynthError: If the image is smaller than the network's minimum or too large for one array.
    """
    h, w = rgb.shape[:2]
    multiple = 2**info.unet.depth
    size_h, size_w = model_extent((h, w), mpp, info.mpp)
    if min(size_h, size_w) < multiple:
        raise PysynthError(
            f"image is {w}×{h} px at {mpp:g} µm/px: smaller than the network's minimum of {multiple} px at "
            f"{info.mpp:g} µm/px"
        )
    if size_h * size_w > MAX_PIXELS:
        raise PysynthError(f"image is {size_w}×{size_h} px at {info.mpp:g} µm/px: too large for segment (use infer)")
    scaled = to_model_grid(rgb, mpp, info.mpp)
    classes = bool(model.config.classes)
    maps = predict_maps(model, scaled, tile=core, context=context, precision=precision, tta=tta, classes=classes)
    found = find_instances(maps[0], maps[1], instances or info.instances)
    if drop_dye:
        found = found.keep(~dye_labels(found.labels, scaled, found.count))
    if classes:
        found = found.with_classes(maps[2])
    labels = to_image_grid(found.labels, (h, w), mpp, info.mpp)
    if labels is not found.labels:  # a coarser grid can leave pieces touching only at corners
        labels = largest_parts(labels)
    return replace(found, labels=labels)


def segment_rgb(
    model: UNet,
    info: ModelInfo,
    rgb: np.ndarray,
    mpp: float,
    instances: InstanceConfig | None = None,
    *,
    precision: str = "fp32",
    tta: int = 1,
) -> np.ndarray:
    """Instance labels of an RGB image at ``mpp`` µm/px on the image's own pixel grid (int32; :func:`segment_image`)."""
    return segment_image(model, info, rgb, mpp, instances, precision=precision, tta=tta).labels


def image_lymphocyte_calls(
    labels: np.ndarray, probability: np.ndarray, stains: dict[str, np.ndarray], shape: Any, threshold: float
) -> np.ndarray:
    """Lymphocyte or not per label (bool indexed by label, entry 0 and absent labels False), over the image's nuclei.

    :func:`pysynth.lymphocyte.call` on the labels that hold pixels: their class-output ``probability``, pixel
    count, mean hematoxylin OD (``stains``, :func:`pysynth.table.stain_stats`) and circularity (``shape``,
    :func:`pysynth.shape.shape_features`; computed here when None, circularity does not depend on the µm/px).
    """
    from pysynth.lymphocyte import call

    n = int(labels.max()) if labels.size else 0
    out = np.zeros(n + 1, bool)
    if n == 0:
        return out
    if shape is None:
        from pysynth.shape import shape_features

        shape = shape_features(labels, 1.0)
    area = np.bincount(labels.ravel(), minlength=n + 1)
    present = np.flatnonzero(area)
    present = present[present > 0]
    out[present] = call(
        np.asarray(probability, np.float64)[present], area[present], stains["hematoxylin_od_mean"][present],
        np.asarray(shape.circularity)[present], threshold,
    )  # fmt: skip
    return out


def geojson(
    labels: np.ndarray,
    *,
    name: str = "",
    measurements: dict[str, np.ndarray] | None = None,
    lymphocyte: np.ndarray | None = None,
) -> dict:
    """Instance outlines as a GeoJSON FeatureCollection in pixel coordinates (x right, y down; QuPath-compatible).

    ``measurements`` maps a QuPath measurement name to an array indexed by label (e.g.
    ``{"Confidence": instances.confidence}``); each feature carries them under ``properties.measurements``.
    ``lymphocyte`` (bool indexed by label) classifies each feature ``Lymphocyte`` or ``Nucleus``; without it every
    feature is a ``Nucleus``.
    """
    features = []
    areas = np.bincount(labels.ravel(), minlength=int(labels.max()) + 1) if labels.size else np.zeros(1)
    for k, ring in enumerate(trace_contours(labels), start=1):
        if len(ring) < 3:
            continue
        kind = None if lymphocyte is None else (LYMPHOCYTE if lymphocyte[k] else NUCLEUS)
        values = None if not measurements else {key: round(float(v[k]), 4) for key, v in measurements.items()}
        ring = valid_ring(ring)  # an outline touching itself at a corner is repaired, as QuPath needs
        if len(ring) < 3:
            continue
        coords = [[int(x), int(y)] for x, y in ring]
        properties = {"label": k, "area_px": int(areas[k])}
        features.append(detection(k, coords, kind=kind, measurements=values, properties=properties))
    return {"type": "FeatureCollection", "name": name, "features": features}


def overlay(
    rgb: np.ndarray,
    labels: np.ndarray,
    colour: tuple[int, int, int] = (0, 255, 0),
    lymphocyte: np.ndarray | None = None,
) -> np.ndarray:
    """The image with every instance's outline drawn (inner boundary pixels); lymphocytes in their own colour.

    ``lymphocyte`` is bool indexed by label (None: every outline in ``colour``).
    """
    from pysynth.synth.store import outline_mask

    out = rgb.copy()
    edge = outline_mask(labels)
    out[edge] = colour
    if lymphocyte is not None and labels.size:
        called = np.asarray(lymphocyte, bool)
        out[edge & called[np.minimum(labels, len(called) - 1)]] = CLASS_COLOURS[LYMPHOCYTE]
    return out


@dataclass(frozen=True)
class Outputs:
    """Where the results of one image go."""

    labels: Path
    geojson: Path
    overlay: Path
    table: Path

    def __iter__(self) -> Iterator[Path]:
        return iter((self.labels, self.geojson, self.overlay, self.table))


def output_paths(out_dir: Path, stem: str, n_instances: int | None = None) -> Outputs:
    """``<stem>_labels.png`` (16-bit), or ``.tif`` (32-bit) above 65,535 instances; GeoJSON; overlay; table."""
    suffix = ".tif" if n_instances is not None and n_instances > 65535 else ".png"
    return Outputs(
        out_dir / f"{stem}_labels{suffix}",
        out_dir / f"{stem}.geojson",
        out_dir / f"{stem}_overlay.png",
        out_dir / f"{stem}_nuclei.parquet",
    )


#: QuPath names of the stain statistics (:func:`pysynth.table.stain_stats`), in ``segment`` and ``infer`` alike.
STAIN_MEASUREMENTS = {
    "hematoxylin_od_mean": "Hematoxylin OD mean",
    "hematoxylin_od_sd": "Hematoxylin OD sd",
    "eosin_od_mean": "Eosin OD mean",
    "eosin_od_sd": "Eosin OD sd",
}


def nucleus_columns(
    labels: np.ndarray,
    rgb: np.ndarray,
    mpp: float | None,
    found: Instances | None,
    called: np.ndarray | None,
    shape: Any = None,
    stains: dict[str, np.ndarray] | None = None,
) -> dict[str, Any]:
    """The per-nucleus table's columns (:mod:`pysynth.table`) of an image's labels: one row per present label."""
    from pysynth.table import SHAPE_COLUMNS, stain_stats

    n = int(labels.max()) if labels.size else 0
    counts = np.bincount(labels.ravel(), minlength=n + 1)
    ids = np.flatnonzero(counts)
    ids = ids[ids > 0]
    ys, xs = np.nonzero(labels)
    which = labels[ys, xs]
    safe = np.maximum(counts, 1)
    cx = (np.bincount(which, weights=xs + 0.5, minlength=n + 1) / safe)[ids]
    cy = (np.bincount(which, weights=ys + 0.5, minlength=n + 1) / safe)[ids]
    stains = stain_stats(labels, rgb, n) if stains is None else stains
    columns: dict[str, Any] = {
        "id": ids.astype(np.int64),
        "centroid_x_px": cx,
        "centroid_y_px": cy,
        **{name: values[ids] for name, values in stains.items()},
    }
    if mpp is not None:
        columns.update(centroid_x_um=cx * mpp, centroid_y_um=cy * mpp, area_um2=counts[ids] * mpp * mpp)
        for name in SHAPE_COLUMNS:
            columns[name] = getattr(shape, name)[ids]
    if found is not None:
        columns["confidence"] = found.confidence[ids]
        columns["detection_peak"] = found.detection_peak[ids]
        if found.lymphocyte is not None:
            columns["lymphocyte_probability"] = found.lymphocyte[ids]
    kinds = np.where(called[ids], LYMPHOCYTE, NUCLEUS) if called is not None else np.full(len(ids), NUCLEUS)
    columns["classification"] = kinds.tolist()
    return columns


def write_outputs(
    out_dir: Path,
    stem: str,
    rgb: np.ndarray,
    labels: np.ndarray | Instances,
    *,
    mpp: float | None = None,
    lymphocyte_threshold: float = 0.5,
    lymphocyte_call: str = "probability",
) -> Outputs:
    """Write the outputs of one image atomically (the labels last: their presence marks a finished image).

    They are the GeoJSON, the overlay, the per-nucleus table ``<stem>_nuclei.parquet`` (:mod:`pysynth.table`,
    one row per GeoJSON feature with its ``id``, the label) and the labels.

    Given :class:`~pysynth.instances.Instances`, the GeoJSON features carry their ``Confidence`` and ``Detection
    peak`` measurements; given ``mpp`` (µm/px of the labels' grid) also ``Area µm^2``, ``Perimeter µm`` and the
    shape features of :func:`pysynth.shape.shape_features` (after those two). Instances of a network with a class
    output also carry ``Lymphocyte probability`` and are classified ``Lymphocyte`` at ``lymphocyte_threshold``
    or above (else ``Nucleus``), or with ``lymphocyte_call`` ``"probability+rule"`` by
    :func:`image_lymphocyte_calls` over the image's nuclei; the overlay draws lymphocytes in their own colour.
    """
    from pysynth.table import stain_stats, table_writer

    measurements = None
    called = None
    found = None
    shape = None
    if isinstance(labels, Instances):
        found = labels
        measurements = {CONFIDENCE: labels.confidence, DETECTION_PEAK: labels.detection_peak}
        if labels.lymphocyte is not None:
            measurements[LYMPHOCYTE_PROBABILITY] = labels.lymphocyte
            called = labels.lymphocyte >= lymphocyte_threshold
            called[0] = False
        labels = labels.labels
    if mpp is not None:
        from pysynth.shape import shape_features

        shape = shape_features(labels, mpp)
        measurements = {**(measurements or {}), **shape.measurements()}
    n = int(labels.max()) if labels.size else 0
    stains = stain_stats(labels, rgb, n)
    if called is not None and lymphocyte_call == "probability+rule":
        called = image_lymphocyte_calls(labels, found.lymphocyte, stains, shape, lymphocyte_threshold)
    measurements = {**(measurements or {}), **{STAIN_MEASUREMENTS[k]: v for k, v in stains.items()}}
    paths = output_paths(out_dir, stem, n)
    text = json.dumps(geojson(labels, name=stem, measurements=measurements, lymphocyte=called), separators=(",", ":"))
    atomic_write_text(paths.geojson, text)
    from pysynth import __version__

    metadata = {"source": stem, "mpp": mpp, "pysynth": __version__, "coordinates": "image px, x right, y down"}
    with table_writer(paths.table, metadata) as table:
        table.write(nucleus_columns(labels, rgb, mpp, found, called, shape, stains))
    picture = cv2.cvtColor(overlay(rgb, labels, lymphocyte=called), cv2.COLOR_RGB2BGR)
    atomic_write_bytes(paths.overlay, cv2.imencode(".png", picture)[1].tobytes())
    if paths.labels.suffix == ".tif":
        data = cv2.imencode(".tif", labels.astype(np.int32))[1].tobytes()
    else:
        data = cv2.imencode(".png", labels.astype(np.uint16))[1].tobytes()
    atomic_write_bytes(paths.labels, data)
    return paths

"""Segmenting images with a trained model: tiled network pass, instances, outputs (labels, GeoJSON, overlay).

Images are resampled to the model's resolution, the network runs over overlapping tiles whose outputs are
blended with weights that fall off towards tile edges (no seams), instances are made from the blended maps
(:func:`pysynth.instances.instances_from_maps`) and mapped back to the image's own pixel grid.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from pysynth.errors import PysynthError
from pysynth.fsutil import atomic_write_bytes, atomic_write_text
from pysynth.instances import InstanceConfig, instances_from_maps, trace_contours
from pysynth.io.grid import tile_grid
from pysynth.models.io import ModelInfo, normalise
from pysynth.models.unet import UNet

#: Largest image `segment` reads whole, in pixels at the model's resolution (whole slides: `pysynth infer`).
MAX_PIXELS = 400_000_000


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


@torch.no_grad()
def predict_maps(
    model: UNet,
    rgb: np.ndarray,
    *,
    tile: int = 1024,
    overlap: int = 64,
    batch: int = 2,
    precision: str = "fp32",
) -> tuple[np.ndarray, np.ndarray]:
    """The detection and segmentation probability maps of an RGB image of any size.

    Args:
        model: The network (eval mode).
        rgb: ``(h, w, 3)`` uint8 at the model's resolution.
        tile: Tile side (rounded up to a multiple of ``2**depth``). An image at most 1.5 times that on each side
            runs in one pass (tiling it would cost more pixels than it saves memory).
        overlap: Overlap of neighbouring tiles; outputs are blended across it.
        batch: Tiles per forward pass.
        precision: ``"fp32"``, or ``"bf16"``/``"fp16"`` autocast on the model's device (fp16 on GPUs only).

    Returns:
        ``(detection, segmentation)``, float32 ``(h, w)`` each.
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
    grid = tile_grid((H, W), tile, min(overlap, tile - multiple), edge="shift")
    total = np.zeros((2, H, W), np.float32)
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
    return total[0, :h, :w], total[1, :h, :w]


def segment_rgb(
    model: UNet,
    info: ModelInfo,
    rgb: np.ndarray,
    mpp: float,
    instances: InstanceConfig | None = None,
    *,
    precision: str = "fp32",
) -> np.ndarray:
    """Instance labels of an RGB image at ``mpp`` µm/px, on the image's own pixel grid (int32)."""
    h, w = rgb.shape[:2]
    f = mpp / info.mpp  # model pixels per image pixel
    multiple = 2**info.unet.depth
    size = (max(1, round(w * f)), max(1, round(h * f)))
    if min(size) < multiple:
        raise PysynthError(
            f"image is {w}×{h} px at {mpp:g} µm/px: smaller than the network's minimum of {multiple} px at "
            f"{info.mpp:g} µm/px"
        )
    if size[0] * size[1] > MAX_PIXELS:
        raise PysynthError(f"image is {size[0]}×{size[1]} px at {info.mpp:g} µm/px: too large for segment (use infer)")
    scaled = (
        rgb if size == (w, h) else cv2.resize(rgb, size, interpolation=cv2.INTER_AREA if f < 1 else cv2.INTER_CUBIC)
    )
    det, seg = predict_maps(model, scaled, precision=precision)
    labels = instances_from_maps(det, seg, instances or info.instances)
    if size != (w, h):
        labels = cv2.resize(labels, (w, h), interpolation=cv2.INTER_NEAREST)
    return labels


def geojson(labels: np.ndarray, *, name: str = "") -> dict:
    """Instance outlines as a GeoJSON FeatureCollection in pixel coordinates (x right, y down; QuPath-compatible)."""
    features = []
    areas = np.bincount(labels.ravel(), minlength=int(labels.max()) + 1) if labels.size else np.zeros(1)
    for k, ring in enumerate(trace_contours(labels), start=1):
        if len(ring) < 3:
            continue
        coords = [[int(x), int(y)] for x, y in ring]
        coords.append(coords[0])
        features.append(
            {
                "type": "Feature",
                "id": k,
                "geometry": {"type": "Polygon", "coordinates": [coords]},
                "properties": {
                    "objectType": "detection",
                    "classification": {"name": "Nucleus"},
                    "label": k,
                    "area_px": int(areas[k]),
                },
            }
        )
    return {"type": "FeatureCollection", "name": name, "features": features}


def overlay(rgb: np.ndarray, labels: np.ndarray, colour: tuple[int, int, int] = (0, 255, 0)) -> np.ndarray:
    """The image with every instance's outline drawn (inner boundary pixels)."""
    from pysynth.synth.store import outline_mask

    out = rgb.copy()
    out[outline_mask(labels)] = colour
    return out


@dataclass(frozen=True)
class Outputs:
    """Where the results of one image go."""

    labels: Path
    geojson: Path
    overlay: Path


def output_paths(out_dir: Path, stem: str, n_instances: int | None = None) -> Outputs:
    """``<stem>_labels.png`` (16-bit), or ``.tif`` (32-bit) above 65,535 instances; GeoJSON; overlay."""
    suffix = ".tif" if n_instances is not None and n_instances > 65535 else ".png"
    return Outputs(out_dir / f"{stem}_labels{suffix}", out_dir / f"{stem}.geojson", out_dir / f"{stem}_overlay.png")


def write_outputs(out_dir: Path, stem: str, rgb: np.ndarray, labels: np.ndarray) -> Outputs:
    """Write the three outputs of one image atomically (the labels last: their presence marks a finished image)."""
    n = int(labels.max()) if labels.size else 0
    paths = output_paths(out_dir, stem, n)
    atomic_write_text(paths.geojson, json.dumps(geojson(labels, name=stem), separators=(",", ":")))
    picture = cv2.cvtColor(overlay(rgb, labels), cv2.COLOR_RGB2BGR)
    atomic_write_bytes(paths.overlay, cv2.imencode(".png", picture)[1].tobytes())
    if paths.labels.suffix == ".tif":
        data = cv2.imencode(".tif", labels.astype(np.int32))[1].tobytes()
    else:
        data = cv2.imencode(".png", labels.astype(np.uint16))[1].tobytes()
    atomic_write_bytes(paths.labels, data)
    return paths

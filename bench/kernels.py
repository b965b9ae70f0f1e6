"""The C++ kernels next to the library way of doing the same job, single-threaded.

Run ``python -m pysynth.bench.kernels [--quick] [--json PATH]``. Inputs follow the synthesis recipe: ~40 star
polygons of 14 vertices per 200 x 200 patch (4x as many at 400 x 400), ~12% of pixels masked for inpainting. The
network's decoder join (:func:`pysynth.models.unet.upsample_concat`) and pooling (``max_pool``) run on the shipped
width-8 network's full-resolution shapes of a 576 x 576 window, against ``F.interpolate`` + ``torch.cat`` and
``F.max_pool2d``, one torch thread.
"""

from __future__ import annotations

import argparse

import cv2
import numpy as np

from pysynth.bench.harness import Timing, format_table, measure, write_json

SIZES = (200, 400)


def _scene(size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    n = 40 * (size // 200) ** 2
    polys = []
    for _ in range(n):
        angles = np.sort(rng.uniform(0, 2 * np.pi, 14))
        radii = rng.uniform(7, 14) * rng.uniform(0.8, 1.2, 14)
        cx, cy = rng.uniform(0, size, 2)
        polys.append(np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], 1).astype(np.float32))
    offsets = np.r_[0, np.cumsum([len(p) for p in polys])].astype(np.int64)
    return np.concatenate(polys), offsets, polys


def _tissue(size: int, rng: np.random.Generator) -> np.ndarray:
    """A smooth pink texture standing in for tissue (timings do not depend on content)."""
    noise = rng.normal(0, 1, (size // 8 + 1, size // 8 + 1, 3)).astype(np.float32)
    base = cv2.resize(noise, (size, size), interpolation=cv2.INTER_CUBIC)
    base += rng.normal(0, 0.3, base.shape).astype(np.float32)
    return np.clip(np.array([200, 150, 190], np.float32) + 20 * base, 0, 255).astype(np.uint8)


def run(quick: bool = False) -> list[tuple[Timing, Timing]]:
    """Time each kernel against its library counterpart at 200 x 200 and 400 x 400.

    Args:
        quick: Fewer repeats (a smoke run).

    Returns:
        ``(ours, library)`` timing pairs.
    """
    from skimage.color import rgb2hed

    from pysynth.synth.composite import composite_nuclei, composite_nuclei_reference
    from pysynth.synth.deconv import rgb_to_hed
    from pysynth.synth.inpaint import inpaint
    from pysynth.synth.raster import rasterize_polygons

    cv2.setNumThreads(1)
    opts = {"repeats": 5 if quick else 15, "min_time_s": 0.005 if quick else 0.02}
    pairs = []
    for size in SIZES:
        rng = np.random.default_rng(size)
        xy, offsets, polys = _scene(size, rng)
        tissue = _tissue(size, rng)
        nuclei = (tissue // 2).astype(np.uint8)
        labels, coverage = rasterize_polygons(xy, offsets, (size, size), coverage=True)
        # ~12% of pixels masked for inpainting: a subset of the nuclei.
        keep = np.unique(labels)[1:]
        keep = keep[np.cumsum(np.bincount(labels.ravel())[keep]) <= 0.12 * size * size]
        hole = np.isin(labels, keep).astype(np.uint8)
        sharpness = rng.random((size, size)).astype(np.float32)
        fixed = [(np.round((p - 0.5) * 256)).astype(np.int32) for p in polys]

        def cv2_fill(fixed=fixed, size=size) -> np.ndarray:
            out = np.zeros((size, size), np.int32)
            for k, pts in enumerate(fixed):
                cv2.fillPoly(out, [pts], k + 1, shift=8)
            return out

        fixed4 = [(np.round((4 * p - 0.5) * 256)).astype(np.int32) for p in polys]

        def cv2_fill_and_coverage(size=size, fixed4=fixed4, cv2_fill=cv2_fill) -> tuple[np.ndarray, np.ndarray]:
            fine = np.zeros((4 * size, 4 * size), np.uint8)
            cv2.fillPoly(fine, fixed4, 1, shift=8)
            return cv2_fill(), fine.reshape(size, 4, size, 4).mean(axis=(1, 3), dtype=np.float32)

        px = f"{size}x{size}"
        cases = [
            (
                f"rasterize labels {px} ({len(polys)} polygons) vs cv2.fillPoly",
                lambda xy=xy, offsets=offsets, size=size: rasterize_polygons(xy, offsets, (size, size)),
                cv2_fill,
            ),
            (
                f"rasterize labels+coverage {px} (cv2.fillPoly, 4x4 supersampled)",
                lambda xy=xy, offsets=offsets, size=size: rasterize_polygons(xy, offsets, (size, size), coverage=True),
                cv2_fill_and_coverage,
            ),
            (
                f"rgb_to_hed {px} vs skimage.color.rgb2hed",
                lambda tissue=tissue: rgb_to_hed(tissue),
                lambda tissue=tissue: rgb2hed(tissue),
            ),
            (
                f"inpaint {px} ({hole.mean():.0%} masked) vs cv2.inpaint TELEA r=3",
                lambda tissue=tissue, hole=hole: inpaint(tissue, hole, seed=0),
                lambda tissue=tissue, hole=hole: cv2.inpaint(tissue, hole, 3, cv2.INPAINT_TELEA),
            ),
            (
                f"composite_nuclei {px} vs 2x cv2.GaussianBlur + NumPy",
                lambda a=nuclei, b=tissue, m=coverage, s=sharpness: composite_nuclei(a, b, m, s),
                lambda a=nuclei, b=tissue, m=coverage, s=sharpness: composite_nuclei_reference(a, b, m, s),
            ),
        ]
        cases += _placement_and_paint_cases(size, xy, offsets, polys, tissue, rng)
        for name, ours, library in cases:
            pairs.append((measure(name, ours, **opts), measure(name + " [library]", library, **opts)))
    import torch

    threads = torch.get_num_threads()
    try:
        for name, ours, library in _network_cases() + _label_cases():
            pairs.append((measure(name, ours, **opts), measure(name + " [library]", library, **opts)))
    finally:
        torch.set_num_threads(threads)  # the network cases run on one thread; the caller's setting comes back
    return pairs


def _label_cases() -> list:
    """Per-nucleus reductions over a 576 x 576 instance map from smooth random maps, as post-processing runs them."""
    from pysynth.instances import (
        instance_confidence,
        label_moments,
        label_moments_reference,
        watershed,
    )

    rng = np.random.default_rng(576)
    seg = cv2.GaussianBlur(rng.random((576, 576)).astype(np.float32), (0, 0), 3)
    seg = (seg - seg.min()) / np.ptp(seg)
    det = cv2.GaussianBlur(rng.random((576, 576)).astype(np.float32), (0, 0), 2)
    det = (det - det.min()) / np.ptp(det)
    _, seeds = cv2.connectedComponents(((det > 0.6) & (seg > 0.5)).astype(np.uint8), connectivity=4, ltype=cv2.CV_32S)
    labels = watershed(-seg, seeds, seg > 0.5, connectivity=4)
    n = int(labels.max())

    def numpy_confidence() -> tuple:
        flat = labels.ravel()
        where = np.flatnonzero(flat)
        ids = flat[where]
        count = np.bincount(ids, minlength=n + 1)
        mean = np.bincount(ids, weights=seg.ravel()[where], minlength=n + 1) / np.maximum(count, 1)
        peak = np.zeros(n + 1)
        np.maximum.at(peak, ids, det.ravel()[where])
        return mean, peak

    return [
        (f"label_moments 576x576 ({n} nuclei) vs np.bincount + np.unique", lambda: label_moments(labels),
         lambda: label_moments_reference(labels)),
        (f"label_reduce mean + peak 576x576 ({n} nuclei) vs np.bincount + np.maximum.at",
         lambda: instance_confidence(labels, det, seg), numpy_confidence),
    ]  # fmt: skip


def _network_cases() -> list:
    import torch

    from pysynth.infer.network import keep_freed_memory
    from pysynth.models.unet import upsample_concat, upsample_concat_reference

    torch.set_num_threads(1)
    # As infer and segment run the network: freed memory kept for reuse, so neither side pays fresh page faults
    # for its outputs on every call (the synthesis cases before these have already run).
    keep_freed_memory()
    gen = torch.Generator().manual_seed(0)
    low = torch.randn(1, 16, 288, 288, generator=gen).contiguous(memory_format=torch.channels_last)
    skip = torch.randn(1, 8, 576, 576, generator=gen).contiguous(memory_format=torch.channels_last)

    def ours() -> torch.Tensor:
        with torch.inference_mode():
            return upsample_concat(low, skip)

    def library() -> torch.Tensor:
        with torch.inference_mode():
            return upsample_concat_reference(low, skip)

    from pysynth.models.unet import max_pool

    def ours_pool() -> torch.Tensor:
        with torch.inference_mode():
            return max_pool(skip)

    def library_pool() -> torch.Tensor:
        with torch.inference_mode():
            return torch.nn.functional.max_pool2d(skip, 2)

    return [
        ("upsample_concat 16+8 ch to 576x576 vs F.interpolate + torch.cat", ours, library),
        ("max_pool 8 ch 576x576 -> 288x288 vs F.max_pool2d", ours_pool, library_pool),
    ]


def _placement_and_paint_cases(
    size: int,
    xy: np.ndarray,
    offsets: np.ndarray,
    polys: list[np.ndarray],
    tissue: np.ndarray,
    rng: np.random.Generator,
) -> list:
    """Nucleus placement (C++ vs cv2.fillPoly + NumPy overlap test) and painting (C++ vs its NumPy formula)."""
    from pysynth.synth.paint import paint_nuclei, paint_nuclei_reference
    from pysynth.synth.place import place_polygons

    def cv2_place() -> np.ndarray:
        labels = np.zeros((size, size), np.int32)
        n = 0
        for poly in polys:  # each polygon drawn in its bounding box only
            x0, y0 = np.maximum(np.floor(poly.min(axis=0)).astype(int), 0)
            x1, y1 = np.minimum(np.ceil(poly.max(axis=0)).astype(int) + 1, size)
            if x1 <= x0 or y1 <= y0:
                continue
            window = np.zeros((y1 - y0, x1 - x0), np.uint8)
            shifted = np.round((poly - 0.5 - [x0, y0]) * 16).astype(np.int32)
            cv2.fillPoly(window, [shifted], 1, shift=4)
            inside = window.astype(bool)
            area = int(inside.sum())
            existing = labels[y0:y1, x0:x1]
            if area < 8 or np.count_nonzero(existing[inside]) > 0.15 * area:
                continue
            n += 1
            existing[inside & (existing == 0)] = n
        return labels

    labels, _ = place_polygons(xy.astype(np.float64), offsets, (size, size))
    n = int(labels.max())
    grown = cv2.dilate(labels.astype(np.uint16), cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5)))
    fg = (labels > 0).astype(np.uint8)
    region = fg + cv2.erode(fg, np.ones((5, 5), np.uint8))
    sharp = cv2.GaussianBlur(fg * 255, (3, 3), 0.4)
    soft = cv2.blur(cv2.blur(fg * 255, (3, 3)), (5, 5))

    def field() -> np.ndarray:
        return rng.standard_normal((size, size)).astype(np.float32)

    args = (
        tissue,
        labels,
        grown,
        region,
        sharp,
        soft,
        rng.random((size, size)).astype(np.float32),
        rng.uniform(0.2, 1.5, n + 1).astype(np.float32),
        rng.random(n + 1) < 0.3,
        field(),
        field(),
        rng.random((size, size)).astype(np.float32),
        field(),
    )
    kw = {"stain": np.array([0.6, 0.7, 0.35], np.float32), "gain_lo": 0.67, "gain_span": 0.66}
    px = f"{size}x{size}"
    from skimage.segmentation import watershed as skimage_watershed

    from pysynth.instances import trace_contours, watershed

    seg = cv2.GaussianBlur((labels > 0).astype(np.float32), (0, 0), 1.5)
    markers = np.zeros((size, size), np.int32)
    for k, (y, x) in enumerate(rng.integers(0, size, (max(1, n), 2)), start=1):
        markers[y, x] = k
    foreground = seg > 0.33
    elevation = -seg
    from scipy.ndimage import find_objects

    def cv2_contours() -> list:
        out = []
        for k, box in enumerate(find_objects(labels), start=1):  # each nucleus in its bounding box
            if box is not None:
                window = (labels[box] == k).astype(np.uint8)
                out.append(cv2.findContours(window, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)[0])
        return out

    return [
        (
            f"trace_contours {px} ({n} nuclei) vs cv2.findContours per nucleus",
            lambda: trace_contours(labels),
            cv2_contours,
        ),
        (
            f"watershed {px} (instances of {n} nuclei) vs skimage.segmentation.watershed",
            lambda: watershed(elevation, markers, foreground),
            lambda: skimage_watershed(elevation, markers, mask=foreground),
        ),
        (
            f"place_polygons {px} ({len(polys)} candidates) vs cv2.fillPoly + NumPy overlap test",
            lambda: place_polygons(xy.astype(np.float64), offsets, (size, size)),
            cv2_place,
        ),
        (
            f"paint_nuclei {px} vs the same formula in NumPy",
            lambda: paint_nuclei(*args, **kw),
            lambda: paint_nuclei_reference(*args, **kw),
        ),
    ]


def main(argv: list[str] | None = None) -> None:
    """Print the table (and optionally write JSON)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--json", help="also write the timings to this JSON file")
    args = parser.parse_args(argv)
    pairs = run(args.quick)
    rows = [
        [
            ours.name,
            f"{ours.median_s * 1e3:.3f}",
            f"{(ours.p75_s - ours.p25_s) * 1e3:.3f}",
            f"{lib.median_s * 1e3:.3f}",
            f"{lib.median_s / ours.median_s:.1f}x",
        ]
        for ours, lib in pairs
    ]
    print("C++ kernels, one thread (cv2.setNumThreads(1), torch.set_num_threads(1)); median ms per call")
    print(format_table(rows, ["case", "pysynth ms", "IQR ms", "library ms", "speed-up"]))
    if args.json:
        write_json(args.json, "kernels", [t for pair in pairs for t in pair])


if __name__ == "__main__":
    main()

"""Whole-slide inference end to end, against the classical pipeline on the same regions, and its peak memory.

The slides are pyramidal deflate-compressed TIFFs at 0.25 µm/px (40x) of real tissue from the bundled slide on
white glass, written by :mod:`pysynth.bench.make_slide` into a temporary folder. ``infer_slide`` runs with the
default :class:`~pysynth.infer.InferConfig` and the shipped model, exactly as ``pysynth infer`` would: tissue mask,
colour fit, then per region read, normalise, U-Net, instances and a part written, and finally ``nuclei.geojson``,
``csv/``, ``overlay.png`` and ``summary.json``. Its rate is region-core pixels (at 0.25 µm/px) per second of that
whole run (the model is loaded beforehand). The baseline is the classical pipeline (colour deconvolution, Otsu,
watershed) on the same region windows, read the same way, with no outputs written: a generous baseline.

Peak memory is measured in a fresh process per slide (its peak resident set size at exit), for a small and a
large slide holding the same tissue and for the large slide with more tissue, so the table shows whether memory
grows with the slide's extent or its tissue.

Usage of the child: ``python -m pysynth.bench.infer SLIDE OUT_DIR [--core PX] [--margin PX] [--device D]`` runs
one slide and prints one JSON line (peak RSS, seconds, regions, pixels, nuclei).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from pysynth.bench.harness import Timing
from pysynth.infer import InferConfig

STAGES = ("prepare", "read", "normalise", "network", "post", "write")
STAGE_NAMES = {
    "prepare": "tissue mask + colour fit (once)",
    "read": "read/decode",
    "normalise": "normalise",
    "network": "network",
    "post": "post",
    "write": "write",
}


@dataclass(frozen=True)
class Plan:
    """Sizes of one run of the section.

    Attributes:
        side: Side of the end-to-end slide, px at 0.25 µm/px.
        tissue_mpx: Tissue on it, Mpx (one piece grown from the centre, cells of ``block``).
        block: Tissue cell side of the end-to-end slide.
        rss_sides: Sides of the small and the large slide of the memory cases.
        rss_more: Regions of tissue (rows, columns) of the large slide with more tissue (the others have one).
        config: Inference settings.
    """

    side: int
    tissue_mpx: float
    block: int
    rss_sides: tuple[int, int]
    rss_more: tuple[int, int]
    config: InferConfig = field(default_factory=InferConfig)


QUICK = Plan(side=2048, tissue_mpx=2.0, block=1024, rss_sides=(2048, 8192), rss_more=(1, 2))
FULL = Plan(side=16384, tissue_mpx=60.0, block=1024, rss_sides=(8000, 40000), rss_more=(4, 4))


def _single(name: str, seconds: float, pixels: float, **extra) -> Timing:
    """A one-shot timing (a whole-slide run is long enough to time once)."""
    return Timing(name, seconds, seconds, seconds, 1, items_per_call=pixels, unit="px", extra=extra)


def _owned_objects(labels: np.ndarray, margin: int, h: int, w: int) -> int:
    """Labelled objects whose centroid lies in the window's core (``h × w`` inside a ``margin``)."""
    n = int(labels.max())
    if n == 0:
        return 0
    flat = labels.ravel()
    counts = np.bincount(flat, minlength=n + 1).astype(np.float64)
    rows, cols = np.divmod(np.arange(flat.size, dtype=np.float64), labels.shape[1])
    cy = np.bincount(flat, weights=rows, minlength=n + 1) / np.maximum(counts, 1) + 0.5
    cx = np.bincount(flat, weights=cols, minlength=n + 1) / np.maximum(counts, 1) + 0.5
    inside = (counts > 0) & (cy >= margin) & (cy < margin + h) & (cx >= margin) & (cx < margin + w)
    inside[0] = False
    return int(inside.sum())


def time_split(timings: dict[str, float], seconds: float) -> str:
    """The per-stage seconds of a ``summary.json`` as one line, with each stage's share of the wall time."""
    parts = [f"{STAGE_NAMES[k]} {timings[k]:.2f} s ({timings[k] / seconds:.0%})" for k in STAGES if k in timings]
    return ", ".join(parts) + f"; wall {seconds:.2f} s"


def classical_on_regions(path: Path, mpp: float, config: InferConfig) -> dict:
    """The classical pipeline on every region ``infer_slide`` would process, timed like it.

    Timed: opening the slide, the tissue mask, planning, reading each region's window and segmenting it.
    Untimed: counting the objects whose centroid lies in the region's core. Pixels with a zero channel are
    raised to 1 first: ``rgb2hed`` takes their logarithm, and the resulting outliers otherwise pull Otsu's
    threshold above all nuclei.
    """
    from pysynth.bench.classical import classical_instances
    from pysynth.infer import plan_regions, read_window
    from pysynth.io import compute_tissue_mask, open_slide

    started = time.perf_counter()
    untimed, objects, read_s = 0.0, 0, 0.0
    with open_slide(path) as reader:
        tissue = compute_tissue_mask(reader)
        regions = plan_regions(reader, mpp, config, tissue)
        for region in regions:
            t0 = time.perf_counter()
            window = read_window(reader, region, mpp, config.margin)
            read_s += time.perf_counter() - t0
            labels = classical_instances(np.maximum(window, 1))
            t1 = time.perf_counter()
            objects += _owned_objects(labels, config.margin, region.h, region.w)
            untimed += time.perf_counter() - t1
    return {
        "seconds": time.perf_counter() - started - untimed,
        "read_s": read_s,
        "regions": len(regions),
        "pixels": float(sum(r.w * r.h for r in regions)),
        "objects": objects,
    }


def end_to_end(path: Path, model, info, folder: Path, config: InferConfig, out_dir: Path) -> list:
    """``infer_slide`` on one slide next to the classical pipeline on its regions: a timing pair and notes."""
    import torch

    from pysynth.bench.classical import classical_instances
    from pysynth.infer import infer_slide, model_digest
    from pysynth.io import open_slide
    from pysynth.segment import predict_maps

    # One-off costs (lazy imports, first kernel set-up) are paid before either clock starts.
    blank = np.full((256, 256, 3), 200, np.uint8)
    blank[64:128, 64:128] = (90, 40, 140)
    predict_maps(model, blank)
    classical_instances(blank)
    with open_slide(path) as reader:
        infer_slide(reader, model, info, out_dir, config=config, model_id=model_digest(folder), overwrite=True)
    summary = json.loads((out_dir / "summary.json").read_text())
    classical = classical_on_regions(path, info.mpp, config)
    seconds, pixels = float(summary["seconds"]), float(summary["pixels"])
    regions = int(summary["regions"])
    window = config.core + 2 * config.margin
    ours = _single(
        f"infer_slide end to end, {regions} regions of {config.core}² (+{config.margin} px margin)",
        seconds,
        pixels,
        stages_s=summary["timings"],
        nuclei=summary["nuclei"],
        device=summary["device"],
    )
    baseline = _single(
        f"classical pipeline, same {classical['regions']} regions (read + deconvolution/Otsu/watershed, no outputs)",
        classical["seconds"],
        classical["pixels"],
        objects=classical["objects"],
        read_s=classical["read_s"],
    )
    notes = {
        "device": f"{summary['device']}, {torch.get_num_threads()} torch threads",
        "regions": f"{regions} of {config.core}² px cores, each read as a {window}² window; "
        f"{pixels / 1e6:.1f} Mpx of cores, {summary['tissue_mm2']} mm² of tissue",
        "end_to_end_mpx_per_s": summary["megapixels_per_s"],
        "classical_mpx_per_s": round(classical["pixels"] / classical["seconds"] / 1e6, 3),
        "nuclei": f"pysynth {summary['nuclei']:,}; classical {classical['objects']:,} objects "
        "(centroids in region cores)",
        "time_split": time_split(summary["timings"], seconds)
        + " — seconds summed per stage over regions; read/decode and normalise of the next region, and post and "
        "write of the previous one, run in threads beside the network, so stages overlap and their sum exceeds the "
        "wall time; prepare (tissue mask, colour fit) runs once per slide, write includes the final outputs",
        "stage_seconds": summary["timings"],
        "classical_read_s": round(classical["read_s"], 2),
    }
    if classical["regions"] != regions:
        notes["warning"] = f"the baseline planned {classical['regions']} regions, infer_slide {regions}"
    return [(ours, baseline), notes]


def coarser_model_row(path: Path, name: str, config: InferConfig, out_dir: Path, slide_px: float) -> list:
    """``infer_slide`` with a coarser shipped model (``native20x``, 0.5 µm/px) on the same slide, as a timing.

    Its rate counts ``slide_px``, the region cores of the default model's row (the same slide and tissue), so rates
    compare as inverse wall times for the whole slide. Its own regions, planned at its resolution, cover more glass
    around the tissue; counting their area would flatter it.
    """
    from pysynth.infer import infer_slide, inference_model, model_digest
    from pysynth.io import open_slide
    from pysynth.models.io import resolve_model_dir
    from pysynth.segment import predict_maps

    folder = resolve_model_dir(name)
    model, info = inference_model(str(folder))
    predict_maps(model, np.full((256, 256, 3), 200, np.uint8))
    with open_slide(path) as reader:
        infer_slide(reader, model, info, out_dir, config=config, model_id=model_digest(folder), overwrite=True)
    summary = json.loads((out_dir / "summary.json").read_text())
    row = _single(
        f"infer_slide with `{name}` ({info.mpp} µm/px), the same slide (rate over the default's region cores)",
        float(summary["seconds"]),
        slide_px,
        stages_s=summary["timings"],
        nuclei=summary["nuclei"],
    )
    return [row, {f"{name}_time_split": time_split(summary["timings"], float(summary["seconds"]))}]


def nucleus_agreement(a: Path, b: Path) -> dict:
    """How far two GeoJSONs of the same slide hold the same nuclei (``b`` against the reference ``a``).

    Each nucleus of ``a`` is scored by its best IoU with a polygon of ``b`` (shapely, exact polygon areas): the
    share at IoU >= 0.98 and >= 0.9, and the relative difference of the counts.
    """
    import shapely

    def polygons(path: Path) -> np.ndarray:
        features = json.loads(path.read_text())["features"]
        return np.array([shapely.Polygon(f["geometry"]["coordinates"][0]) for f in features], dtype=object)

    pa, pb = polygons(a), polygons(b)
    best = np.zeros(len(pa))
    if len(pa) and len(pb):
        ia, ib = shapely.STRtree(pb).query(pa, predicate="intersects")
        inter = shapely.area(shapely.intersection(pa[ia], pb[ib]))
        iou = inter / (shapely.area(pa[ia]) + shapely.area(pb[ib]) - inter)
        np.maximum.at(best, ia, iou)
    return {
        "nuclei": [len(pa), len(pb)],
        "share_iou_0.98": round(float(np.mean(best >= 0.98)), 4) if len(pa) else None,
        "share_iou_0.9": round(float(np.mean(best >= 0.9)), 4) if len(pa) else None,
        "count_change": round((len(pb) - len(pa)) / max(len(pa), 1), 4),
    }


def cpu_bf16_units() -> bool:
    """Whether this CPU has bf16 arithmetic units (AVX-512 BF16 or AMX), where bf16 autocast can pay."""
    import torch

    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # a torch without the probes
        return False


def precision_row(path: Path, model, info, folder: Path, config: InferConfig, out_dir: Path, ref_dir: Path,
                  slide_px: float) -> list:  # fmt: skip
    """``infer_slide`` in bf16 autocast on the same slide, as a timing, and its nuclei against the fp32 run's."""
    from dataclasses import replace

    from pysynth.infer import GEOJSON, infer_slide, model_digest
    from pysynth.io import open_slide

    bf16 = replace(config, precision="bf16")
    with open_slide(path) as reader:
        infer_slide(reader, model, info, out_dir, config=bf16, model_id=model_digest(folder), overwrite=True)
    summary = json.loads((out_dir / "summary.json").read_text())
    row = _single(
        "infer_slide, network in bf16 autocast (CPU bf16 units), the same slide",
        float(summary["seconds"]),
        slide_px,
        stages_s=summary["timings"],
        nuclei=summary["nuclei"],
    )
    agreement = nucleus_agreement(ref_dir / GEOJSON, out_dir / GEOJSON)
    (na, nb), change = agreement["nuclei"], agreement["count_change"]
    notes = {
        "bf16_time_split": time_split(summary["timings"], float(summary["seconds"])),
        "bf16_nuclei": f"{agreement['share_iou_0.98']:.1%} of the fp32 run's nuclei have one at IoU >= 0.98 in "
        f"bf16, {agreement['share_iou_0.9']:.1%} at >= 0.9; {na:,} -> {nb:,} nuclei ({change:+.2%})",
        "bf16_agreement": agreement,
    }
    return [row, notes]


def centred_cells(side: int, regions_hw: tuple[int, int], core: int) -> tuple[list[tuple[int, int]], int]:
    """Tissue cells filling the middle ``core/2`` square of each of ``rows × cols`` regions at the slide's centre.

    Cells are ``core // 4`` px; each region gets a ``core/2`` square of tissue ``core/4`` px from every edge of its
    core, so the tissue mask's blur never reaches a neighbouring region: exactly ``rows · cols`` regions are
    processed, whatever the slide's size. Returns ``(cells, block)``.

    Raises:
        ValueError: If the slide has fewer whole regions than asked for along a side.
    """
    block = core // 4
    whole = side // core
    rows, cols = regions_hw
    if whole < max(rows, cols):
        raise ValueError(f"a {side} px slide has {whole} whole {core} px regions per side, fewer than {rows}x{cols}")
    top, left = whole // 2 - rows // 2, whole // 2 - cols // 2
    cells = [
        (4 * i + a, 4 * j + b)
        for i in range(top, top + rows)
        for j in range(left, left + cols)
        for a in (1, 2)
        for b in (1, 2)
    ]
    return cells, block


def peak_rss(path: Path, out_dir: Path, config: InferConfig, device: str = "cpu") -> dict:
    """Infer one slide in a fresh Python process and return what it reports (peak RSS, seconds, regions, ...).

    Raises:
        RuntimeError: If the child fails (its stderr's tail is in the message).
    """
    command = [
        sys.executable, "-m", "pysynth.bench.infer", str(path), str(out_dir),
        "--core", str(config.core), "--margin", str(config.margin), "--device", device,
    ]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"inference child failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def memory_cases(plan: Plan, source: np.ndarray, mpp: float, workdir: Path, device: str) -> dict:
    """Peak RSS of a fresh process per slide: small and large slide with the same tissue, large with more."""
    from pysynth.bench.make_slide import write_pyramidal_tiff
    from pysynth.infer import ColourModel

    core = plan.config.core
    window = core + 2 * plan.config.margin
    small, large = plan.rss_sides
    cases = [(small, (1, 1)), (large, (1, 1)), (large, plan.rss_more)]
    rows = []
    for i, (side, regions) in enumerate(cases):
        cells, block = centred_cells(side, regions, core)
        path = workdir / f"rss-{i}.tiff"
        t0 = time.perf_counter()
        layout = write_pyramidal_tiff(path, source, side, mpp, tissue_cells=cells, block=block, seed=i)
        written = time.perf_counter() - t0
        child = peak_rss(path, workdir / f"rss-out-{i}", plan.config, device)
        rows.append(
            {
                "slide_px": side,
                "tissue_mpx": round(layout.tissue_px / 1e6, 2),
                "levels": len(layout.level_shapes_hw),
                "file_mb": round(path.stat().st_size / 1e6, 1),
                "write_s": round(written, 1),
                **child,
            }
        )
        path.unlink()
    text = "; ".join(
        f"{r['slide_px']:,}² px slide, {r['regions']} region(s), {r['tissue_mpx']} Mpx tissue: "
        f"{r['peak_mb']:,.0f} MB (after loading {r['setup_peak_mb']:,.0f} MB; {r['seconds']:.1f} s)"
        for r in rows
    )
    growth = rows[1]["peak_mb"] - rows[0]["peak_mb"]
    more = rows[2]["peak_mb"] - rows[1]["peak_mb"]
    return {
        "peak_rss": text,
        "peak_rss_growth": f"{growth:+,.0f} MB for {(large / small) ** 2:.0f}x the slide area, "
        f"{more:+,.0f} MB for {math.prod(plan.rss_more)}x the tissue",
        "peak_rss_bound": f"peak = after loading (interpreter, torch, model: {rows[0]['setup_peak_mb']:,.0f} MB) + "
        f"one region's working set ({rows[0]['peak_mb'] - rows[0]['setup_peak_mb']:,.0f} MB for a lone region "
        f"here), dominated by the network's activations for one {window}² window run in one pass (fp32; they "
        "scale with the window's area, so a smaller core lowers the bound); from two regions on, the next "
        "window's read and the previous one's post-processing overlap the network, which adds a little once and "
        "nothing more with further regions or nuclei (finished regions wait on disk, the GeoJSON is streamed). "
        "Slide-wide arrays grow with the slide only up to a cap: the tissue mask (at most 4,096 px a side, reached "
        "at 16,384 px at 0.25 µm/px; its float64 integral table is kept through the run) and the overlay (at most "
        "8,000 px a side)"
        + (", plus the 64 MB colour look-up table of runs with many regions" if hasattr(ColourModel, "lut") else ""),
        "peak_rss_cases": rows,
    }


def run(quick: bool = False) -> list:
    """End-to-end whole-slide inference next to the classical pipeline, and peak memory across slide sizes."""
    from pysynth.bench.make_slide import load_source, write_pyramidal_tiff
    from pysynth.infer import inference_model
    from pysynth.models.io import default_model_dir
    from pysynth.segment import resolve_device

    plan = QUICK if quick else FULL
    folder = default_model_dir()
    device = resolve_device("auto")
    model, info = inference_model(str(folder))
    model = model.to(device)
    source = load_source(info.mpp)
    with tempfile.TemporaryDirectory(prefix="pysynth-bench-infer-") as tmp:
        workdir = Path(tmp)
        path = workdir / "slide.tiff"
        t0 = time.perf_counter()
        layout = write_pyramidal_tiff(
            path, source, plan.side, info.mpp, tissue_fraction=plan.tissue_mpx * 1e6 / plan.side**2, block=plan.block
        )
        written = time.perf_counter() - t0
        slide = {
            "slide": f"{plan.side:,}² px at {info.mpp} µm/px, pyramidal tiled TIFF (deflate, "
            f"{len(layout.level_shapes_hw)} levels, {path.stat().st_size / 1e6:.0f} MB, written in {written:.1f} s); "
            f"{layout.tissue_px / 1e6:.1f} Mpx ({layout.tissue_fraction:.0%}) of real tissue from the bundled slide",
        }
        rows = end_to_end(path, model, info, folder, plan.config, workdir / "out")
        from pysynth.models.io import SHIPPED

        if "native20x" in SHIPPED:
            ours, baseline = rows[0]
            row, notes = coarser_model_row(path, "native20x", plan.config, workdir / "out20x", ours.items_per_call)
            notes["native20x_vs_classical"] = round(row.rate / baseline.rate, 3)
            notes["native20x_vs_default"] = round(row.rate / ours.rate, 3)
            rows[1].update(notes)
            rows.insert(1, row)
        if device.type == "cpu":
            ours, baseline = rows[0]
            if cpu_bf16_units():
                row, notes = precision_row(
                    path, model, info, folder, plan.config, workdir / "outbf16", workdir / "out", ours.items_per_call
                )
                notes["bf16_vs_fp32"] = round(row.rate / ours.rate, 3)
                notes["bf16_vs_classical"] = round(row.rate / baseline.rate, 3)
                rows[-1].update(notes)
                rows.insert(-1, row)
            else:
                rows[-1]["bf16"] = "not run: this CPU has no bf16 units (AVX-512 BF16 or AMX)"
        rows.append(slide)
        rows.append(memory_cases(plan, source, info.mpp, workdir, device.type))
    return rows


def main(argv: list[str] | None = None) -> None:
    from pysynth.bench.make_slide import peak_rss_mb

    parser = argparse.ArgumentParser(description="Infer one slide and print peak RSS and timings as JSON.")
    parser.add_argument("slide", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--core", type=int, default=InferConfig.core)
    parser.add_argument("--margin", type=int, default=InferConfig.margin)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--keep-dye", action="store_true", help="keep objects of marking dye's colours")
    args = parser.parse_args(argv)

    from pysynth.infer import infer_slide, inference_model, model_digest
    from pysynth.io import open_slide
    from pysynth.models.io import default_model_dir

    folder = default_model_dir()
    model, info = inference_model(str(folder))
    model = model.to(args.device)
    setup = peak_rss_mb()
    config = InferConfig(core=args.core, margin=args.margin, keep_dye=args.keep_dye)
    with open_slide(args.slide) as reader:
        result = infer_slide(reader, model, info, args.out, config=config, model_id=model_digest(folder))
    record = {
        "peak_mb": round(peak_rss_mb(), 1),
        "setup_peak_mb": round(setup, 1),
        **{k: v for k, v in asdict(result).items() if k in ("seconds", "regions", "pixels", "nuclei")},
    }
    print(json.dumps(record))


if __name__ == "__main__":
    main()

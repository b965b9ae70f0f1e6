"""How ``infer`` runs the network on a region, measured: pass sizes, exact tiles, torch.compile, seam exactness.

Usage::

    python -m pysynth.bench.network_layout [--threads 2] [--section NAME ...] [--json OUT]

All on real tissue of the bundled slide at 0.25 µm/px with the shipped default model, in one process, so the
rates are comparable within the run (the host's absolute speed moves between runs):

- ``passes``: Mpx/s of single network passes of 512² to 2,304² (best of 3), showing the cache effect;
- ``tiles``: one 2,304² window (an ``infer`` region with its margin) in one pass against exact tiles
  (:func:`pysynth.segment.predict_maps` with ``context``), with the largest map difference against one pass;
- ``compile``: eager against ``torch.compile`` on 2,304² and 1,024² passes, and the compilation time;
- ``seams``: ``infer_slide`` on a 560×720 region in small regions (core, margin) against one region: nuclei
  counts and how many differ (IoU < 0.95), for pairs on and off the pooling grid (the CLI refuses the latter);
- ``joins``: a 2,304² pass of the inference copy with its pooling and decoder joins in the compiled core
  (:func:`pysynth.models.unet.upsample_concat`, ``max_pool``) against the same network with PyTorch's, alternated
  12 times: medians, the paired ratio and the largest logit difference;
- ``contention``: a 2,304² pass alone, then beside a busy helper thread (OpenCV blurs, as reading and
  post-processing are) at the normal priority and at the helpers' lowered one (:func:`pysynth.infer.run.
  yield_to_network`, what ``infer`` does).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

#: ``(name, core, context)`` of the tilings of a 2,304² window.
TILINGS = (
    ("one pass", 4096, 128),
    ("cores 1152, context 128", 1152, 128),
    ("cores 768, context 128", 768, 128),
    ("cores 1152, context 96", 1152, 96),
)


def _best(fn, n: int = 3) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def _iou_misses(a: np.ndarray, b: np.ndarray) -> int:
    """Instances of ``a`` whose best IoU with an instance of ``b`` is below 0.95."""
    from pysynth.metrics import best_iou

    return int(np.sum(best_iou(a, b) < 0.95))


SECTIONS = ("passes", "tiles", "compile", "seams", "contention", "joins")


def joins(model: Any, window: np.ndarray, rounds: int = 12) -> dict[str, float]:
    """One 2,304² pass with the compiled core's pooling and joins (``model.fused``) against PyTorch's, alternated."""
    import statistics

    from pysynth.models.io import normalise

    x = normalise(torch.from_numpy(window[None]).permute(0, 3, 1, 2)).contiguous(memory_format=torch.channels_last)
    seconds: dict[bool, list[float]] = {True: [], False: []}
    outputs = {}
    was = model.fused
    try:
        with torch.inference_mode():
            for _ in range(rounds):
                for fused in (False, True):
                    model.fused = fused
                    t = time.perf_counter()
                    outputs[fused] = model(x)
                    seconds[fused].append(time.perf_counter() - t)
    finally:
        model.fused = was
    return {
        "pytorch_s": round(statistics.median(seconds[False]), 3),
        "core_s": round(statistics.median(seconds[True]), 3),
        "paired_ratio": round(statistics.median(a / b for a, b in zip(seconds[False], seconds[True], strict=True)), 3),
        "max_logit_difference": float((outputs[True] - outputs[False]).abs().max()),
    }


def contention(model: Any, window: np.ndarray) -> dict[str, float]:
    """Mpx/s of a one-pass network call on ``window`` alone and beside a busy thread at two priorities (best of 3)."""
    import threading

    import cv2

    from pysynth.infer.run import yield_to_network
    from pysynth.segment import predict_maps

    def rate() -> float:
        return window.shape[0] * window.shape[1] / _best(lambda: predict_maps(model, window, tile=4096)) / 1e6

    predict_maps(model, window, tile=4096)
    out = {"alone": round(rate(), 2)}
    for name, lower in (("beside a busy thread", False), ("beside a busy thread at the helpers' priority", True)):
        stop = threading.Event()

        def busy(lower: bool = lower, stop: threading.Event = stop) -> None:
            if lower:
                yield_to_network()
            a = np.random.default_rng(0).random((2000, 2000), dtype=np.float32)
            while not stop.is_set():
                cv2.GaussianBlur(a, (0, 0), 3)

        thread = threading.Thread(target=busy)
        thread.start()
        try:
            out[name] = round(rate(), 2)
        finally:
            stop.set()
            thread.join()
    return out


def run(threads: int = 2, sections: tuple[str, ...] = SECTIONS) -> dict[str, Any]:
    """The chosen sections (all by default); returns the JSON-able results."""
    import pysynth.infer.config as infer_config
    from pysynth import data_path
    from pysynth.infer import InferConfig, infer_slide, inference_model, keep_freed_memory, rasterise
    from pysynth.io import ArrayReader, open_slide, read_region
    from pysynth.models.io import default_model_dir
    from pysynth.segment import _predict_maps_once, predict_maps

    torch.set_num_threads(threads)
    keep_freed_memory()
    with open_slide(data_path("CMU-1-Small-Region.svs")) as slide:
        window = np.ascontiguousarray(read_region(slide, 600, 800, (2304, 2304), 0.25))
        region = np.ascontiguousarray(read_region(slide, 900, 1200, (560, 720), 0.25))
    model, info = inference_model(str(default_model_dir()))
    out: dict[str, Any] = {"threads": threads}

    if "contention" in sections:
        out["contention_mpx_per_s"] = contention(model, window)
    if "joins" in sections:
        out["joins"] = joins(model, window)
    passes = {}
    for side in (512, 1024, 1280, 2304) if "passes" in sections else ():
        x = np.ascontiguousarray(window[:side, :side])
        _predict_maps_once(model, x, tile=side, overlap=0, batch=1)
        passes[f"{side}²"] = round(
            side * side / _best(lambda x=x, s=side: _predict_maps_once(model, x, tile=s, overlap=0)) / 1e6, 2
        )
    if passes:
        out["passes_mpx_per_s"] = passes

    ref = predict_maps(model, window, tile=4096, context=128) if "tiles" in sections else None
    tiles = {}
    for name, tile, context in TILINGS if "tiles" in sections else ():
        seconds = _best(lambda t=tile, c=context: predict_maps(model, window, tile=t, context=c))
        maps = predict_maps(model, window, tile=tile, context=context)
        diff = max(float(np.abs(a - b).max()) for a, b in zip(maps, ref, strict=True))
        tiles[name] = {"mpx_per_s": round(window.size / 3 / seconds / 1e6, 2), "max_map_difference": diff}
    if tiles:
        out["tiles_of_a_2304_window"] = tiles

    compiled = {}
    with torch.no_grad():
        for side in (2304, 1024) if "compile" in sections else ():
            x = torch.randn(1, 3, side, side).contiguous(memory_format=torch.channels_last)
            model(x)
            eager = side * side / _best(lambda x=x: model(x)) / 1e6
            fast = torch.compile(model, dynamic=False)
            t = time.perf_counter()
            fast(x)
            compile_s = time.perf_counter() - t
            rate = side * side / _best(lambda x=x, f=fast: f(x)) / 1e6
            compiled[f"{side}²"] = {
                "eager": round(eager, 2),
                "compiled": round(rate, 2),
                "compile_s": round(compile_s, 1),
            }
    if compiled:
        out["compile_mpx_per_s"] = compiled
    if "seams" not in sections:
        return out

    def nuclei(config: InferConfig) -> np.ndarray:
        with tempfile.TemporaryDirectory() as tmp:
            infer_slide(ArrayReader(region, 0.25), model, info, Path(tmp), config=config, model_id="bench")
            features = json.loads((Path(tmp) / "nuclei.geojson").read_text())["features"]
        return rasterise(features, region.shape[:2])

    limit = infer_config.MIN_MARGIN
    infer_config.MIN_MARGIN = 0  # measure the margins the CLI refuses too
    try:
        whole = nuclei(InferConfig(core=2048))
        seams = {}
        for core, margin in (
            (160, 128),
            (112, 128),
            (208, 128),
            (160, 96),
            (160, 64),
            (160, 32),
            (104, 128),
            (200, 128),
        ):
            tiled = nuclei(InferConfig(core=core, margin=margin))
            seams[f"core {core}, margin {margin}"] = {
                "nuclei": int(tiled.max()), "one_pass": int(whole.max()), "iou_below_0.95": _iou_misses(whole, tiled)
            }  # fmt: skip
    finally:
        infer_config.MIN_MARGIN = limit
    out["seams"] = seams
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--section", action="append", choices=SECTIONS, help="Run only these (repeatable).")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    result = run(args.threads, tuple(args.section) if args.section else SECTIONS)
    text = json.dumps(result, indent=1)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()

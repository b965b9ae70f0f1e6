"""Segmentation throughput on real tissue: the network, instance post-processing, and both together.

The input is a region of the bundled Aperio slide read at 0.25 µm/px (the model's resolution). Rates are input
pixels per second at 0.25 µm/px. Baselines: the same network in PyTorch's default (NCHW) memory format, and in
bf16 autocast, so the table says what channels-last and reduced precision buy on this CPU.
"""

from __future__ import annotations

import torch

from pysynth.bench.harness import measure


def run(quick: bool = False) -> list:
    """Timings of ``segment``'s parts on one real region with the shipped model."""
    from pysynth import data_path
    from pysynth.instances import instances_from_maps
    from pysynth.io import open_slide, read_region
    from pysynth.models.io import load_model
    from pysynth.models.unet import flops_per_pixel, fold_batchnorm
    from pysynth.segment import predict_maps, segment_rgb

    raw, info = load_model()
    model = fold_batchnorm(raw).to(memory_format=torch.channels_last)  # what `segment` runs
    side = 512 if quick else 1024
    with open_slide(data_path("CMU-1-Small-Region.svs")) as slide:
        # A tissue-rich region (level-0 pixels at 0.499 µm/px), read at the model's 0.25 µm/px.
        rgb = read_region(slide, 700, 1400, (side, side), info.mpp)
    px = side * side
    reps = {"repeats": 3 if quick else 5, "warmup": 1, "min_time_s": 0.0}
    det, seg = predict_maps(model, rgb)
    n = int(instances_from_maps(det, seg, info.instances).max())
    rows: list = [
        {
            "model": f"width {info.unet.width}, depth {info.unet.depth}",
            "kflop_per_px": round(flops_per_pixel(model) / 1e3, 1),
            "threads": torch.get_num_threads(),
            "region": f"{side}x{side} px at {info.mpp} µm/px, {n} nuclei",
        }
    ]
    with torch.no_grad():
        network = measure(
            f"network {side}² fp32 channels-last, BatchNorm folded (segment's tiling)",
            lambda: predict_maps(model, rgb),
            items_per_call=px,
            unit="px",
            **reps,
        )
        unfolded = raw.to(memory_format=torch.channels_last)
        rows.append(
            measure(
                f"network {side}² fp32 channels-last, BatchNorm unfolded",
                lambda: predict_maps(unfolded, rgb),
                items_per_call=px,
                unit="px",
                **reps,
            )
        )
        nchw = torch.from_numpy(rgb).permute(2, 0, 1)[None].float().div(127.5).sub(1).contiguous()
        plain = load_model()[0]  # as loaded: NCHW weights, BatchNorm unfolded
        default = measure(
            f"network {side}² fp32 NCHW, one pass (torch default)",
            lambda: plain(nchw),
            items_per_call=px,
            unit="px",
            **reps,
        )
        rows.append((network, default))
        bf16_ok = True
        try:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                model(nchw[..., :256, :256])
        except RuntimeError:
            bf16_ok = False
        if bf16_ok and not quick:

            def bf16() -> None:
                predict_maps(model, rgb, precision="bf16")

            bf16_timing = measure(f"network {side}² bf16 autocast", bf16, items_per_call=px, unit="px", **reps)
            bf16_timing.extra["baseline"] = network.name
            rows.append(bf16_timing)
    post = measure(
        f"instances {side}² (seeds, watershed, clean-up)",
        lambda: instances_from_maps(det, seg, info.instances),
        items_per_call=px,
        unit="px",
        **reps,
    )
    rows.append(post)
    total = measure(
        f"segment {side}² (network + instances)",
        lambda: segment_rgb(model, info, rgb, info.mpp),
        items_per_call=px,
        unit="px",
        **reps,
    )
    rows.append(total)
    rows.append(
        {"segment_mpx_per_s": round(total.rate / 1e6, 3), "network_share": round(network.median_s / total.median_s, 2)}
    )
    return rows

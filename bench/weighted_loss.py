"""The fused importance-weighted two-head loss (Triton) next to the eager PyTorch composition, forward + backward.

Run ``python -m pysynth.bench.weighted_loss [--quick] [--json PATH]`` on a CUDA GPU. A training batch: N patches
of two logit heads, detection and segmentation targets, border pixel weights and a 5 x 5 discriminator map each;
one call is the per-sample loss, its mean and the gradient w.r.t. the logits. Without ``--quick`` a
``torch.compile``'d composition is timed too (the stronger baseline a custom kernel has to beat).
"""

from __future__ import annotations

import argparse
import dataclasses

from pysynth.bench.harness import format_table, measure, write_json

# (N, H, W): the segmenter's batch at the paper's 256 px crops, and at 400 px, the GAN's patch size.
CASES = ((16, 256, 256), (8, 400, 400))


def _batch(n: int, h: int, w: int, dtype, device) -> tuple:
    import torch

    from pysynth.train.targets import border_weights

    g = torch.Generator(device=device).manual_seed(n * h)
    logits = 3 * torch.randn(n, 2, h, w, generator=g, device=device, dtype=dtype)
    detection = (torch.rand(n, h, w, generator=g, device=device) > 0.9).float()
    segmentation = (torch.rand(n, h, w, generator=g, device=device) > 0.6).float()
    weights = torch.from_numpy(border_weights((h, w), border=min(50, h // 4))).to(device).expand(n, h, w).contiguous()
    d_map = torch.rand(n, 5, 5, generator=g, device=device)
    return logits, detection, segmentation, weights, d_map


def run(quick: bool = False) -> list:
    """Time the Triton op against the eager composition (and ``torch.compile``'d, unless quick) on a CUDA GPU.

    Args:
        quick: Fewer repeats, no ``torch.compile`` baseline (a smoke run).

    Returns:
        ``(ours, baseline)`` timing pairs and a dict of notes; only a note where there is no CUDA GPU or Triton.
    """
    import torch

    if not torch.cuda.is_available():
        return [{"status": "needs a CUDA GPU: the Triton kernel is not timed on CPU"}]
    from pysynth.kernels import triton_available

    if not triton_available():
        return [{"status": "needs Triton (pip install 'pysynth-histo[gpu]')"}]
    from pysynth.kernels.weighted_loss import weighted_two_head_loss, weighted_two_head_loss_reference

    device = torch.device("cuda")
    opts = {"repeats": 5 if quick else 15, "min_time_s": 0.005 if quick else 0.05, "sync": torch.cuda.synchronize}
    compiled = None if quick else torch.compile(weighted_two_head_loss_reference, dynamic=False)
    rows: list = []
    notes: dict = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__}
    for n, h, w in CASES:
        for dtype in (torch.float32, torch.bfloat16):
            logits, *rest = _batch(n, h, w, dtype, device)
            x = logits.requires_grad_()

            def step(fn, x=x, rest=rest) -> None:
                loss, _ = fn(x, *rest, dice_weight=0.5)  # the training configuration: BCE + 0.5 soft Dice
                torch.autograd.grad(loss.mean(), x)

            name = f"weighted_two_head_loss fwd+bwd N={n} {h}x{w} {str(dtype).removeprefix('torch.')}"
            ours = measure(name, lambda step=step: step(weighted_two_head_loss), items_per_call=n, unit="patch", **opts)
            eager = measure(
                name + " [eager PyTorch]",
                lambda step=step: step(weighted_two_head_loss_reference),
                items_per_call=n,
                unit="patch",
                **opts,
            )
            rows.append((ours, eager))
            if compiled is not None:
                try:
                    base = measure(
                        name + " [torch.compile]",
                        lambda step=step: step(compiled),
                        items_per_call=n,
                        unit="patch",
                        **opts,
                    )
                except Exception as exc:  # an inductor failure should not lose the other timings
                    notes[f"torch.compile {name}"] = f"failed: {type(exc).__name__}: {exc}"
                else:
                    rows.append((dataclasses.replace(ours, name=name + " (vs compiled)", extra={}), base))
    return [*rows, notes]


def main(argv: list[str] | None = None) -> None:
    """Print the table (and optionally write JSON)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats, no torch.compile baseline")
    parser.add_argument("--json", help="also write the timings to this JSON file")
    args = parser.parse_args(argv)
    results = run(args.quick)
    pairs = [r for r in results if isinstance(r, tuple)]
    notes = {k: v for r in results if isinstance(r, dict) for k, v in r.items()}
    rows = [
        [
            ours.name,
            f"{ours.median_s * 1e3:.3f}",
            f"{(ours.p75_s - ours.p25_s) * 1e3:.3f}",
            f"{base.median_s * 1e3:.3f}",
            f"{base.median_s / ours.median_s:.1f}x",
        ]
        for ours, base in pairs
    ]
    print("Importance-weighted two-head loss, forward + backward; median ms per call")
    if rows:
        print(format_table(rows, ["case", "Triton ms", "IQR ms", "baseline ms", "speed-up"]))
    for key, value in notes.items():
        print(f"  {key}: {value}")
    if args.json:
        write_json(args.json, "weighted_loss", [t for pair in pairs for t in pair], notes)


if __name__ == "__main__":
    main()

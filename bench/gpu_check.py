"""GPU readiness, prepared once: everything CUDA of pysynth, run in one go on a machine with a GPU, into one JSON.

Run it as ``bash bench/gpu_check.sh [OUT.json]`` (or ``python -m pysynth.bench.gpu_check OUT.json``). On a machine
without CUDA it writes ``{"cuda": false, ...}`` and exits 0 (the test suite runs it that way). With CUDA, each step
runs with its own time budget, and a step that fails is recorded with its error while the others go on; the whole
check is sized to finish in under 8 minutes:

1. ``tests``: the CUDA-only tests (``-m needs_cuda``: the fused Triton loss compiled for the GPU against its twin,
   forward and backward), pass/fail counts and the last lines of pytest's output.
2. ``train_plain``, ``train_gan``: 200 plain and 100 ``--gan`` training steps of the default network on synthetic
   patches made from the bundled slide, on the GPU (bf16 autocast), seconds per step.
3. ``infer_gpu``: ``infer_slide`` in fp16 on a generated 40x pyramidal TIFF with at least 1 Gpx of real tissue
   (the bundled slide's tissue tiled; :mod:`pysynth.bench.make_slide`), with the stage split, Mpx/s and the peak
   GPU memory.
4. ``infer_cpu``: the CPU path on a slide of the same tissue with a tenth of it (the same code, fp32), for the
   per-pixel comparison.

Each step runs in a child process killed at its budget (:data:`BUDGET_S`; a hang cannot stall the rest), records
its wall time, and the JSON is rewritten after each step, so a check cut short still says what it got.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

#: Seconds each step may take (the sum stays under 8 minutes with set-up).
BUDGET_S = {"tests": 90, "train_plain": 75, "train_gan": 75, "slide": 60, "infer_gpu": 90, "infer_cpu": 60}
#: Tissue of the GPU slide, Mpx at 0.25 µm/px, and the share of the CPU slide.
GPU_TISSUE_MPX = 1100.0
CPU_SHARE = 0.1


def _write(path: Path, report: dict[str, Any]) -> None:
    from pysynth.fsutil import atomic_write_text

    atomic_write_text(path, json.dumps(report, indent=1, default=str) + "\n")


def _environment() -> dict[str, Any]:
    import torch

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.cuda.is_available(),
        "cpu_count": os.cpu_count(),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError as exc:
        env["triton"] = f"not importable: {exc}"
    if env["cuda"]:
        props = torch.cuda.get_device_properties(0)
        env.update(
            device=props.name,
            device_memory_gb=round(props.total_memory / 2**30, 1),
            capability=f"{props.major}.{props.minor}",
            cuda_runtime=torch.version.cuda,
            devices=torch.cuda.device_count(),
        )
    return env


def step_tests(root: Path) -> dict[str, Any]:
    """The CUDA-only tests, in a child pytest with a time limit."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile for the GPU, not interpret
    cmd = [sys.executable, "-m", "pytest", "-m", "needs_cuda", "-q", "-p", "no:cacheprovider", str(root / "tests")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=BUDGET_S["tests"], env=env, cwd=root)
    tail = (done.stdout + done.stderr).strip().splitlines()[-15:]
    return {"returncode": done.returncode, "summary": tail[-1] if tail else "", "tail": tail}


def _train(steps: int, gan: bool, workdir: Path, device: str = "cuda", **overrides: Any) -> dict[str, Any]:
    import torch

    from pysynth import data_path
    from pysynth.train.config import TrainConfig
    from pysynth.train.joint import JointConfig, train_joint
    from pysynth.train.loop import train

    config = TrainConfig.from_dict({"steps": steps, "batch": 16, "val_patches": 16, "snapshot_every": 0, **overrides})
    out = workdir / ("gan" if gan else "plain")
    real = [data_path("CMU-1-Small-Region.svs")]
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    if gan:
        summary = train_joint(config, JointConfig.from_dict({}), out, real=real, device=device, overwrite=True)
    else:
        summary = train(config, out, real=real, device=device, overwrite=True)
    row = {
        "steps": summary["steps"],
        "train_wall_s": summary["train_wall_s"],
        "s_per_step": round(summary["train_wall_s"] / max(1, summary["steps"]), 4),
        "wall_s_with_data_and_validation": round(time.perf_counter() - started, 1),
        "validation": summary["validation"],
    }
    if device == "cuda":
        row["peak_gpu_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return row


def _slide(workdir: Path, tissue_mpx: float, name: str) -> tuple[Path, dict[str, Any]]:
    import math

    from pysynth.bench.make_slide import load_source, write_pyramidal_tiff

    source = load_source(0.25)
    side = int(math.ceil(math.sqrt(tissue_mpx * 1e6 / 0.5) / 1024) * 1024)  # tissue on half of the slide
    path = workdir / f"{name}.tiff"
    started = time.perf_counter()
    layout = write_pyramidal_tiff(
        path, source, side, 0.25, tissue_fraction=tissue_mpx * 1e6 / side**2, workers=os.cpu_count() or 1
    )
    return path, {
        "side_px": side,
        "tissue_mpx": round(layout.tissue_px / 1e6, 1),
        "file_mb": round(path.stat().st_size / 1e6),
        "written_s": round(time.perf_counter() - started, 1),
    }


def _infer(path: Path, out: Path, device: str, precision: str) -> dict[str, Any]:
    import torch

    from pysynth.infer import InferConfig, infer_slide, inference_model
    from pysynth.io import open_slide
    from pysynth.models.io import default_model_dir, model_digest

    folder = default_model_dir()
    model, info = inference_model(str(folder))
    model = model.to(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with open_slide(path) as reader:
        result = infer_slide(
            reader,
            model,
            info,
            out,
            config=InferConfig(precision=precision),
            model_id=model_digest(folder),
            overwrite=True,
        )
    row: dict[str, Any] = {
        "nuclei": result.nuclei,
        "regions": result.regions,
        "seconds": result.seconds,
        "mpx_per_s": round(result.pixels / max(result.seconds, 1e-9) / 1e6, 2),
        "stages_s": result.timings,
        "precision": precision,
    }
    if device == "cuda":
        row["peak_gpu_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return row


STEPS = ("tests", "train_plain", "train_gan", "slide", "infer_gpu", "infer_cpu")


def run_step(name: str, workdir: Path, root: Path) -> dict[str, Any]:
    """One step, in this process (the parent runs each in a child with a time limit)."""
    if name == "tests":
        return step_tests(root)
    if name == "train_plain":
        return _train(200, False, workdir)
    if name == "train_gan":
        return _train(100, True, workdir)
    if name == "slide":
        _, gpu = _slide(workdir, GPU_TISSUE_MPX, "gpu")
        _, cpu = _slide(workdir, GPU_TISSUE_MPX * CPU_SHARE, "cpu")
        return {"gpu_slide": gpu, "cpu_slide": cpu}
    if name == "infer_gpu":
        return _infer(workdir / "gpu.tiff", workdir / "out-gpu", "cuda", "fp16")
    if name == "infer_cpu":
        return _infer(workdir / "cpu.tiff", workdir / "out-cpu", "cpu", "fp32")
    raise ValueError(f"unknown step {name!r}")


def run_check(out_path: Path, root: Path) -> dict[str, Any]:
    """Run every step that this machine can, each in a child process with its budget.

    Rewrites ``out_path`` after each step; returns the report.
    """
    report: dict[str, Any] = {"format": "pysynth-gpu-check", "version": 1, "environment": _environment(), "steps": {}}
    if not report["environment"]["cuda"]:
        report["cuda"] = False
        report["note"] = "no CUDA device: nothing to check (this is the CPU-only mode)"
        _write(out_path, report)
        return report
    report["cuda"] = True
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="pysynth-gpu-check-") as tmp:
        for name in STEPS:
            t0 = time.perf_counter()
            cmd = [
                sys.executable,
                "-m",
                "pysynth.bench.gpu_check",
                "--step",
                name,
                "--workdir",
                tmp,
                "--root",
                str(root),
            ]
            try:
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=BUDGET_S[name], cwd=root)
                lines = done.stdout.strip().splitlines()
                if done.returncode == 0 and lines:
                    row = json.loads(lines[-1])
                    row["status"] = "ok"
                else:
                    row = {"status": "error", "returncode": done.returncode, "stderr": done.stderr[-3000:]}
            except subprocess.TimeoutExpired:
                row = {"status": "timeout", "budget_s": BUDGET_S[name]}
            row["wall_s"] = round(time.perf_counter() - t0, 1)
            report["steps"][name] = row
            report["wall_s"] = round(time.perf_counter() - started, 1)
            _write(out_path, report)
    gpu, cpu = report["steps"].get("infer_gpu", {}), report["steps"].get("infer_cpu", {})
    if gpu.get("status") == "ok" and cpu.get("status") == "ok":
        report["gpu_over_cpu_per_pixel"] = round(gpu["mpx_per_s"] / max(cpu["mpx_per_s"], 1e-9), 2)
    _write(out_path, report)
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run every CUDA check of pysynth into one JSON file.")
    parser.add_argument("out", nargs="?", type=Path, default=Path("gpu_check.json"))
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1], help="the repository")
    parser.add_argument("--step", choices=STEPS, default=None, help="run one step here, print its JSON (internal)")
    parser.add_argument("--workdir", type=Path, default=None, help="with --step: the check's working folder")
    args = parser.parse_args(argv)
    if args.step is not None:
        row = run_step(args.step, args.workdir, args.root)
        print(json.dumps(row, default=str))
        return
    report = run_check(args.out, args.root)
    if not report["cuda"]:
        print(f"gpu_check: {report['note']}; wrote {args.out}")
        return
    failed = [k for k, v in report["steps"].items() if v.get("status") != "ok"]
    print(
        f"gpu_check: {len(report['steps']) - len(failed)} of {len(report['steps'])} steps ok in {report['wall_s']} s"
        + (f" (not ok: {', '.join(failed)})" if failed else "")
        + f"; wrote {args.out}"
    )


if __name__ == "__main__":
    main()

"""Shared fixtures. TRITON_INTERPRET must be set before anything imports triton, so it is set here first."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import itertools
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "needs_cuda" in item.keywords and not has_cuda:
            item.add_marker(skip)


@pytest.fixture
def tiny_train() -> dict:
    """A training configuration (``--config`` YAML content) small enough for a command-line test: seconds a run."""
    return {
        "model": {"width": 4, "depth": 2, "max_width": 8},
        "synth": {"size": 80},
        "crop": 64,
        "batch": 2,
        "warmup": 1,
        "val_patches": 4,
        "checkpoint_every": 2,
        "snapshot_every": 0,
        "threads": 1,
    }


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The project's shared real data (../shared/data); tests using it skip clearly where it is absent."""
    path = SHARED / "data"
    if not path.is_dir():
        pytest.skip(f"shared data folder not present ({path.name} beside the project)")
    return path


@pytest.fixture(scope="session")
def sample_slide() -> Path:
    """The bundled real Aperio slide (20x, 0.499 µm/px)."""
    from pysynth import data_path

    return data_path("CMU-1-Small-Region.svs")


@pytest.fixture(scope="session")
def model_info():
    """The shipped default model as infer runs it (BatchNorm folded, channels-last) and its description."""
    from pysynth.infer import inference_model
    from pysynth.models.io import default_model_dir

    return inference_model(str(default_model_dir()))


@pytest.fixture(scope="session")
def tissue_crop() -> np.ndarray:
    """A 384×512 px region of the bundled real slide at 0.25 µm/px (upsampled from 20x), dense with nuclei."""
    from pysynth import data_path
    from pysynth.io import open_slide, read_region

    with open_slide(data_path("CMU-1-Small-Region.svs")) as slide:
        return read_region(slide, 900, 1200, (384, 512), 0.25)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture(scope="session")
def tissue_rgb() -> np.ndarray:
    """A 600×800 RGB crop of real tissue from the bundled slide, at its native 0.499 µm/px."""
    from pysynth import data_path
    from pysynth.io import open_slide

    with open_slide(data_path("CMU-1-Small-Region.svs")) as slide:
        return slide.read_level(0, 700, 1500, 800, 600)


class CliResult:
    def __init__(self, code: int, out: str, err: str) -> None:
        self.code, self.out, self.err = code, out, err

    def error_lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if "error:" in line]


@pytest.fixture
def run_cli(capsys: pytest.CaptureFixture[str]):
    """Run ``pysynth ARGS`` in this process; returns exit code, stdout and stderr."""
    from pysynth.cli import main

    def run(*args: str) -> CliResult:
        capsys.readouterr()
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


@pytest.fixture
def small_disk(tmp_path: Path):
    """``small_disk("160k")``: a size-limited tmpfs folder (needs root and mount; skipped elsewhere)."""
    import subprocess

    mounted: list[Path] = []

    def make(size: str) -> Path:
        if not hasattr(os, "geteuid") or os.geteuid() != 0:
            pytest.skip("mounting a size-limited tmpfs needs root")
        point = tmp_path / f"disk{len(mounted)}"
        point.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
        mounted.append(point)
        return point

    yield make
    for point in mounted:
        subprocess.run(["umount", str(point)], check=False)


def _largest_gap_during(fn: Callable[[], object]) -> tuple[float, float]:
    """Run fn in a thread while this thread records timestamps; return (duration, largest gap inside it)."""
    span: list[float] = []

    def work() -> None:
        span.append(time.perf_counter())
        fn()
        span.append(time.perf_counter())

    thread = threading.Thread(target=work)
    stamps: list[float] = []
    thread.start()
    while thread.is_alive():
        stamps.append(time.perf_counter())
    thread.join()
    start, end = span
    inside = [start, *(t for t in stamps if start < t < end), end]
    return end - start, max(b - a for a, b in itertools.pairwise(inside))


@pytest.fixture
def assert_releases_gil() -> Callable[[Callable[[], object]], None]:
    """Check that a call lets another Python thread run (with the GIL held, that thread would stall).

    The call should take >= ~50 ms; the test fails if the other thread ever waited more than half of it.
    """

    def check(fn: Callable[[], object]) -> None:
        duration, gap = _largest_gap_during(fn)
        assert duration > 0.02, f"the call took only {duration * 1e3:.1f} ms: make the input larger"
        assert gap < 0.5 * duration, (
            f"another thread stalled {gap * 1e3:.1f} ms of the call's {duration * 1e3:.1f} ms: GIL not released?"
        )

    return check

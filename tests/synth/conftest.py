from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest


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


@pytest.fixture(scope="session")
def monuseg_tile(shared_data: Path) -> np.ndarray:
    """One real 1000 x 1000 H&E tile (RGB uint8) from the shared MoNuSeg training images (pixels only)."""
    images = sorted((shared_data / "monuseg-train" / "images").glob("*.png"))
    if not images:
        pytest.skip("no real tiles in the shared MoNuSeg training images")
    return cv2.cvtColor(cv2.imread(str(images[0])), cv2.COLOR_BGR2RGB)

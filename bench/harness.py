"""Timing and reporting shared by all benchmark cases."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class Timing:
    """Seconds per call of one function: median and spread over repeats."""

    name: str
    median_s: float
    p25_s: float
    p75_s: float
    repeats: int
    items_per_call: float = 1.0
    unit: str = "call"
    extra: dict = field(default_factory=dict)

    @property
    def rate(self) -> float:
        """Items per second at the median."""
        return self.items_per_call / self.median_s if self.median_s > 0 else float("inf")


def measure(
    name: str,
    fn: Callable[[], object],
    *,
    items_per_call: float = 1.0,
    unit: str = "call",
    warmup: int = 3,
    repeats: int = 15,
    min_time_s: float = 0.02,
    sync: Callable[[], None] | None = None,
) -> Timing:
    """Time ``fn``: warm up, then ``repeats`` samples, each long enough (loops of calls) to time reliably.

    Args:
        name: Label of the case.
        fn: The work; its result is discarded.
        items_per_call: What one call processes (patches, pixels, ...), for rates.
        unit: Name of those items.
        warmup: Untimed calls first.
        repeats: Timed samples.
        min_time_s: Least duration of one sample; fast functions are looped.
        sync: Called after each sample before the clock stops (e.g. ``torch.cuda.synchronize``).

    Returns:
        The :class:`Timing`.
    """
    for _ in range(warmup):
        fn()
    if sync:
        sync()
    loops = 1
    while True:
        start = time.perf_counter()
        for _ in range(loops):
            fn()
        if sync:
            sync()
        elapsed = time.perf_counter() - start
        if elapsed >= min_time_s or loops >= 1 << 20:
            break
        loops *= 2
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(loops):
            fn()
        if sync:
            sync()
        samples.append((time.perf_counter() - start) / loops)
    q = statistics.quantiles(samples, n=4) if len(samples) >= 2 else [samples[0]] * 3
    return Timing(name, statistics.median(samples), q[0], q[2], repeats, items_per_call, unit)


def machine_info() -> dict:
    """Machine, versions and commit, for the JSON record."""
    import numpy as np

    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    try:
        import cv2

        info["opencv"] = cv2.__version__
    except ImportError:
        pass
    try:
        from pysynth import __version__, _core

        info["pysynth"] = __version__
        info["core"] = _core.build_info()
    except ImportError:
        pass
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).parent,
        ).stdout.strip()
        info["commit"] = commit
    except (OSError, subprocess.CalledProcessError):
        info["commit"] = None
    cpu_model = _cpu_model()
    if cpu_model:
        info["cpu_model"] = cpu_model
    return info


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def write_json(path: str | Path, section: str, timings: list[Timing], notes: dict | None = None) -> None:
    """Write one section's timings with the machine record as JSON."""
    record = {
        "machine": machine_info(),
        "section": section,
        "notes": notes or {},
        "timings": [asdict(t) | {"rate": t.rate} for t in timings],
    }
    Path(path).write_text(json.dumps(record, indent=2))


def format_table(rows: list[list[str]], header: list[str]) -> str:
    """A plain-text table, columns padded."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(out)

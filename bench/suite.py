"""Running benchmark sections, printing their tables and writing one JSON record, for ``pysynth bench``.

A section is a module ``pysynth.bench.<name>`` with ``run(quick)``. Its results may be :class:`Timing` objects
(a case that has a baseline names it in ``extra["baseline"]``), ``(ours, library)`` pairs, and dicts of notes.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType

from pysynth.bench.harness import Timing, format_table, machine_info

SECTIONS = ("synthesis", "kernels", "store", "segment", "weighted_loss", "infer")


@dataclass
class SectionResult:
    """One section's timings and notes (``available`` is False where its module is missing)."""

    name: str
    timings: list[Timing] = field(default_factory=list)
    notes: dict = field(default_factory=dict)
    available: bool = True

    def baseline_of(self, timing: Timing) -> Timing | None:
        """The timing ``timing`` is compared with, if any."""
        name = timing.extra.get("baseline")
        return next((t for t in self.timings if t.name == name), None)

    def ratio(self, timing: Timing) -> float | None:
        """Speed-up in items/s over its baseline (> 1: faster), if it has one."""
        base = self.baseline_of(timing)
        return timing.rate / base.rate if base is not None else None


def load_section(name: str) -> ModuleType | None:
    """The section's module, or None where it is not part of this build."""
    module = f"pysynth.bench.{name}"
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name == module:
            return None
        raise


def run_section(name: str, quick: bool) -> SectionResult:
    """Run one section and normalise its results."""
    module = load_section(name)
    if module is None or not hasattr(module, "run"):
        return SectionResult(name, notes={"status": f"{name} section not available"}, available=False)
    result = SectionResult(name)
    for row in module.run(quick):
        if isinstance(row, Timing):
            result.timings.append(row)
        elif isinstance(row, tuple) and len(row) == 2 and all(isinstance(t, Timing) for t in row):
            ours, library = row
            ours.extra.setdefault("baseline", library.name)
            result.timings += [ours, library]
        elif isinstance(row, dict):
            result.notes.update(row)
        else:
            raise TypeError(f"{name}: unexpected benchmark result {type(row).__name__}")
    return result


def format_section(result: SectionResult) -> str:
    """A table: median and spread per item, items/s and speed-up over the baseline."""
    if not result.available:
        return f"{result.name}: {result.notes['status']}"
    baselines = {t.extra.get("baseline") for t in result.timings}
    rows = []
    for t in result.timings:
        per = 1e3 / t.items_per_call
        ratio = result.ratio(t)
        rows.append(
            [
                t.name,
                f"{t.median_s * per:.3f}",
                f"{t.p25_s * per:.3f}–{t.p75_s * per:.3f}",
                f"{t.rate:,.1f} {t.unit}/s",
                f"{ratio:.2f}x" if ratio is not None else ("baseline" if t.name in baselines else ""),
            ]
        )
    header = ["case", "median ms/item", "spread p25–p75", "items/s", "vs baseline"]
    notes = [f"  {k}: {v}" for k, v in result.notes.items() if not isinstance(v, (dict, list))]
    return "\n".join([result.name, format_table(rows, header), *notes])


def record(results: list[SectionResult], quick: bool) -> dict:
    """The JSON-able record: machine, versions, commit and every section."""
    return {
        "machine": machine_info(),
        "quick": quick,
        "sections": {
            r.name: {
                "available": r.available,
                "notes": r.notes,
                "timings": [asdict(t) | {"rate": t.rate, "ratio_vs_baseline": r.ratio(t)} for t in r.timings],
            }
            for r in results
        },
    }


def write_record(path: str | Path, results: list[SectionResult], quick: bool) -> None:
    """Write :func:`record` to ``path`` (atomically)."""
    from pysynth.fsutil import atomic_write_text

    atomic_write_text(path, json.dumps(record(results, quick), indent=2, default=str))

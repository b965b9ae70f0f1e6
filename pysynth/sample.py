"""Random, non-overlapping tissue patches from slides and images: the unlabeled real input of the method.

Each source gets its own random stream, derived from the seed and the source's name, so the patches of a
source do not depend on which other sources are in the run or on how many worker processes share the work.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np

from pysynth.errors import PysynthError, SlideError
from pysynth.fsutil import atomic_write_bytes, atomic_write_text

log = logging.getLogger("pysynth")

MANIFEST_COLUMNS = (
    "file",
    "source",
    "x",
    "y",
    "size_level0",
    "size",
    "mpp",
    "source_mpp",
    "mpp_source",
    "level",
    "tissue_fraction",
    "run",
)
_STATE_DIR = ".pysynth-sample"


@dataclass(frozen=True)
class SampleConfig:
    """What to sample from each source.

    Attributes:
        n_per_slide: Patches wanted per source (> 0).
        size: Patch side in pixels at ``mpp``.
        mpp: Patch resolution in µm/px (0.25 is 40x).
        min_tissue: Least tissue fraction of a patch, in ``[0, 1]``.
        seed: Seed of every source's random stream.
        input_mpp: Resolution of sources whose files carry none (plain images).
        candidates_per_patch: Random candidate positions tried per wanted patch before giving up.
    """

    n_per_slide: int
    size: int = 460
    mpp: float = 0.25
    min_tissue: float = 0.7
    seed: int = 0
    input_mpp: float | None = None
    candidates_per_patch: int = 200

    def __post_init__(self) -> None:
        if self.n_per_slide < 1:
            raise ValueError(f"n_per_slide must be at least 1, got {self.n_per_slide}")
        if self.size < 8:
            raise ValueError(f"size must be at least 8 px, got {self.size}")
        if not self.mpp > 0:
            raise ValueError(f"mpp must be positive, got {self.mpp}")
        if not 0.0 <= self.min_tissue <= 1.0:
            raise ValueError(f"min_tissue must be in [0, 1], got {self.min_tissue}")
        if self.input_mpp is not None and not self.input_mpp > 0:
            raise ValueError(f"input_mpp must be positive, got {self.input_mpp}")
        if self.candidates_per_patch < 1:
            raise ValueError(f"candidates_per_patch must be at least 1, got {self.candidates_per_patch}")


@dataclass
class SourceResult:
    """The outcome for one source: its manifest rows, or why it failed, and any warning."""

    name: str
    source: str
    rows: list[dict] = field(default_factory=list)
    error: str | None = None
    warning: str | None = None


def source_rng(seed: int, name: str) -> np.random.Generator:
    """The random stream of one source: a function of the seed and the source's name only."""
    return np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(name.encode("utf-8"))]))


def place_patches(
    tissue: object,
    shape_hw: tuple[int, int],
    extent: float,
    n: int,
    min_tissue: float,
    rng: np.random.Generator,
    candidates: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Choose up to ``n`` non-overlapping squares of side ``extent`` (level-0 px) with enough tissue.

    Candidates are centred on random tissue pixels of the mask (so sparse slides cost no more than dense ones),
    kept when their tissue fraction reaches ``min_tissue``, and accepted in order unless they overlap one
    already accepted.

    Args:
        tissue: The slide's :class:`~pysynth.io.TissueMask`.
        shape_hw: Level-0 ``(height, width)``.
        extent: Square side in level-0 pixels.
        n: Squares wanted.
        min_tissue: Least tissue fraction.
        rng: Random stream.
        candidates: Most candidates to try in all.

    Returns:
        ``(xy, fractions)``: integer level-0 top-left corners ``(k, 2)`` with ``k <= n``, and their fractions.
    """
    height, width = shape_hw
    ys, xs = np.nonzero(tissue.mask)
    accepted: list[tuple[int, int]] = []
    fractions: list[float] = []
    batch = 1024
    tried = 0
    while len(accepted) < n and tried < candidates and len(ys):
        pick = rng.integers(0, len(ys), size=batch)
        cx = (xs[pick] + rng.random(batch)) * tissue.scale
        cy = (ys[pick] + rng.random(batch)) * tissue.scale
        x = np.clip(np.round(cx - extent / 2), 0, np.floor(width - extent)).astype(np.int64)
        y = np.clip(np.round(cy - extent / 2), 0, np.floor(height - extent)).astype(np.int64)
        frac = tissue.region_fraction(x, y, extent, extent)
        for i in np.flatnonzero(frac >= min_tissue):
            if len(accepted) == n:
                break
            if all(abs(x[i] - ax) >= extent or abs(y[i] - ay) >= extent for ax, ay in accepted):
                accepted.append((int(x[i]), int(y[i])))
                fractions.append(float(frac[i]))
        tried += batch
    return np.array(accepted, np.int64).reshape(-1, 2), np.array(fractions)


def sample_source(
    path: str | Path,
    name: str,
    out_dir: str | Path,
    config: SampleConfig,
    progress: Callable[[int], None] | None = None,
    *,
    report_greyscale: bool = False,
) -> SourceResult:
    """Sample one source and write its patches as ``<name>_<index>.png`` into ``out_dir``.

    Problems with the source become the result's ``error`` instead of exceptions, so a batch goes on.

    Args:
        path: The slide or image.
        name: Unique name of the source in this run (file names and random stream).
        out_dir: Where patches go.
        config: What to sample.
        progress: Called with 1 after each patch written.
        report_greyscale: Put the greyscale warning (:func:`pysynth.io.tissue.looks_greyscale`) into the
            result's ``warning`` (in worker processes, whose log is not shown).

    Returns:
        The source's :class:`SourceResult`.
    """
    from pysynth.io import best_level, compute_tissue_mask, open_slide, read_region

    result = SourceResult(name=name, source=str(path))
    try:
        with open_slide(path, config.input_mpp) as reader:
            height, width = reader.level_shapes_hw[0]
            extent = config.size * config.mpp / reader.mpp
            if extent > min(height, width):
                raise SlideError(
                    path,
                    f"a {config.size} px patch at {config.mpp} µm/px spans {extent:.0f} px of the source, more than "
                    f"its {width} × {height} px",
                )
            tissue = compute_tissue_mask(reader)
            if not tissue.mask.any():
                raise SlideError(path, "no tissue found (blank or background only)")
            xy, fractions = place_patches(
                tissue,
                (height, width),
                extent,
                config.n_per_slide,
                config.min_tissue,
                source_rng(config.seed, name),
                config.n_per_slide * config.candidates_per_patch,
            )
            if len(xy) == 0:
                raise SlideError(
                    path,
                    f"no {config.size} px patch at {config.mpp} µm/px with ≥ {config.min_tissue:.0%} tissue "
                    f"(tissue is {tissue.fraction:.1%} of it)",
                )
            level = best_level(reader, config.mpp)
            for index, ((x, y), fraction) in enumerate(zip(xy, fractions, strict=True)):
                patch = read_region(reader, float(x), float(y), (config.size, config.size), config.mpp)
                file_name = f"{name}_{index:04d}.png"
                ok, png = cv2.imencode(".png", cv2.cvtColor(patch, cv2.COLOR_RGB2BGR))
                if not ok:
                    raise PysynthError(f"{path}: PNG encoding failed")
                atomic_write_bytes(Path(out_dir) / file_name, png.tobytes())
                result.rows.append(
                    {
                        "file": file_name,
                        "source": str(path),
                        "x": int(x),
                        "y": int(y),
                        "size_level0": round(extent, 3),
                        "size": config.size,
                        "mpp": config.mpp,
                        "source_mpp": reader.mpp,
                        "mpp_source": reader.mpp_source,
                        "level": level,
                        "tissue_fraction": round(fraction, 4),
                    }
                )
                if progress is not None:
                    progress(1)
            if len(xy) < config.n_per_slide:
                result.warning = (
                    f"{path}: only {len(xy)} of {config.n_per_slide} non-overlapping patches with "
                    f"≥ {config.min_tissue:.0%} tissue fit"
                )
            if report_greyscale and tissue.greyscale:  # a worker's log is not shown: say it in the result
                from pysynth.io.tissue import GREYSCALE_WARNING

                note = GREYSCALE_WARNING % path
                result.warning = f"{result.warning}; {note}" if result.warning else note
    except SlideError as exc:
        result.error = str(exc)
    except OSError as exc:  # writing the patches failed (disk full, permissions)
        result.error = f"{path}: writing its patches to {out_dir} failed ({exc.strerror or exc})"
    if result.error is not None:
        result.rows.clear()  # a failed source is redone whole on the next run
    return result


def _sample_worker(args: tuple) -> SourceResult:
    import cv2 as _cv2

    _cv2.setNumThreads(1)
    worker_log = logging.getLogger("pysynth")  # warnings come back in the result, printed by the parent
    worker_log.addHandler(logging.NullHandler())
    worker_log.propagate = False
    return sample_source(*args, report_greyscale=True)


@dataclass
class SampleReport:
    """What a sampling run did."""

    results: list[SourceResult]
    skipped: int
    manifest: Path
    manifest_rows: int = 0

    @property
    def failures(self) -> list[SourceResult]:
        """Sources that produced nothing, with the reason."""
        return [r for r in self.results if r.error is not None]

    @property
    def patches(self) -> int:
        """Patches of this run's sources (the manifest may hold more, from earlier runs)."""
        return sum(len(r.rows) for r in self.results)


def _forget_legacy_run(out_dir: Path, state: Path) -> None:
    """Delete the patches and state of a run made before run records existed (for ``overwrite``)."""
    for done in state.glob("*.json"):
        if done.name != "params.json":
            for row in json.loads(done.read_text()).get("rows", []):
                (out_dir / row["file"]).unlink(missing_ok=True)
        done.unlink()
    with contextlib.suppress(OSError):
        state.rmdir()


def sample(
    sources: Sequence[Path],
    names: Sequence[str] | None,
    out_dir: str | Path,
    config: SampleConfig,
    *,
    workers: int = 1,
    overwrite: bool = False,
    progress: Callable[[int], None] | None = None,
) -> SampleReport:
    """Sample every source into ``out_dir`` and write ``manifest.csv``; resumes an interrupted run.

    The folder's run record (:class:`~pysynth.ledger.Ledger`) holds every finished source with its input's
    content identity and rows, so a later run with the same settings keeps those sources (an interrupted run
    continues where it stopped and gives the same files as an uninterrupted one), samples the new ones, and
    writes a manifest of every source the folder holds, earlier runs' included, each row with the run that made
    it. A source whose file changed is refused (its earlier patches stay) unless ``overwrite``.

    Args:
        sources: Files to sample.
        names: Output names of the sources; ``None``: the folder's stable names (:meth:`Ledger.names`).
        out_dir: Output folder (must exist and be writable).
        config: What to sample.
        workers: Worker processes (1: in this process).
        overwrite: Discard the folder's earlier patches if made with other settings, and redo changed sources.
        progress: Called with the number of patches written as they are written.

    Returns:
        The :class:`SampleReport` (``results`` in the order of ``sources``).

    Raises:
        PysynthError: If ``out_dir`` holds patches sampled with other settings, or by a pysynth without run
            records, and ``overwrite`` is false.
    """
    from pysynth.ledger import Ledger, file_identity, settings_diff

    out_dir = Path(out_dir)
    legacy = out_dir / _STATE_DIR
    settings = json.loads(json.dumps(asdict(config)))
    with Ledger(out_dir, "sample", settings) as ledger:
        if legacy.exists() and not ledger.entries:
            if not overwrite:
                raise PysynthError(
                    f"{out_dir}: holds patches of an earlier pysynth without a run record; use another folder or "
                    "--overwrite"
                )
            _forget_legacy_run(out_dir, legacy)
        changed = sorted({c for e in ledger.entries.values() for c in settings_diff(e["settings"], settings)})
        if changed:
            if not overwrite:
                raise PysynthError(
                    f"{out_dir}: holds patches sampled with other settings ({'; '.join(changed)}); "
                    "use another folder or --overwrite"
                )
            for name in list(ledger.entries):
                for old in ledger.outputs_of(name):
                    old.unlink(missing_ok=True)
                ledger.forget(name)
        if names is None:
            names = ledger.names(sources)
        results: dict[str, SourceResult] = {}
        identities: dict[str, dict] = {}
        todo = []
        for path, name in zip(sources, names, strict=True):
            try:
                identities[name] = file_identity(path)
            except PysynthError as exc:
                results[name] = SourceResult(name=name, source=str(path), error=str(exc))
                continue
            verdict = ledger.verdict(name, identities[name], settings, overwrite=overwrite)
            if verdict.action == "keep":
                entry = ledger.entries[name]
                results[name] = SourceResult(name, str(path), entry["rows"], warning=entry.get("warning"))
                if progress is not None:
                    progress(config.n_per_slide)
            elif verdict.action == "refuse":
                results[name] = SourceResult(name=name, source=str(path), error=f"{path}: {verdict.reason}")
            else:
                todo.append((path, name))
        skipped = sum(1 for r in results.values() if r.error is None)

        def finish(res: SourceResult) -> None:
            results[res.name] = res
            if res.error is None:
                files = [out_dir / row["file"] for row in res.rows]
                for old in set(ledger.outputs_of(res.name)) - set(files):  # a redo with fewer patches
                    old.unlink(missing_ok=True)
                for row in res.rows:
                    row["run"] = ledger.run_id
                ledger.record(res.name, identities[res.name], settings, files, rows=res.rows, warning=res.warning)

        if workers <= 1 or len(todo) <= 1:
            for path, name in todo:
                res = sample_source(path, name, out_dir, config, progress)
                finish(res)
                if progress is not None:  # count the patches that did not fit, so the total is reached
                    progress(config.n_per_slide - len(res.rows))
        else:
            import multiprocessing

            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=min(workers, len(todo)), mp_context=context) as pool:
                futures = {pool.submit(_sample_worker, (p, n, out_dir, config)): n for p, n in todo}
                for future in as_completed(futures):
                    res = future.result()
                    finish(res)
                    if progress is not None:
                        progress(config.n_per_slide)

        ordered = [results[name] for name in names]
        manifest = out_dir / "manifest.csv"
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
        writer.writeheader()
        rows = 0
        for name in sorted(ledger.entries):
            entry_rows = ledger.entries[name]["rows"]
            writer.writerows({**row, "run": row.get("run", ledger.entries[name]["run"])} for row in entry_rows)
            rows += len(entry_rows)
        atomic_write_text(manifest, buffer.getvalue())
        ledger.run.update(sources=len(ordered), kept=skipped, failed=sum(r.error is not None for r in ordered))
    return SampleReport(results=ordered, skipped=skipped, manifest=manifest, manifest_rows=rows)


def read_manifest(path: str | Path) -> list[dict]:
    """Rows of a ``manifest.csv`` written by :func:`sample`, with numbers parsed."""
    with Path(path).open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    ints = {"x", "y", "size", "level", "run"}
    floats = {"size_level0", "mpp", "source_mpp", "tissue_fraction"}
    for row in rows:
        for key in ints:
            if key in row:  # manifests written before run records have no run column
                row[key] = int(row[key])
        for key in floats:
            row[key] = float(row[key])
    return rows


def write_preview(report: SampleReport, out_dir: str | Path, config: SampleConfig, *, max_patches: int = 48) -> Path:
    """Write ``contact_sheet.png`` (patches from every source) and ``overview/<name>.png`` per source.

    The overview shows the source's thumbnail, its tissue outline and the sampled squares, which is how one
    checks by eye that patches come from tissue only.

    Args:
        report: The run's report.
        out_dir: The run's output folder.
        config: The run's settings.
        max_patches: Most patches on the contact sheet (taken evenly across sources).

    Returns:
        Path of the contact sheet.
    """
    from pysynth.io import compute_tissue_mask, load_rgb, open_slide, read_thumbnail
    from pysynth.viz import contact_sheet, slide_overview

    out_dir = Path(out_dir)
    done = [r for r in report.results if r.rows]
    per_source = max(1, max_patches // max(1, len(done)))
    picked = [row for r in done for row in r.rows[:per_source]][:max_patches]
    if not picked:
        raise PysynthError("no patches to preview")
    images = [load_rgb(out_dir / row["file"]) for row in picked]
    sheet = contact_sheet(images, [row["file"].rsplit(".", 1)[0] for row in picked])
    sheet_path = out_dir / "contact_sheet.png"
    atomic_write_bytes(sheet_path, cv2.imencode(".png", cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR))[1].tobytes())
    (out_dir / "overview").mkdir(exist_ok=True)
    for res in done:
        with open_slide(res.source, config.input_mpp) as reader:
            tissue = compute_tissue_mask(reader)
            thumbnail = read_thumbnail(reader, tissue.mpp)
        boxes = np.array([[r["x"], r["y"], r["size_level0"], r["size_level0"]] for r in res.rows])
        picture = slide_overview(thumbnail, tissue.mask, boxes, tissue.scale)
        png = cv2.imencode(".png", cv2.cvtColor(picture, cv2.COLOR_RGB2BGR))[1].tobytes()
        atomic_write_bytes(out_dir / "overview" / f"{res.name}.png", png)
    return sheet_path

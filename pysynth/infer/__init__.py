"""Whole-slide inference: every nucleus of a slide, found once and whole, in bounded memory, resumable.

The slide is cut, at the model's resolution, into square *regions* (``core`` px) on a fixed grid; regions without
tissue are skipped. Each region is read with a ``margin`` of context on every side, cut at the slide's edges
(resampled from the best pyramid level by :func:`pysynth.io.read_region`), colour-normalised if asked with
statistics fitted once per slide, passed through the network in one piece (averaged over ``tta`` flips/rotations)
and turned into instances, each with its confidence; those below the minimum confidence are dropped. A nucleus
belongs to the region whose core holds its centroid: nuclei near a core's edge are seen whole thanks to the
margin, and exactly one region keeps each of them, so there are neither split nor duplicated nuclei at region
borders and no global label image is ever built.

Each finished region is written at once (atomically) to ``OUT/<stem>/.parts/``; an interrupted run continues from
the regions it has, and since a region's result depends only on the slide, the model and these settings, the
result is the same as an uninterrupted run's. When all regions are done the parts are streamed into
``nuclei.geojson`` (QuPath detections with measurements, confidences included, level-0 coordinates),
``nuclei.parquet`` (the same nuclei as a table), ``csv/`` (one CSV of polygons per region, the format of the
method's released code), ``overlay.png``, ``report.html`` and, last, ``summary.json``, whose presence marks a
finished slide. Memory is bounded by one region's working set, whatever the slide's size.

The stages are modules, each usable and tested alone: :mod:`~pysynth.infer.config` (settings and file names),
:mod:`~pysynth.infer.plan` (regions and windows), :mod:`~pysynth.infer.read` (windows of the slide),
:mod:`~pysynth.infer.colour` (normalisation), :mod:`~pysynth.infer.network` (the model as infer runs it),
:mod:`~pysynth.infer.nuclei` (instances and measurements of a region), :mod:`~pysynth.infer.write` (the outputs),
:mod:`~pysynth.infer.report` (a page per slide and per cohort) and :mod:`~pysynth.infer.run` (one slide through
them, timed per stage in ``summary.json``).
"""

from pysynth.models.io import model_digest

from .colour import REFERENCE_HE, REFERENCE_LAB, REFERENCE_MAX_C, ColourModel, fit_colour
from .config import (
    CSV_DIR,
    DENSITY_CELL_UM,
    DENSITY_GRID,
    DENSITY_MAP,
    GEOJSON,
    GEOJSON_ZIP,
    MEASUREMENTS_VERSION,
    MIN_MARGIN,
    OVERLAY,
    PARTS,
    SETTINGS,
    SUMMARY,
    InferConfig,
)
from .network import Network, compiled, inference_model, keep_freed_memory
from .nuclei import region_nuclei
from .plan import Region, plan_regions, slide_extent, window_box
from .read import colour_samples, read_window
from .report import INDEX, REPORT, write_index, write_report
from .run import SlideResult, Timings, claim_slide_dir, infer_slide, run_regions, run_slide, slide_settings
from .write import csv_text, density_grid, feature, geojson_writer, rasterise, write_density, write_outputs

__all__ = [
    "CSV_DIR",
    "DENSITY_CELL_UM",
    "DENSITY_GRID",
    "DENSITY_MAP",
    "GEOJSON",
    "GEOJSON_ZIP",
    "INDEX",
    "MEASUREMENTS_VERSION",
    "MIN_MARGIN",
    "OVERLAY",
    "PARTS",
    "REFERENCE_HE",
    "REFERENCE_LAB",
    "REFERENCE_MAX_C",
    "REPORT",
    "SETTINGS",
    "SUMMARY",
    "ColourModel",
    "InferConfig",
    "Network",
    "Region",
    "SlideResult",
    "Timings",
    "claim_slide_dir",
    "colour_samples",
    "compiled",
    "csv_text",
    "density_grid",
    "feature",
    "fit_colour",
    "geojson_writer",
    "infer_slide",
    "inference_model",
    "keep_freed_memory",
    "model_digest",
    "plan_regions",
    "rasterise",
    "read_window",
    "region_nuclei",
    "run_regions",
    "run_slide",
    "slide_extent",
    "slide_settings",
    "window_box",
    "write_density",
    "write_index",
    "write_outputs",
    "write_report",
]

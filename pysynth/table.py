"""The per-nucleus table: one row per GeoJSON feature (same ``id``), as Parquet, for pandas, polars and DuckDB.

``infer`` writes ``nuclei.parquet`` per slide, streamed one row group per region as the outputs are assembled
(memory bounded by one region's nuclei); ``segment`` writes ``<stem>_nuclei.parquet`` per image. Both go through
:class:`TableWriter`: the file appears, synced, only when complete (an interrupted or failed write leaves no half
file). The schema's version is in the file's metadata (``pysynth_table_version``), with the resolution and the
source; :func:`read_table` refuses a table of another version in one line.

Columns (units in the names; coordinates in level-0 pixels of the slide, or pixels of the image, x right, y down):

===========================  ============================================================================
``id``                       the GeoJSON feature's ``id``
``region``                   index of the region that found it (``infer``; null for ``segment``)
``centroid_x_px``/``_y_px``  centroid in level-0 px
``centroid_x_um``/``_y_um``  the same in µm from the slide's origin
``area_um2``                 pixel count × (µm/px)² at the model's resolution
``perimeter_um`` ...         the shape features of :func:`pysynth.shape.shape_features` (perimeter on a
                             sub-pixel outline, circularity, solidity, eccentricity, axes, orientation)
``hematoxylin_od_mean``/_sd  colour deconvolution (:func:`pysynth.synth.deconv.rgb_to_hed`) over the nucleus'
``eosin_od_mean``/``_sd``    pixels, in the slide's own colours
``confidence``               mean segmentation probability over the nucleus
``detection_peak``           highest detection probability in it
``lymphocyte_probability``   mean class-output probability (models with a class output; else null)
``classification``           ``Nucleus`` or ``Lymphocyte``, as in the GeoJSON
===========================  ============================================================================
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from pysynth.errors import PysynthError
from pysynth.shape import MEASUREMENT_NAMES

#: Version of the table's columns and their meaning; a table of another version is refused, not mixed in.
TABLE_VERSION = 1
TABLE = "nuclei.parquet"
VERSION_KEY = b"pysynth_table_version"

#: The shape features (the column names are :data:`pysynth.shape.MEASUREMENT_NAMES`' keys, area excepted).
SHAPE_COLUMNS = tuple(key for key in MEASUREMENT_NAMES if key != "area_um2")
STAIN_COLUMNS = ("hematoxylin_od_mean", "hematoxylin_od_sd", "eosin_od_mean", "eosin_od_sd")


def schema(metadata: Mapping[str, Any] | None = None):
    """The table's Arrow schema, with ``metadata`` (JSON-able values) and the version in its key-value metadata."""
    import pyarrow as pa

    f64, f32 = pa.float64(), pa.float32()
    fields = [
        pa.field("id", pa.int64(), nullable=False),
        pa.field("region", pa.int32()),
        pa.field("centroid_x_px", f64, nullable=False),
        pa.field("centroid_y_px", f64, nullable=False),
        pa.field("centroid_x_um", f64),
        pa.field("centroid_y_um", f64),
        pa.field("area_um2", f64),
        *(pa.field(name, f64) for name in SHAPE_COLUMNS),
        *(pa.field(name, f32) for name in STAIN_COLUMNS),
        pa.field("confidence", f32),
        pa.field("detection_peak", f32),
        pa.field("lymphocyte_probability", f32),
        pa.field("classification", pa.dictionary(pa.int8(), pa.string())),
    ]
    meta = {VERSION_KEY: str(TABLE_VERSION).encode()}
    for key, value in (metadata or {}).items():
        meta[key.encode()] = json.dumps(value).encode()
    return pa.schema(fields, metadata=meta)


def stain_stats(labels: np.ndarray, rgb: np.ndarray, n: int | None = None) -> dict[str, np.ndarray]:
    """Mean and standard deviation of hematoxylin and eosin optical density over each label's pixels.

    Returns arrays indexed by label (``0..n``; entry 0 and absent labels hold 0), keyed by
    :data:`STAIN_COLUMNS`. Only nucleus pixels are deconvolved.
    """
    from pysynth.synth.deconv import rgb_to_hed

    n = int(labels.max()) if n is None else n
    where = np.flatnonzero(labels)
    ids = labels.ravel()[where]
    hed = rgb_to_hed(np.ascontiguousarray(rgb.reshape(-1, 3)[where])[None])[0].astype(np.float64)
    count = np.maximum(np.bincount(ids, minlength=n + 1), 1).astype(np.float64)
    out = {}
    for channel, name in ((0, "hematoxylin"), (1, "eosin")):
        values = hed[:, channel]
        mean = np.bincount(ids, weights=values, minlength=n + 1) / count
        square = np.bincount(ids, weights=values * values, minlength=n + 1) / count
        out[f"{name}_od_mean"] = mean
        out[f"{name}_od_sd"] = np.sqrt(np.maximum(square - mean * mean, 0.0))
    return out


class TableWriter:
    """Rows appended in batches (one Parquet row group each) to a table that appears only when complete."""

    def __init__(self, writer: Any) -> None:
        self._writer = writer
        self.rows = 0

    def write(self, columns: Mapping[str, Sequence[Any] | np.ndarray]) -> None:
        """Append rows given as columns (names of :func:`schema`; missing ones are null)."""
        import pyarrow as pa

        sch = self._writer.schema
        length = len(columns["id"])
        if length == 0:
            return
        arrays = []
        for field in sch:
            values = columns.get(field.name)
            if values is None:
                arrays.append(pa.nulls(length, field.type))
            elif pa.types.is_dictionary(field.type):
                arrays.append(pa.array(list(values), pa.string()).dictionary_encode().cast(field.type))
            else:
                arrays.append(pa.array(np.asarray(values), field.type))
        self._writer.write_table(pa.Table.from_arrays(arrays, schema=sch))
        self.rows += length


@contextmanager
def table_writer(path: Path, metadata: Mapping[str, Any] | None = None) -> Iterator[TableWriter]:
    """A :class:`TableWriter` for ``path``: written beside it, synced and renamed into place at the end."""
    import pyarrow.parquet as pq

    from pysynth.fsutil import atomic_writer

    with atomic_writer(path, "wb") as handle:
        writer = pq.ParquetWriter(handle, schema(metadata), compression="zstd")
        try:
            yield TableWriter(writer)
        finally:
            writer.close()


def read_table(path: str | Path):
    """A table written by pysynth (a ``pyarrow.Table``); one of another version is a :class:`PysynthError`."""
    import pyarrow.parquet as pq

    path = Path(path)
    try:
        meta = pq.read_schema(path).metadata or {}
    except (OSError, ValueError) as exc:
        raise PysynthError(f"{path}: not a readable nucleus table ({exc})") from None
    version = meta.get(VERSION_KEY)
    if version != str(TABLE_VERSION).encode():
        found = "no version" if version is None else f"version {version.decode()}"
        raise PysynthError(f"{path}: a nucleus table of {found}; this pysynth reads version {TABLE_VERSION}")
    return pq.read_table(path)


def table_metadata(table) -> dict[str, Any]:
    """The JSON metadata of a table read by :func:`read_table` (resolution, source, ...)."""
    meta = table.schema.metadata or {}
    return {k.decode(): json.loads(v) for k, v in meta.items() if k != VERSION_KEY}

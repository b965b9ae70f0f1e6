"""Reading pixels from slides and images at a physical resolution, tissue masks and tile grids."""

from __future__ import annotations

from pathlib import Path

from pysynth.errors import SlideError
from pysynth.io.array_reader import IMAGE_SUFFIXES, ArrayReader, load_rgb, open_image
from pysynth.io.base import (
    DEFAULT_MPP,
    SlideReader,
    best_level,
    level0_extent,
    read_region,
    read_thumbnail,
    resolve_mpp,
)
from pysynth.io.grid import tile_grid
from pysynth.io.openslide_reader import OpenSlideReader
from pysynth.io.tissue import TissueMask, compute_tissue_mask, tissue_mask_from_rgb

#: Suffixes of slide formats OpenSlide reads (used to find slides in folders).
SLIDE_SUFFIXES = frozenset(
    {".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif", ".dcm"}
)

__all__ = [
    "DEFAULT_MPP",
    "IMAGE_SUFFIXES",
    "SLIDE_SUFFIXES",
    "ArrayReader",
    "OpenSlideReader",
    "SlideReader",
    "TissueMask",
    "best_level",
    "compute_tissue_mask",
    "level0_extent",
    "load_rgb",
    "open_image",
    "open_slide",
    "read_region",
    "read_thumbnail",
    "resolve_mpp",
    "tile_grid",
    "tissue_mask_from_rgb",
]


def open_slide(path: str | Path, input_mpp: float | None = None) -> SlideReader:
    """Open any supported slide or image file.

    OpenSlide is tried first (it recognises formats by content, not name); plain images (PNG, JPEG, untiled
    TIFF, BMP) are read whole with OpenCV.

    Args:
        path: The file.
        input_mpp: Level-0 µm/px to use when the file carries no plausible resolution.

    Returns:
        A reader; close it (or use it as a context manager) when done.

    Raises:
        SlideError: If the file is missing, unreadable, of an unsupported format, or has no known resolution.
    """
    import openslide

    path = Path(path)
    if not path.exists():
        raise SlideError(path, "no such file")
    if not path.is_file():
        raise SlideError(path, "not a file")
    try:
        vendor = openslide.OpenSlide.detect_format(str(path))
    except (openslide.OpenSlideError, OSError) as exc:
        raise SlideError(path, f"cannot be read ({exc})") from None
    if vendor is not None:
        return OpenSlideReader(path, input_mpp)
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return open_image(path, input_mpp)
    if _has_tiff_header(path):
        raise SlideError(path, "a TIFF-based file OpenSlide cannot open: truncated or damaged")
    if path.suffix.lower() in SLIDE_SUFFIXES:
        raise SlideError(path, f"not a slide: OpenSlide does not recognise its content as {path.suffix} or any format")
    raise SlideError(path, f"unsupported file type {path.suffix or '(no suffix)'}")


def _has_tiff_header(path: Path) -> bool:
    """Whether the file starts like a TIFF or BigTIFF (most slide formats are TIFF inside)."""
    try:
        with path.open("rb") as handle:
            head = handle.read(4)
    except OSError:
        return False
    return head in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")

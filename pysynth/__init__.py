"""pysynth: annotation-free nucleus segmentation for H&E whole-slide images.

Learns to segment nuclei from synthetic patches painted into real, unlabeled tissue (Hou et al., CVPR 2019), then
segments whole slides. The package is usable without its command line: see :mod:`pysynth.io` for slide reading,
tissue masks and tile grids, and :mod:`pysynth.sample` for tissue patch sampling.
"""

from __future__ import annotations

from pysynth._version import __version__
from pysynth.errors import PysynthError, SlideError

__all__ = ["PysynthError", "SlideError", "__version__", "data_path"]


def data_path(name: str):
    """Path of a file bundled with pysynth (for example ``"CMU-1-Small-Region.svs"``).

    Args:
        name: File name inside ``pysynth/data``.

    Returns:
        The file's path (a ``pathlib.Path``).

    Raises:
        FileNotFoundError: If pysynth bundles no such file.
    """
    from importlib.resources import files
    from pathlib import Path

    path = Path(str(files("pysynth") / "data" / name))
    if not path.is_file():
        raise FileNotFoundError(f"pysynth bundles no data file named {name!r}")
    return path

"""Readers over pixels held in memory: NumPy pyramids (for tests and tiling) and plain image files."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from pysynth.errors import SlideError
from pysynth.io.base import resolve_mpp

#: Plain image formats read with OpenCV when OpenSlide does not recognise the file.
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"})


class ArrayReader:
    """A :class:`~pysynth.io.base.SlideReader` over RGB arrays, level 0 first.

    Args:
        levels: One RGB ``uint8`` array ``(h, w, 3)`` per level, finest first; each later level a downsample.
        mpp: Level-0 resolution in µm/px.
        name: What to call the source in messages.
        mpp_source: Where ``mpp`` came from (``"user"`` or ``"metadata"``).

    Raises:
        ValueError: If a level is not an RGB ``uint8`` array or the levels do not shrink.
    """

    def __init__(
        self,
        levels: Sequence[np.ndarray] | np.ndarray,
        mpp: float,
        *,
        name: str = "<array>",
        mpp_source: str = "user",
    ) -> None:
        if isinstance(levels, np.ndarray):
            levels = [levels]
        if not levels:
            raise ValueError("ArrayReader needs at least one level")
        checked = []
        for i, level in enumerate(levels):
            if level.ndim != 3 or level.shape[2] != 3 or level.dtype != np.uint8:
                raise ValueError(f"level {i} must be an RGB uint8 array (h, w, 3), got {level.dtype} {level.shape}")
            if level.shape[0] == 0 or level.shape[1] == 0:
                raise ValueError(f"level {i} is empty: {level.shape}")
            checked.append(np.ascontiguousarray(level))
        h0, w0 = checked[0].shape[:2]
        downsamples = [1.0]
        for level in checked[1:]:
            downsamples.append(((h0 / level.shape[0]) + (w0 / level.shape[1])) / 2.0)
        if any(b <= a for a, b in itertools.pairwise(downsamples)):
            raise ValueError(f"levels must shrink from level 0 on, got downsamples {downsamples}")
        if not mpp > 0:
            raise ValueError(f"mpp must be positive, got {mpp}")
        self.name = name
        self.mpp = float(mpp)
        self.mpp_source = mpp_source
        self._levels = checked
        self.level_shapes_hw = tuple((int(a.shape[0]), int(a.shape[1])) for a in checked)
        self.level_downsamples = tuple(downsamples)

    def read_level(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """Read a rectangle of one level; outside the level is white (see the protocol)."""
        src = self._levels[level]
        out = np.full((h, w, 3), 255, np.uint8)
        sy0, sx0 = max(y, 0), max(x, 0)
        sy1, sx1 = min(y + h, src.shape[0]), min(x + w, src.shape[1])
        if sy1 > sy0 and sx1 > sx0:
            out[sy0 - y : sy1 - y, sx0 - x : sx1 - x] = src[sy0:sy1, sx0:sx1]
        return out

    def close(self) -> None:
        """Nothing to release for in-memory data."""

    def __enter__(self) -> ArrayReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ArrayReader({self.name!r}, levels={self.level_shapes_hw}, mpp={self.mpp})"


def load_rgb(path: str | Path) -> np.ndarray:
    """Decode an image file to RGB ``uint8``: grey is expanded, 16 bits scaled, transparency put on white.

    Args:
        path: A PNG, JPEG, TIFF or BMP file.

    Returns:
        RGB ``uint8`` array ``(h, w, 3)``.

    Raises:
        SlideError: If the file cannot be decoded as an image.
    """
    data = np.fromfile(str(path), dtype=np.uint8)
    image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if image is None:
        raise SlideError(path, "not a readable image (corrupt, truncated or not an image file)")
    if image.dtype == np.uint16:
        image = (image.astype(np.uint32) * 255 // 65535).astype(np.uint8)
    elif image.dtype != np.uint8:
        raise SlideError(path, f"unsupported pixel type {image.dtype} (8- or 16-bit images only)")
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    if image.shape[2] == 4:
        bgr = image[..., :3].astype(np.uint16)
        alpha = image[..., 3:].astype(np.uint16)
        image = ((bgr * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)
    return cv2.cvtColor(image[..., :3], cv2.COLOR_BGR2RGB)


def open_image(path: str | Path, input_mpp: float | None) -> ArrayReader:
    """Open a plain image file as a one-level reader; its resolution must be given.

    Args:
        path: The image file.
        input_mpp: Its resolution in µm/px (plain images carry none that can be trusted).

    Returns:
        An :class:`ArrayReader` named after the file.

    Raises:
        SlideError: If the file cannot be decoded or no resolution is given.
    """
    mpp, source = resolve_mpp(str(path), None, input_mpp)
    return ArrayReader([load_rgb(path)], mpp, name=str(path), mpp_source=source)

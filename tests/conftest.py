from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

SHARED_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


@pytest.fixture(scope="session")
def monuseg_tile() -> np.ndarray:
    """One real 1000 x 1000 H&E tile (RGB uint8) from the shared MoNuSeg training images."""
    images = sorted((SHARED_DATA / "monuseg-train" / "images").glob("*.png"))
    if not images:
        pytest.skip(f"no real tiles: {SHARED_DATA / 'monuseg-train' / 'images'} is absent or empty")
    return cv2.cvtColor(cv2.imread(str(images[0])), cv2.COLOR_BGR2RGB)

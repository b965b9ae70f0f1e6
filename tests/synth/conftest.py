from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest


@pytest.fixture(scope="session")
def monuseg_tile(shared_data: Path) -> np.ndarray:
    """One real 1000 x 1000 H&E tile (RGB uint8) from the shared MoNuSeg training images (pixels only)."""
    images = sorted((shared_data / "monuseg-train" / "images").glob("*.png"))
    if not images:
        pytest.skip("no real tiles in the shared MoNuSeg training images")
    return cv2.cvtColor(cv2.imread(str(images[0])), cv2.COLOR_BGR2RGB)

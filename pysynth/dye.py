"""Tissue-marking dye: found objects of a colour that no mix of hematoxylin and eosin gives.

Surgeons and pathologists ink the margins of a specimen (blue, green, black, ...), and the ink sits on and around
the tissue's edge as dark, nucleus-sized blobs that a segmenter takes for nuclei. In optical density (OD, Beer-
Lambert: stains add) hematoxylin absorbs red about as much as green (Ruifrok and Johnston's vector: red/green
0.65/0.70 = 0.93) and eosin hardly absorbs red (0.07/0.99), so every mix of the two has a red/green OD ratio
below 0.93. Blue, teal and green dyes absorb red far more than green. An object whose mean red OD is at least
:data:`RED_GREEN_LIMIT` times its mean green OD is therefore not an H&E-stained nucleus; the limit leaves room
for a hematoxylin 40% more red-absorbing than the reference. It reads no label and was not fitted
(``python -m pysynth.bench.dye``): the largest ratio of an annotated nucleus is 1.04 (MoNuSeg, 13 tiles of 7
organs); none of the shipped model's objects on MoNuSeg (largest 1.13) or on BRCA-M2C's 120 tiles (largest 1.28)
reaches it, and 255 of its 3,143 on the bundled dermis slide (the slide's blue-green margin ink) do.

Black ink absorbs all colours alike (ratio about 1) and is not caught; nor are red or yellow dyes (below 0.93).
"""

from __future__ import annotations

import numpy as np

#: Mean red OD over mean green OD at or above which an object is dye (see the module's docstring).
RED_GREEN_LIMIT = 1.3


def red_green_od(labels: np.ndarray, rgb: np.ndarray, n: int | None = None) -> np.ndarray:
    """Each label's mean red OD over its mean green OD (indexed by label; entry 0 and absent labels 0).

    OD per pixel is ``-ln((v + 1) / 256)`` of each 8-bit channel value ``v``.
    """
    n = int(labels.max()) if n is None else n
    where = np.flatnonzero(labels)
    ids = labels.ravel()[where]
    pixels = rgb.reshape(-1, 3)[where]
    od = -np.log((np.arange(256, dtype=np.float64) + 1.0) / 256.0)  # the 256 possible values
    red = np.bincount(ids, weights=od[pixels[:, 0]], minlength=n + 1)
    green = np.bincount(ids, weights=od[pixels[:, 1]], minlength=n + 1)
    out = np.zeros(n + 1, np.float64)
    np.divide(red, green, out=out, where=green > 0)
    out[(green == 0) & (red > 0)] = np.inf  # red absorbed, green not at all
    return out


def dye_labels(labels: np.ndarray, rgb: np.ndarray, n: int | None = None) -> np.ndarray:
    """Which labels are dye (bool indexed by label; entry 0 False): :func:`red_green_od` >= :data:`RED_GREEN_LIMIT`."""
    out = red_green_od(labels, rgb, n) >= RED_GREEN_LIMIT
    out[0] = False
    return out

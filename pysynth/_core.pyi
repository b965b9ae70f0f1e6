"""Type stub for the compiled core ``pysynth._core`` (kept in step with ``csrc/bindings.cpp``).

Private: arrays must already be C-contiguous with the exact dtypes below (no conversion happens); the public,
validating wrappers are in :mod:`pysynth.synth`.
"""

import numpy as np
import numpy.typing as npt

def build_info() -> dict[str, str | int | bool]: ...
def rasterize_labels(
    xy: npt.NDArray[np.float32],
    offsets: npt.NDArray[np.int64],
    ids: npt.NDArray[np.int32],
    labels: npt.NDArray[np.int32],
) -> None: ...
def rasterize_coverage(
    xy: npt.NDArray[np.float32], offsets: npt.NDArray[np.int64], coverage: npt.NDArray[np.float32]
) -> None: ...
def rgb_to_stains(
    rgb: npt.NDArray[np.uint8], stain_from_rgb: npt.NDArray[np.float32], out: npt.NDArray[np.float32]
) -> None: ...
def stains_to_rgb(
    stains: npt.NDArray[np.float32], rgb_from_stain: npt.NDArray[np.float32], out: npt.NDArray[np.uint8]
) -> None: ...
def inpaint_push_pull(
    image: npt.NDArray[np.uint8],
    mask: npt.NDArray[np.uint8],
    offsets_yx: npt.NDArray[np.int32],
    texture_levels: int,
    texture: float,
    out: npt.NDArray[np.uint8],
) -> None: ...
def composite(
    fg: npt.NDArray[np.uint8],
    bg: npt.NDArray[np.uint8],
    mask: npt.NDArray[np.float32],
    sharpness: npt.NDArray[np.float32] | None,
    k_sharp: npt.NDArray[np.float32],
    k_soft: npt.NDArray[np.float32],
    out: npt.NDArray[np.uint8],
) -> None: ...

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
def place_polygons(
    xy: npt.NDArray[np.float64],
    offsets: npt.NDArray[np.int64],
    max_overlap: float,
    min_area: int,
    max_accept: int,
    labels: npt.NDArray[np.int32],
    stats: npt.NDArray[np.float64],
) -> int: ...
def paint_nuclei(
    background: npt.NDArray[np.uint8],
    extra: npt.NDArray[np.float32] | None,
    labels: npt.NDArray[np.int32],
    grown: npt.NDArray[np.uint16],
    region: npt.NDArray[np.uint8],
    sharp: npt.NDArray[np.uint8],
    soft: npt.NDArray[np.uint8],
    mix: npt.NDArray[np.float32],
    darkness: npt.NDArray[np.float32],
    clear: npt.NDArray[np.uint8],
    texture: npt.NDArray[np.float32],
    speckle: npt.NDArray[np.float32],
    gain: npt.NDArray[np.float32],
    thin: npt.NDArray[np.float32],
    gain_lo: float,
    gain_span: float,
    thin_threshold: float,
    clear_factor: float,
    rim_gain: float,
    contrast: float,
    stain: npt.NDArray[np.float32],
    nuclear_jitter: npt.NDArray[np.float32],
    global_jitter: npt.NDArray[np.float32],
    out: npt.NDArray[np.uint8],
) -> None: ...
def draw_nuclei(
    seed: int,
    k: int,
    tissue: npt.NDArray[np.uint8],
    homography: npt.NDArray[np.float64],
    vertices_min: int,
    vertices_max: int,
    irregularity: float,
    spike_lo: float,
    spike_hi: float,
    smooth_rounds: int,
    radius_lo: float,
    radius_hi: float,
    size_factor: float,
    margin: float,
    max_overlap: float,
    min_area: int,
    max_accept: int,
    labels: npt.NDArray[np.int32],
    stats: npt.NDArray[np.float64],
) -> int: ...
def watershed(
    elevation: npt.NDArray[np.float32],
    mask: npt.NDArray[np.uint8],
    labels: npt.NDArray[np.int32],
    connectivity: int,
) -> None: ...
def trace_contours(
    labels: npt.NDArray[np.int32], n_labels: int
) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.int64]]: ...
def upsample2x_concat(
    low: npt.NDArray[np.float32],
    skip: npt.NDArray[np.float32],
    out: npt.NDArray[np.float32],
    threads: int,
) -> None: ...
def upsample2x_concat_bf16(
    low: npt.NDArray[np.uint16],
    skip: npt.NDArray[np.uint16],
    out: npt.NDArray[np.uint16],
    threads: int,
) -> None: ...
def max_pool2x2(input: npt.NDArray[np.float32], out: npt.NDArray[np.float32], threads: int) -> None: ...
def max_pool2x2_bf16(input: npt.NDArray[np.uint16], out: npt.NDArray[np.uint16], threads: int) -> None: ...
def label_moments(
    labels: npt.NDArray[np.int32], n: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.int64]]: ...
def label_reduce(
    labels: npt.NDArray[np.int32], values: npt.NDArray[np.float32], n: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64], npt.NDArray[np.float64]]: ...

"""Stage "network": the model as infer runs it (loaded once, BatchNorm folded, channels-last, optionally compiled)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pysynth.models.io import ModelInfo
from pysynth.models.unet import UNet
from pysynth.segment import predict_maps

from .config import InferConfig

log = logging.getLogger(__name__)

_MODELS: dict[tuple[str, tuple[int, int, int, int]], tuple[UNet, ModelInfo]] = {}


def inference_model(folder: str) -> tuple[UNet, ModelInfo]:
    """A model folder's network, BatchNorm folded and channels-last, and its description.

    Loaded once per process and folder, and again when the folder's weights or description change on disk (a
    model retrained into the same folder is never served stale).
    """
    from pysynth.models.io import META, WEIGHTS, load_model
    from pysynth.models.unet import fold_batchnorm

    try:
        stats = [(Path(folder) / name).stat() for name in (WEIGHTS, META)]
    except OSError:  # not a model folder: load_model says so in its own words
        load_model(folder)
        raise
    key = (str(Path(folder).resolve()), tuple(v for st in stats for v in (st.st_mtime_ns, st.st_size)))
    if key not in _MODELS:
        for old in [k for k in _MODELS if k[0] == key[0]]:
            del _MODELS[old]
        model, info = load_model(folder)
        _MODELS[key] = (fold_batchnorm(model).to(memory_format=torch.channels_last), info)
    return _MODELS[key]


_COMPILED: dict[int, Any] = {}


def compiled(model: UNet) -> Any:
    """``torch.compile`` of ``model`` (static shapes), made once per model object and kept for later slides."""
    key = id(model)
    if key not in _COMPILED:
        _COMPILED.clear()  # one model at a time: an earlier one's compiled graphs are not kept alive
        _COMPILED[key] = torch.compile(model, dynamic=False)
    return _COMPILED[key]


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of returning it to the system (idempotent).

    The network allocates and frees tens of activations of ~170 MB per 2,304² window; by default glibc maps each
    one fresh (``mmap``) and unmaps it on free, so every layer pays page faults on hundreds of MB. Serving them
    from the heap and never trimming it made the network 1.3-1.9× faster per window on this project's CPU machine
    (2.3 and 1.9 against 1.5 Mpx/s, best of 3) for a peak RSS higher by 0.3-0.7 GB. A no-op (False) where the C
    library is not glibc.
    """
    import ctypes
    import ctypes.util
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4  # glibc's mallopt parameters
        return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 1 << 40))
    except (OSError, AttributeError):
        return False


class Network:
    """The network stage of a run: a window's maps (detection, segmentation and, with a class output, lymphocyte).

    With ``config.compile`` the model runs through :func:`compiled`; where compiling fails (no compiler, an
    unsupported op) the stage warns once and runs eagerly from then on. On a GPU the call waits for the device, so
    its time is the network's.
    """

    def __init__(self, model: UNet, config: InferConfig, classes: bool) -> None:
        self.model = model
        self.config = config
        self.classes = classes
        self.device = next(model.parameters()).device
        self.net = compiled(model) if config.compile else model

    def _maps(self, normalised: np.ndarray) -> tuple[np.ndarray, ...]:
        config = self.config
        return predict_maps(
            self.net,
            normalised,
            tile=config.tile or max(normalised.shape[:2]),
            context=config.tile_context,
            precision=config.precision,
            tta=config.tta,
            classes=self.classes,
        )

    def __call__(self, normalised: np.ndarray) -> tuple[np.ndarray, ...]:
        """The maps of one window (float32, the window's size), averaged over ``config.tta`` flips/rotations."""
        try:
            maps = self._maps(normalised)
        except Exception as exc:  # torch.compile's backends raise many types (no compiler, unsupported op)
            if self.net is self.model:
                raise
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            log.warning("torch.compile failed (%s); the network runs eagerly", first)
            self.net = self.model
            maps = self._maps(normalised)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return maps

"""Saving and loading a trained segmenter: ``model.pt`` (weights) and ``model.json`` (everything else).

A model folder is self-describing: the network's shape, the resolution it works at, how its input is
normalised, the post-processing thresholds chosen on held-out synthetic patches, and the training run's
resolved configuration. :func:`default_model_dir` is the model shipped inside the package.
"""

from __future__ import annotations

import hashlib
import io
import json
import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from pysynth.errors import PysynthError
from pysynth.fsutil import atomic_write_bytes, atomic_write_text
from pysynth.instances import InstanceConfig
from pysynth.models.unet import UNet, UNetConfig

FORMAT = "pysynth-segmenter"
VERSION = 1
WEIGHTS = "model.pt"
META = "model.json"


class ModelError(PysynthError):
    """A model folder that cannot be used."""


@dataclass(frozen=True)
class ModelInfo:
    """What a model folder says about its network.

    Attributes:
        unet: The network's shape.
        mpp: Resolution the network works at (µm/px); inputs are resampled to it.
        instances: Post-processing thresholds and sizes.
        extra: Everything else recorded (training configuration, steps, wall time, ...).
    """

    unet: UNetConfig
    mpp: float
    instances: InstanceConfig
    extra: dict[str, Any]

    @property
    def has_classes(self) -> bool:
        """Whether the network has a class output (per-nucleus lymphocyte probability)."""
        return bool(self.unet.classes)

    @property
    def lymphocyte_threshold(self) -> float:
        """A nucleus whose lymphocyte probability is at least this is called a lymphocyte (model.json, or 0.5)."""
        return float((self.extra.get("classes") or {}).get("lymphocyte_threshold", 0.5))


def default_model_dir() -> Path:
    """The model shipped with the package."""
    return Path(__file__).resolve().parent / "default"


#: Models shipped inside the package, selected by name (``--model NAME``): their folders beside this file.
#: ``native20x`` works at 0.5 µm/px (20x slides without upsampling, 40x slides downsampled), without a class output.
#: ``lymphocytes`` is ``default`` fine-tuned with transplanted real nuclei classed label-free
#: (``SynthConfig.transplant_classes``): better lymphocyte calls, slightly lower AJI (its MODEL_CARD.md).
SHIPPED = ("default", "plain", "native20x", "lymphocytes")


def resolve_model_dir(spec: str | Path | None = None) -> Path:
    """The model folder a user names: None or a shipped model's name (:data:`SHIPPED`), else a folder path.

    A folder that exists wins over a shipped name, so a user's own ``./plain/`` is still theirs.
    """
    if spec is None:
        return default_model_dir()
    path = Path(spec).expanduser()
    if not path.exists() and str(spec) in SHIPPED:
        return Path(__file__).resolve().parent / str(spec)
    return path


def normalise(images: torch.Tensor) -> torch.Tensor:
    """uint8 RGB ``(N, 3, H, W)`` → the network's float input in [-1, 1]."""
    return images.float().mul_(1.0 / 127.5).sub_(1.0)


def save_model(
    folder: str | Path, model: UNet, mpp: float, instances: InstanceConfig, extra: dict[str, Any] | None = None
) -> None:
    """Write ``model.pt`` and ``model.json`` atomically (weights first, so a folder with a json is complete)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    state = {
        k: v.detach().to("cpu", torch.float32) if v.is_floating_point() else v.cpu()
        for k, v in model.state_dict().items()
    }
    torch.save(state, buffer)
    atomic_write_bytes(folder / WEIGHTS, buffer.getvalue())
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "unet": model.config.to_dict(),
        "mpp": mpp,
        "input": "RGB uint8 / 127.5 - 1",
        "instances": {f.name: getattr(instances, f.name) for f in fields(InstanceConfig)},
        **(extra or {}),
    }
    atomic_write_text(folder / META, json.dumps(meta, indent=1) + "\n")


def read_model_info(folder: str | Path) -> ModelInfo:
    """Parse ``model.json``.

    Raises:
        ModelError: If the folder has no ``model.json``/``model.pt``, or the json is not a compatible model.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelError(f"{folder}: no such model folder")
    if not (folder / META).is_file() or not (folder / WEIGHTS).is_file():
        raise ModelError(f"{folder}: not a model folder (needs {WEIGHTS} and {META}, as `pysynth train` writes)")
    try:
        meta = json.loads((folder / META).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ModelError(f"{folder / META}: unreadable ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ModelError(f"{folder / META}: not a pysynth segmenter description")
    if meta.get("version") != VERSION:
        raise ModelError(f"{folder / META}: format version {meta.get('version')}, this pysynth reads {VERSION}")
    try:
        unet = UNetConfig(**meta["unet"])
        instances = InstanceConfig(**meta["instances"])
        mpp = float(meta["mpp"])
        if not 0.02 <= mpp <= 50:
            raise ValueError(f"mpp {mpp} out of range")
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"{folder / META}: incompatible configuration ({exc})") from None
    extra = {k: v for k, v in meta.items() if k not in ("format", "version", "unet", "mpp", "instances", "input")}
    return ModelInfo(unet, mpp, instances, extra)


def _read_weights(path: Path) -> Any:
    """``torch.load`` of a weights file with ``weights_only=True`` (never arbitrary pickled objects).

    Raises:
        ModelError: If the file cannot be read, or is not a tensor archive (corrupt, truncated, or not made
            by pysynth). The message never suggests ``weights_only=False``: a file that fails here is not one
            to trust with arbitrary code execution.
    """
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols of foreign files: noise here
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except OSError as exc:
        raise ModelError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except Exception:  # torch raises anything (IndexError, KeyError, UnpicklingError, ...) on bad bytes
        raise ModelError(f"{path}: not a readable pysynth model (corrupt or truncated file)") from None


def load_model(folder: str | Path | None = None) -> tuple[UNet, ModelInfo]:
    """The network (eval mode, CPU, fp32) and its description; the shipped model when ``folder`` is None.

    Raises:
        ModelError: If the folder is not a usable model or its weights do not fit its configuration.
    """
    folder = default_model_dir() if folder is None else Path(folder)
    info = read_model_info(folder)
    model = UNet(info.unet)
    state = _read_weights(folder / WEIGHTS)
    try:
        model.load_state_dict(state)
    except (RuntimeError, ValueError, TypeError, AttributeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"{folder / WEIGHTS}: weights do not fit the configuration in {META} ({first})") from None
    return model.eval(), info


def model_digest(folder: str | Path) -> str:
    """A short hash of a model folder's weights and description (results made with it are tied to it)."""
    digest = hashlib.sha256()
    for name in (WEIGHTS, META):
        digest.update((Path(folder) / name).read_bytes())
    return digest.hexdigest()[:16]

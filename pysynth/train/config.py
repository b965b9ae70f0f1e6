"""Everything that defines a training run, in one frozen, validated configuration (saved beside the weights)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from pysynth.errors import PysynthError
from pysynth.models.unet import UNetConfig
from pysynth.synth.config import SynthConfig
from pysynth.train.augment import AugmentConfig


def _default_synth() -> SynthConfig:
    # 240 px patches leave room for the 0.8x zoom of augmentation before the 192 px crop.
    return SynthConfig(size=240)


@dataclass(frozen=True)
class TrainConfig:
    """A training run of the two-head U-Net on synthetic patches.

    Attributes:
        model: Network shape. The default (width 8, depth 4) is about 27 kFLOP per pixel: whole slides at CPU speed.
        synth: Synthesis parameters of the training patches.
        augment: Augmentation of each patch.
        steps: Optimiser steps.
        batch: Patches per step.
        crop: Side of the training crops (a multiple of ``2**model.depth``).
        lr: Peak learning rate (AdamW; linear warm-up, then cosine decay to 2% of it).
        warmup: Warm-up steps.
        weight_decay: AdamW weight decay.
        dice_weight: Weight of the soft Dice term added to the BCE of each head.
        class_weight: Weight of the class head's loss (BCE over the nuclear pixels of synthetic nuclei with a
            known class), when ``model.classes`` is 1.
        detection_target: ``"core"`` (each nucleus' inner part, see :func:`pysynth.train.targets.core_targets`)
            or ``"centre"`` (the dilated centre pixel, as the released code did).
        core_fraction: Depth of the core, as a fraction of the nucleus' largest inner distance.
        border: Pixels within this distance of a crop's edge get weight ``border_weight`` in the loss.
        border_weight: Loss weight of border pixels.
        seed: Seed of everything random: initial weights, synthesis, augmentation, validation patches.
        checkpoint_every: Steps between checkpoints (exact resume point).
        snapshot_every: Steps between kept weight snapshots (0: none); for learning curves.
        val_patches: Held-out synthetic patches on which post-processing thresholds are chosen.
        threads: Torch intra-op threads (0: torch's default).
        init: A model folder (``model.pt`` + ``model.json`` of the same shape) whose weights the segmenter starts
            from instead of a random initialisation: fine-tuning, e.g. on a new tissue type or with the full
            method from a plainly trained model. Empty: random initialisation.
    """

    model: UNetConfig = field(default_factory=lambda: UNetConfig(width=8, depth=4, max_width=128))
    synth: SynthConfig = field(default_factory=_default_synth)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    steps: int = 3000
    batch: int = 16
    crop: int = 192
    lr: float = 3e-3
    warmup: int = 100
    weight_decay: float = 1e-4
    dice_weight: float = 0.5
    class_weight: float = 1.0
    detection_target: str = "core"
    core_fraction: float = 0.5
    border: int = 8
    border_weight: float = 0.1
    seed: int = 0
    checkpoint_every: int = 100
    snapshot_every: int = 500
    val_patches: int = 96
    threads: int = 0
    init: str = ""

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> None:
            raise ValueError(f"TrainConfig.{name} {why}, got {getattr(self, name)!r}")

        for name in ("steps", "batch", "checkpoint_every", "val_patches"):
            if getattr(self, name) < 1:
                bad(name, "must be at least 1")
        for name in ("warmup", "snapshot_every", "border", "threads"):
            if getattr(self, name) < 0:
                bad(name, "must be non-negative")
        if self.class_weight < 0:
            bad("class_weight", "must be non-negative")
        if self.lr <= 0 or self.weight_decay < 0 or self.dice_weight < 0:
            bad("lr", "and weight_decay, dice_weight must be positive / non-negative")
        if self.crop % 2**self.model.depth or self.crop < 2**self.model.depth:
            bad("crop", f"must be a positive multiple of 2**model.depth = {2**self.model.depth}")
        if self.detection_target not in ("core", "centre"):
            bad("detection_target", "must be 'core' or 'centre'")
        if not 0 < self.core_fraction <= 1:
            bad("core_fraction", "must be in (0, 1]")
        if not 0 <= self.border_weight <= 1:
            bad("border_weight", "must be in [0, 1]")
        if not isinstance(self.init, str):
            bad("init", "must be a model folder (a string) or empty")

    def to_dict(self) -> dict:
        """JSON/YAML-able form, nested by part."""
        out = asdict(self)
        out["model"], out["synth"], out["augment"] = self.model.to_dict(), self.synth.to_dict(), self.augment.to_dict()
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Build from a (partial) nested dict; missing fields keep their defaults, unknown ones raise ``ValueError``."""
        values = dict(values)
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown training parameter(s): {', '.join(sorted(unknown))}")
        default = cls()
        if "model" in values:
            model = {**default.model.to_dict(), **(values["model"] or {})}
            unknown = set(model) - {f.name for f in fields(UNetConfig)}
            if unknown:
                raise ValueError(f"unknown model parameter(s): {', '.join(sorted(unknown))}")
            values["model"] = UNetConfig(**model)
        if "synth" in values:
            values["synth"] = SynthConfig.from_dict({**default.synth.to_dict(), **(values["synth"] or {})})
        if "augment" in values:
            values["augment"] = AugmentConfig.from_dict({**default.augment.to_dict(), **(values["augment"] or {})})
        return cls(**values)


def load_config_file(path: str | Path) -> dict[str, Any]:
    """A YAML (or JSON, a subset of YAML) mapping of training parameters.

    Raises:
        PysynthError: If the file cannot be read or parsed, or is not a mapping.
    """
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise PysynthError(f"{path}: not a readable YAML file ({str(exc).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise PysynthError(f"{path}: expected a mapping of training parameters, got {type(data).__name__}")
    return data


def dump_config(config: TrainConfig) -> str:
    """The resolved configuration as YAML (every parameter, defaults included)."""
    import json

    import yaml

    return yaml.safe_dump(json.loads(json.dumps(config.to_dict())), sort_keys=False)  # tuples become lists

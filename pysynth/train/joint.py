"""Joint training of the full method: refiner G, discriminator D and the importance-weighted segmenter.

One *step* is one segmenter update; G and D are updated on a schedule (:class:`JointConfig`). Step ``t``:

1. Synthetic items ``t·B .. t·B + B - 1`` (initial patch, labels, and the reference crop of the same source tile)
   and, on D steps, real pairs ``(R, S_R)``: two crops of one real source tile. Every item depends on
   ``(seed, index)`` only, as in :mod:`pysynth.train.loop`.
2. G refines the initial patches, conditioned on their references: ``X = G(I, S)``.
3. D step: ``(R, S_R)`` against history-buffered ``(X, S)`` (SimGAN image history).
4. Importance weights ``w = clip(c·D/(1 − D))`` from D's map on ``(X, S)``, without gradient.
5. Segmenter step on the augmented refined patches, each sample's loss multiplied by its ``w``.
6. G step: ``alpha·L_reg + beta·L_real + gamma·L_hard`` with ``L_hard = −`` the segmenter's loss on the refined batch.

The checkpoint holds all three networks, their optimisers, the history buffer, the step and the logged rows, so
a run stopped at any moment resumes to the same weights.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pysynth.errors import PysynthError
from pysynth.gan.losses import GanLossConfig, discriminator_loss, refiner_loss
from pysynth.gan.models import Discriminator, GanConfig, HistoryBuffer, Refiner
from pysynth.gan.weights import importance_weights, weight_report
from pysynth.kernels.weighted_loss import weighted_two_head_loss
from pysynth.models.io import normalise, save_model
from pysynth.models.unet import UNet
from pysynth.runs import sources_files
from pysynth.train.config import TrainConfig, dump_config
from pysynth.train.loop import (
    VAL_OFFSET,
    WORK,
    ItemMaker,
    batch_tensors,
    item_targets,
    make_source,
    new_segmenter,
    segmenter_update,
    set_lr,
    validate_thresholds,
)
from pysynth.train.run import StepResult, TrainingRun, atomic_torch_save
from pysynth.train.targets import two_head_loss

log = logging.getLogger("pysynth")

JOINT_CONFIG = "joint.yaml"
REFINER = "refiner.pt"
DISCRIMINATOR = "discriminator.pt"
GRID = "refined_grid.png"
HISTOGRAM = "weight_histogram.png"
CHECKPOINT_FORMAT = "pysynth-joint-checkpoint"
CHECKPOINT_VERSION = 1
GAN_FORMAT = "pysynth-gan"
#: Real pairs come from their own random streams, apart from the synthetic items' and augmentations'.
REAL_SALT = 104_729
LOG_EVERY = 10
#: G's loss parts (:func:`pysynth.gan.losses.refiner_loss`) → their columns in ``losses.csv``.
_G_COLUMNS = {"total": "g_loss", "real": "g_real", "reg": "g_reg", "hard": "g_hard", "mean_abs_change": "g_change"}
#: Columns of ``losses.csv``: the segmenter's, D's and G's losses and the weights, per logged step.
COLUMNS = (
    *("step", "loss", "bce_detection", "bce_segmentation", "lr"),
    *("d_loss", "d_p_real_on_real", "d_p_real_on_fake", "d_accuracy"),
    *("g_loss", "g_real", "g_reg", "g_hard", "g_change"),
    *("w_mean", "w_min", "w_max", "p_real", "collapsed", "wall_s"),
)


def _cpu_gan() -> GanConfig:
    # Half the released widths (32 → 16) and 3 of 5 residual blocks: at 32×5 the refiner alone costs ~7× the
    # default segmenter per pixel, at 16×3 about as much. 5 stride-2 stages give D a 6×6 map on 240 px patches
    # (~40 px cells at 0.25 µm/px), the released 5×5 on 400 px with 6 stages (~80 px cells) scaled to our patches.
    return GanConfig(style_channels=16, refiner_channels=16, refiner_blocks=3, disc_channels=16, disc_layers=5)


@dataclass(frozen=True)
class JointConfig:
    """The GAN half of a joint training run (the segmenter's half is :class:`pysynth.train.config.TrainConfig`).

    Schedule, in segmenter steps (the defaults fit a CPU budget of about 1,500 steps):

    - steps ``[0, seg_warmup)``: the segmenter alone on initial patches, weight 1. The released code pretrained
      each network for 1,000 steps first; here the segmenter warm-up makes ``L_hard`` (the segmenter's loss)
      meaningful before G sees it.
    - ``[seg_warmup, seg_warmup + d_warmup)``: D alone, every step, on real pairs against initial patches (G is
      still the identity), so G's first ``L_real`` gradients and the first weights come from a trained D.
      SimGAN also pretrains G on ``L_reg`` alone; here that is a no-op (G starts as the identity, where ``L_reg``
      and its gradient are zero), so there is no G warm-up.
    - from ``seg_warmup + d_warmup``: G refines every batch, importance weights apply, G steps every
      ``g_every`` and D every ``d_every`` steps. The released loop ran rounds of 6 segmenter, 2 G and 1 D steps
      (K_l, K_g, K_d; ≈ 62k / 23k / 12k in total), hence ``g_every=3``, ``d_every=6``. With the default
      warm-ups, 1,500 steps give 400 G and 300 D steps.

    Attributes:
        gan: Shape of G and D (default: narrower than the released 32-wide, 5-block refiner, for CPU budgets).
            ``gan.use_reference`` follows the ``reference`` switch.
        loss: Weights of G's loss (default: the paper's alpha = beta = 1, gamma = 1e-7, lambda1 = 1e-5, lambda2 = 1e-4).
        refiner: Train and use G (``--no-refiner``: the segmenter sees the initial patches).
        reference: Condition G and D on the reference patch (``--no-reference``).
        importance: Multiply each sample's loss by its importance weight (``--no-importance``: weight 1; D is
            still trained when G needs it, and its weights are still logged and pictured).
        hard: Add ``gamma·L_hard`` to G's loss (``--no-hard``; also off when ``loss.gamma`` is 0).
        weight_clip: ``(low, high)`` clip of the weights (released code: [0.2, 2.0]; ``high`` may be inf).
        c: Prior ratio in ``w = c·D/(1 − D)``. 1 because :func:`pysynth.gan.losses.discriminator_loss` averages
            the real and the synthetic half separately (equal priors whatever the batch sizes).
        lr_g: Adam learning rate of G (constant).
        lr_d: Adam learning rate of D (constant).
        betas: Adam betas of G and D; β1 = 0.5 as usual for GANs (DCGAN): less momentum against a moving opponent.
        seg_warmup: Segmenter-only steps at the start.
        d_warmup: D-only steps after the segmenter warm-up.
        g_every: A G step every this many steps once G runs.
        d_every: A D step every this many steps after the D warm-up.
        history: Capacity of D's image history, in patches (SimGAN). Patches are kept as uint8 and saved in the
            checkpoint: 128 patches of 240² with their references take 44 MB.
        history_fraction: Share of D's synthetic half drawn from the history (SimGAN: half).
        real_batch: Real pairs per D step (0: the segmenter's batch size).
        preview: Held-out patches shown in ``refined_grid.png``.
    """

    gan: GanConfig = field(default_factory=_cpu_gan)
    loss: GanLossConfig = field(default_factory=GanLossConfig)
    refiner: bool = True
    reference: bool = True
    importance: bool = True
    hard: bool = True
    weight_clip: tuple[float, float] = (0.2, 2.0)
    c: float = 1.0
    lr_g: float = 2e-4
    lr_d: float = 2e-4
    betas: tuple[float, float] = (0.5, 0.999)
    seg_warmup: int = 200
    d_warmup: int = 100
    g_every: int = 3
    d_every: int = 6
    history: int = 128
    history_fraction: float = 0.5
    real_batch: int = 0
    preview: int = 8

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> None:
            raise ValueError(f"JointConfig.{name} {why}, got {getattr(self, name)!r}")

        if not isinstance(self.gan, GanConfig) or not isinstance(self.loss, GanLossConfig):
            raise ValueError("JointConfig.gan and .loss must be a GanConfig and a GanLossConfig")
        for name in ("refiner", "reference", "importance", "hard"):
            if not isinstance(getattr(self, name), bool):
                bad(name, "must be true or false")
        if not self.reference:
            object.__setattr__(self, "gan", replace(self.gan, use_reference=False))
        elif not self.gan.use_reference:
            bad("gan", "has use_reference false: switch the reference off with reference=false (--no-reference)")
        object.__setattr__(self, "weight_clip", tuple(float(v) for v in self.weight_clip))
        object.__setattr__(self, "betas", tuple(float(v) for v in self.betas))
        clip = self.weight_clip
        if len(clip) != 2 or not 0 <= clip[0] <= clip[1] or not math.isfinite(clip[0]):
            bad("weight_clip", "must be (low, high) with 0 <= low <= high (high may be inf)")
        if not (math.isfinite(self.c) and self.c > 0):
            bad("c", "must be finite and > 0")
        for name in ("lr_g", "lr_d"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                bad(name, "must be finite and > 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            bad("betas", "must be two numbers in [0, 1)")
        for name in ("g_every", "d_every", "history"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                bad(name, "must be an integer >= 1")
        for name in ("seg_warmup", "d_warmup", "real_batch", "preview"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                bad(name, "must be an integer >= 0")
        if not 0 <= self.history_fraction <= 1:
            bad("history_fraction", "must be in [0, 1]")

    @property
    def gan_start(self) -> int:
        """First step at which G refines and importance weights apply."""
        return self.seg_warmup + self.d_warmup

    @property
    def uses_discriminator(self) -> bool:
        """Whether D is built and trained (G needs it; so do importance weights)."""
        return self.refiner or self.importance

    @property
    def uses_hard(self) -> bool:
        """Whether G's loss has the hard-example term."""
        return self.refiner and self.hard and self.loss.gamma > 0

    def d_step_at(self, step: int) -> bool:
        """Whether D is updated at ``step`` (0-based)."""
        if not self.uses_discriminator or step < self.seg_warmup:
            return False
        return step < self.gan_start or (step - self.gan_start) % self.d_every == 0

    def g_step_at(self, step: int) -> bool:
        """Whether G is updated at ``step`` (0-based)."""
        return self.refiner and step >= self.gan_start and (step - self.gan_start) % self.g_every == 0

    def to_dict(self) -> dict[str, Any]:
        """JSON/YAML-able form, nested by part."""
        out = asdict(self)
        out["gan"], out["loss"] = self.gan.to_dict(), self.loss.to_dict()
        out["weight_clip"], out["betas"] = list(self.weight_clip), list(self.betas)
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> JointConfig:
        """Build from a (partial) nested dict; missing fields keep their defaults, unknown ones raise ``ValueError``."""
        values = dict(values)
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown joint-training parameter(s): {', '.join(sorted(unknown))}")
        default = cls()
        for key, kind in (("gan", GanConfig), ("loss", GanLossConfig)):
            if key in values:
                merged = {**getattr(default, key).to_dict(), **(values[key] or {})}
                unknown = set(merged) - {f.name for f in fields(kind)}
                if unknown:
                    raise ValueError(f"unknown {key} parameter(s): {', '.join(sorted(unknown))}")
                values[key] = kind(**merged)
        if values.get("reference") is False and "gan" in values:
            values["gan"] = replace(values["gan"], use_reference=False)
        return cls(**values)


def dump_joint_config(joint: JointConfig) -> str:
    """The resolved joint configuration as YAML (every parameter, defaults included)."""
    import yaml

    return yaml.safe_dump(json.loads(json.dumps(joint.to_dict())), sort_keys=False)


# --- data -----------------------------------------------------------------------------------------------------


def _load_tiles(folder: Path) -> list[np.ndarray]:
    """The real RGB tiles prepared for synthesis in ``folder/sources`` (the real half of D's data)."""
    from pysynth.synth.generate import SOURCES_DIR

    try:
        names = json.loads((folder / SOURCES_DIR / "sources.json").read_text())["names"]
        tiles = []
        for k in range(len(names)):
            with np.load(folder / SOURCES_DIR / f"{k:05d}.npz") as z:
                tiles.append(z["rgb"])
    except (OSError, ValueError, KeyError) as exc:
        raise PysynthError(f"{folder / SOURCES_DIR}: cannot read the real source tiles ({exc})") from None
    if not tiles:
        raise PysynthError(f"{folder / SOURCES_DIR}: no real source tiles")
    return tiles


@dataclass
class _JointItems:
    """Raw items of a step (before refinement): synthetic patches with references, real pairs, L_hard targets."""

    source: Callable[[int], tuple[dict[str, np.ndarray], dict]]
    tiles: list[np.ndarray]
    config: TrainConfig
    joint: JointConfig

    def synthetic(self, index: int) -> dict[str, Any]:
        arrays, meta = self.source(index)
        image, labels = arrays["image"], arrays["labels"]
        s = image.shape[0]
        rx, ry = int(arrays["xy"][2]), int(arrays["xy"][3])
        reference = self.tiles[int(meta["source"])][ry : ry + s, rx : rx + s]
        if reference.shape != image.shape:
            raise PysynthError(f"synthetic item {index}: its reference crop {reference.shape} does not fit its tile")
        return {"index": index, "image": image, "labels": labels, "reference": np.ascontiguousarray(reference)}

    def real_pair(self, index: int, size: int) -> tuple[np.ndarray, np.ndarray]:
        """Real pair ``index``: two uniform crops of one uniformly chosen tile, as synthesis picks its crops."""
        from pysynth.synth.store import item_rng

        rng = item_rng(self.config.seed + REAL_SALT, index)
        tile = self.tiles[int(rng.integers(len(self.tiles)))]
        h, w = tile.shape[:2]
        (x0, x1), (y0, y1) = rng.integers(0, w - size + 1, 2), rng.integers(0, h - size + 1, 2)
        return tile[y0 : y0 + size, x0 : x0 + size], tile[y1 : y1 + size, x1 : x1 + size]

    def hard_targets(self, labels: np.ndarray) -> tuple[np.ndarray, ...]:
        """Targets of the central crop on which G's hard-example term runs the segmenter."""
        side = _hard_side(labels.shape[0], self.config)
        top = (labels.shape[0] - side) // 2
        return item_targets(labels[top : top + side, top : top + side].astype(np.int32), 1.0, self.config)

    def batch(self, step: int) -> dict[str, Any]:
        c, j = self.config, self.joint
        items = [self.synthetic(step * c.batch + k) for k in range(c.batch)]
        out: dict[str, Any] = {"items": items}
        if j.d_step_at(step):
            n = j.real_batch or c.batch
            size = items[0]["image"].shape[0]
            out["real"] = [self.real_pair(step * n + k, size) for k in range(n)]
        if j.uses_hard and j.g_step_at(step):
            out["hard"] = [self.hard_targets(it["labels"]) for it in items]
        return out


def _hard_side(size: int, config: TrainConfig) -> int:
    multiple = 2**config.model.depth
    return max(multiple, min(config.crop, size) // multiple * multiple)


def _images(arrays: Sequence[np.ndarray], device: torch.device) -> torch.Tensor:
    """uint8 ``(N, H, W, 3)`` arrays → uint8 ``(N, 3, H, W)`` tensor, channels-last (the faster layout here)."""
    return (
        torch.from_numpy(np.stack(arrays)).to(device).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
    )


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pysynth.models.io.normalise`, rounded: what the segmenter and D see are 8-bit images."""
    return ((x.detach().float() + 1.0) * 127.5).round_().clamp_(0, 255).to(torch.uint8)


@contextlib.contextmanager
def _frozen(*modules: torch.nn.Module | None) -> Iterator[None]:
    """Parameters without gradient inside (gradients still flow through to the inputs)."""
    params = [p for m in modules if m is not None for p in m.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


# --- refiner and discriminator files --------------------------------------------------------------------------


def _save_gan(path: Path, module: Refiner | Discriminator) -> None:
    """Weights (fp32, CPU) with the network's kind and shape, so :func:`load_gan` needs nothing else."""
    state = {k: v.detach().to("cpu", torch.float32) for k, v in module.state_dict().items()}
    kind = "refiner" if isinstance(module, Refiner) else "discriminator"
    atomic_torch_save({"format": GAN_FORMAT, "kind": kind, "gan": module.config.to_dict(), "state_dict": state}, path)


def load_gan(path: str | Path) -> Refiner | Discriminator:
    """A refiner or discriminator written by :func:`train_joint` (``refiner.pt`` / ``discriminator.pt``), eval mode.

    Raises:
        PysynthError: If the file is not one of them.
    """
    import pickle

    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state["format"] != GAN_FORMAT:
            raise ValueError(f"format {state['format']!r}")
        kinds = {"refiner": Refiner, "discriminator": Discriminator}
        module = kinds[state["kind"]](GanConfig(**state["gan"]))
        module.load_state_dict(state["state_dict"])
    except (OSError, RuntimeError, EOFError, ValueError, KeyError, TypeError, pickle.UnpicklingError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise PysynthError(f"{path}: not a refiner or discriminator of joint training ({first})") from None
    return module.eval()


@dataclass
class _Nets:
    """The networks, optimisers and image history of joint training: what its checkpoint holds besides the run's.

    Field names are the checkpoint's keys (``history`` too); a network the configuration leaves out is None.
    """

    segmenter: UNet
    seg_optimiser: torch.optim.Optimizer
    refiner: Refiner | None
    g_optimiser: torch.optim.Optimizer | None
    discriminator: Discriminator | None
    d_optimiser: torch.optim.Optimizer | None
    history: HistoryBuffer | None

    @classmethod
    def build(cls, config: TrainConfig, joint: JointConfig, device: torch.device) -> _Nets:
        """Fresh networks; the segmenter first, so that its initial weights are those of plain training."""
        segmenter, seg_opt = new_segmenter(config, device)
        refiner = Refiner(joint.gan).to(device, memory_format=torch.channels_last) if joint.refiner else None
        disc = (
            Discriminator(joint.gan).to(device, memory_format=torch.channels_last) if joint.uses_discriminator else None
        )
        g_opt = torch.optim.Adam(refiner.parameters(), lr=joint.lr_g, betas=joint.betas) if refiner else None
        d_opt = torch.optim.Adam(disc.parameters(), lr=joint.lr_d, betas=joint.betas) if disc else None
        history = HistoryBuffer(joint.history, fraction=joint.history_fraction, seed=config.seed) if disc else None
        return cls(segmenter, seg_opt, refiner, g_opt, disc, d_opt, history)

    def state(self) -> dict[str, Any]:
        """Every part's ``state_dict()`` (None for an absent one), under its field name."""
        return {f.name: None if (v := getattr(self, f.name)) is None else v.state_dict() for f in fields(self)}

    def restore(self, saved: dict[str, Any]) -> None:
        """Load a checkpoint's parts in place.

        Raises:
            ValueError: If a part is present in the checkpoint but absent here, or the reverse.
        """
        for f in fields(self):
            part = getattr(self, f.name)
            if (part is None) != (saved.get(f.name) is None):
                if f.name == "history":
                    raise ValueError("the image history does not match")
                raise ValueError(f"{f.name}: {'absent from' if part is None else 'missing in'} the checkpoint")
            if part is not None:
                part.load_state_dict(saved[f.name])


# --- the loop -------------------------------------------------------------------------------------------------


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else math.nan


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def train_joint(
    config: TrainConfig,
    joint: JointConfig,
    out_dir: str | Path,
    *,
    real: Sequence[Path] = (),
    synthetic: Path | None = None,
    input_mpp: float | None = None,
    overwrite: bool = False,
    progress: Callable[[int, dict[str, float]], None] | None = None,
    sources_note: Sequence[str] = (),
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """Train (or resume) segmenter, refiner and discriminator jointly into ``out_dir``; returns the summary.

    Data as in :func:`pysynth.train.loop.train`: synthesis streamed from the ``real`` tiles, or a stored
    ``synthetic`` dataset; the real half of D's data are crops of the same prepared source tiles.

    Writes ``config.yaml`` and ``joint.yaml`` (the resolved configurations), ``checkpoint.pt`` every
    ``checkpoint_every`` steps, ``snapshots/``, ``losses.csv`` and ``loss_curve.png`` (segmenter, D and G losses and
    the weights per logged step), and at the end ``model.pt`` + ``model.json`` (the segmenter, with thresholds
    chosen on held-out synthetic patches), ``validation.json``, ``refiner.pt`` (with a refiner) and
    ``discriminator.pt`` (with a discriminator), ``refined_grid.png`` (initial vs refined held-out patches and
    their weights) and ``weight_histogram.png`` (the held-out weights, split by D > 0.5 or not).

    Raises:
        PysynthError: If ``out_dir`` holds a run with other settings (unless ``overwrite``), its checkpoint is
            corrupt or does not fit, the data cannot be used, or the patches are too small for D.
    """
    if config.model.classes:
        raise PysynthError(
            "a network with a class output (model.classes: 1) is trained without --gan for now: "
            "joint refiner training does not carry nucleus classes"
        )
    if config.synth.factor > 1:
        raise PysynthError(
            f"synth.output_mpp {config.synth.output_mpp} is trained without --gan for now: the refiner's "
            "reference crops are taken at the synthesis resolution"
        )
    out_dir = Path(out_dir)
    run = TrainingRun(
        out_dir,
        config,
        checkpoint_format=CHECKPOINT_FORMAT,
        checkpoint_version=CHECKPOINT_VERSION,
        columns=COLUMNS,
        make_row=lambda run, lr: _row(run, lr, joint),
        progress=progress,
        counters={"warned": False, "g_steps": 0, "d_steps": 0},
    )
    run.claim(
        {"config.yaml": dump_config(config), JOINT_CONFIG: dump_joint_config(joint), **sources_files(real, synthetic)},
        overwrite,
        stale=(REFINER, DISCRIMINATOR, GRID, HISTOGRAM),
    )
    device = torch.device(device)
    nets = _Nets.build(config, joint, device)
    misfit = "checkpoint does not fit this configuration ({}); delete it or train with --overwrite"
    run.resume(nets.state, nets.restore, misfit)
    source = make_source(config, out_dir, real, synthetic, input_mpp)
    maker = ItemMaker(source, config)
    raw = _JointItems(source, _load_tiles(Path(synthetic) if synthetic is not None else out_dir / WORK), config, joint)
    nets.segmenter.train()
    step = functools.partial(_joint_step, nets=nets, run=run, joint=joint, maker=maker, device=device)
    run.run_steps(raw.batch, step, snapshot=nets.segmenter)  # the next step's raw items are made while one trains
    return _finish(config, joint, out_dir, run, nets, maker, raw, device, sources_note)


def _joint_step(
    step: int,
    data: dict[str, Any],
    *,
    nets: _Nets,
    run: TrainingRun,
    joint: JointConfig,
    maker: ItemMaker,
    device: torch.device,
) -> StepResult:
    """Step ``step`` on its raw items: G refines, D steps, the weighted segmenter steps, G steps (on schedule)."""
    config = run.config
    segmenter, seg_opt, refiner, g_opt = nets.segmenter, nets.seg_optimiser, nets.refiner, nets.g_optimiser
    disc, d_opt, history = nets.discriminator, nets.d_optimiser, nets.history
    items = data["items"]
    _check_sizes(items[0]["image"].shape[0], disc)  # cheap (arithmetic): the first step fails before any work
    record: dict[str, Any] = {}
    initial = _images([it["image"] for it in items], device)
    refs = _images([it["reference"] for it in items], device) if joint.gan.use_reference else None
    g_due = joint.g_step_at(step)

    # G refines (with a graph only when G steps now); before gan_start G is the identity anyway.
    refined = None
    if refiner is not None and step >= joint.gan_start:
        with torch.set_grad_enabled(g_due):
            refined = refiner(normalise(initial), None if refs is None else normalise(refs))
    shown = initial if refined is None else _to_uint8(refined)

    if joint.d_step_at(step):
        assert disc is not None
        assert d_opt is not None
        assert history is not None
        record.update(_d_step(disc, d_opt, history, shown, refs, data["real"], device))
        run.counters["d_steps"] += 1

    # Importance weights from D's map on (refined, reference), after D's update; no gradient.
    d_map = None
    if disc is not None and step >= joint.gan_start:
        with torch.no_grad():
            d_map = torch.sigmoid(disc(normalise(shown), None if refs is None else normalise(refs)))
    if d_map is not None:
        record["d_weights"] = importance_weights(d_map, joint.c, joint.weight_clip)
        record["p_real"] = float(d_map.mean())

    # Order: refine the initial patch, then augment it for the segmenter. D compares refined patches with
    # real crops that are not augmented, so its odds estimate p/g of the synthesis, not of augmentation
    # artefacts (stain jitter, blur, noise, zoom); refining augmented crops would teach D to spot the
    # augmentation, down-weight strongly augmented samples and make G undo it. The segmenter sees 8-bit
    # refined pixels, as at inference. L_hard runs the segmenter on the refined patch itself (below).
    patches = shown.permute(0, 2, 3, 1).cpu().numpy() if refined is not None else None
    seg_items = [
        maker.finish(it["index"], it["image"] if patches is None else patches[k], it["labels"])
        for k, it in enumerate(items)
    ]
    batch = {k: v.to(device, non_blocking=True) for k, v in batch_tensors(seg_items).items()}
    lr = set_lr(seg_opt, step, config)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        logits = segmenter(batch["image"]).float()
    if joint.importance and d_map is not None:
        # The fused op (Triton on CUDA): w = c·D/(1 − D) from D's map, the pixel-weighted BCE and soft Dice
        # of both heads in one reduction; its mean is two_head_loss with those weights and this dice_weight.
        per_sample, used = weighted_two_head_loss(
            logits,
            batch["detection"],
            batch["segmentation"],
            batch["weights"],
            d_map,
            c=joint.c,
            clip_lo=joint.weight_clip[0],
            clip_hi=joint.weight_clip[1],
            dice_weight=config.dice_weight,
        )
        loss = per_sample.mean()
        with torch.no_grad():
            _, parts = two_head_loss(logits, batch["detection"], batch["segmentation"], batch["weights"])
    else:
        used = batch["sample_weight"]
        loss, parts = two_head_loss(
            logits,
            batch["detection"],
            batch["segmentation"],
            batch["weights"],
            used,
            dice_weight=config.dice_weight,
        )
    segmenter_update(seg_opt, segmenter, loss)
    record.update(parts, loss=float(loss.detach()), weights=used.detach().float().cpu())

    if g_due:
        assert g_opt is not None
        assert disc is not None
        assert refined is not None
        with _frozen(disc, segmenter):
            d_on_refined = disc(refined, None if refs is None else normalise(refs))
            task = _hard_loss(segmenter, refined, data.get("hard"), config, device)
            g_loss, g_parts = refiner_loss(refined, normalise(initial), d_on_refined, task, joint.loss)
        g_opt.zero_grad(set_to_none=True)
        g_loss.backward()
        g_opt.step()
        run.counters["g_steps"] += 1
        record.update({column: g_parts[part] for part, column in _G_COLUMNS.items()})

    shown_parts = {"loss": record["loss"], "w_mean": float(record["weights"].mean())}
    shown_parts.update({k: record[k] for k in ("d_loss", "g_loss") if k in record})
    # The record joins the checkpointed logging window, so a resumed run logs the same rows.
    record = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in record.items()}
    return StepResult(record, lr, shown_parts)


def _d_step(
    disc: Discriminator,
    optimiser: torch.optim.Optimizer,
    history: HistoryBuffer,
    shown: torch.Tensor,
    refs: torch.Tensor | None,
    pairs: list[tuple[np.ndarray, np.ndarray]],
    device: torch.device,
) -> dict[str, float]:
    """One D update: real pairs ``(R, S_R)`` against this step's (refined, reference) pairs mixed with history."""
    fake = history.push_and_sample((shown.cpu(), refs.cpu()) if refs is not None else shown.cpu())
    fake_img, fake_ref = (fake[0], fake[1]) if isinstance(fake, tuple) else (fake, None)
    real_img = _images([p[0] for p in pairs], device)
    real_ref = _images([p[1] for p in pairs], device) if refs is not None else None
    d_real = disc(normalise(real_img), None if real_ref is None else normalise(real_ref))
    d_fake = disc(normalise(fake_img.to(device)), None if fake_ref is None else normalise(fake_ref.to(device)))
    loss, parts = discriminator_loss(d_real, d_fake)
    optimiser.zero_grad(set_to_none=True)
    loss.backward()
    optimiser.step()
    return {"d_loss": parts["total"], **{f"d_{k}": v for k, v in parts.items() if k != "total"}}


def _check_sizes(size: int, disc: Discriminator | None) -> None:
    from pysynth.gan.models import MIN_REFERENCE_SIZE

    if disc is not None and min(disc.output_shape((size, size))) < 1:
        need = 2 ** (disc.config.disc_layers + 1) + 1
        raise PysynthError(
            f"synthetic patches of {size} px are too small for the discriminator's {disc.config.disc_layers} "
            f"stages (needs >= {need} px): lower gan.disc_layers or raise synth.size"
        )
    if size < MIN_REFERENCE_SIZE:
        raise PysynthError(f"synthetic patches of {size} px are smaller than a reference may be ({MIN_REFERENCE_SIZE})")


def _hard_loss(
    segmenter: UNet,
    refined: torch.Tensor,
    targets: list[tuple[np.ndarray, ...]] | None,
    config: TrainConfig,
    device: torch.device,
) -> torch.Tensor | None:
    """``L_task`` for ``L_hard = −L_task``: the segmenter's loss on the central crop of the refined patches.

    The loss is the per-pixel mean times the crop's pixel count, i.e. a sum over each patch's pixels averaged over
    the batch: the released code's ``reduce_sum``, the scale the paper's gamma = 1e-7 was chosen for (as lambda1
    and lambda2 are for the summed ``L_reg``). The segmenter runs in eval mode (its BatchNorm statistics stay
    untouched) and with frozen parameters; the gradient reaches G through the pixels.
    """
    if targets is None:
        return None
    side = targets[0][0].shape[0]
    top = (refined.shape[-1] - side) // 2
    crop = refined[:, :, top : top + side, top : top + side].contiguous(memory_format=torch.channels_last)
    det, seg, weights = (torch.from_numpy(np.stack(t)).to(device) for t in zip(*targets, strict=True))
    segmenter.eval()
    try:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = segmenter(crop).float()
    finally:
        segmenter.train()
    loss, _ = two_head_loss(logits, det, seg, weights, dice_weight=config.dice_weight)
    return loss * float(side * side)


def _row(run: TrainingRun, lr: float, joint: JointConfig) -> dict:
    """One logged row: means over the window (NaN for a network not updated in it) and the weights' report."""
    window, step = run.window, run.step

    def mean(key: str) -> float:
        return _mean([r[key] for r in window if key in r])

    used = torch.cat([r["weights"] for r in window])
    row = {
        "step": step,
        "loss": mean("loss"),
        "bce_detection": mean("bce_detection"),
        "bce_segmentation": mean("bce_segmentation"),
        "lr": lr,
        "d_loss": mean("d_loss"),
        "d_p_real_on_real": mean("d_p_real_on_real"),
        "d_p_real_on_fake": mean("d_p_real_on_fake"),
        "d_accuracy": mean("d_accuracy"),
        "g_loss": mean("g_loss"),
        "g_real": mean("g_real"),
        "g_reg": mean("g_reg"),
        "g_hard": mean("g_hard"),
        "g_change": mean("g_change"),
        "w_mean": float(used.mean()),
        "w_min": float(used.min()),
        "w_max": float(used.max()),
        "p_real": mean("p_real"),
        "collapsed": 0,
        "wall_s": round(run.wall_s, 2),
    }
    judged = [r["d_weights"] for r in window if "d_weights" in r]
    if judged:
        report = weight_report(torch.cat(judged), joint.weight_clip)
        row["collapsed"] = int(report.collapsed)
        if report.collapsed and not run.counters["warned"]:
            share = report.frac_low if report.collapsed_at == "low" else report.frac_high
            log.warning(
                "importance weights collapsed at step %d: %.0f%% at the %s clip bound (D finds every patch %s); "
                "the weights carry no information (lower lr_d, raise d_every or widen weight_clip)",
                step,
                100 * share,
                report.collapsed_at,
                "fake" if report.collapsed_at == "low" else "real",
            )
            run.counters["warned"] = True
    return row


def _finish(
    config: TrainConfig,
    joint: JointConfig,
    out_dir: Path,
    run: TrainingRun,
    nets: _Nets,
    maker: ItemMaker,
    raw: _JointItems,
    device: torch.device,
    sources_note: Sequence[str],
) -> dict[str, Any]:
    """Thresholds on held-out patches, pictures, and the model folder."""
    from pysynth.train.pictures import histogram_plot, refined_grid, write_png

    segmenter, refiner, disc = nets.segmenter, nets.refiner, nets.discriminator

    segmenter.eval()
    use_ref = joint.gan.use_reference
    # Held-out synthetic patches (their own index range, never trained on), refined by the final G: the segmenter
    # learnt on refined patches, so its thresholds are chosen on them (their labels stay exact: L_reg keeps G
    # close to the identity). Without a refiner they are the initial patches.
    held = [raw.synthetic(VAL_OFFSET + k) for k in range(config.val_patches)]
    shown, d_real, weights = [], [], []
    with torch.no_grad():
        for k in range(0, len(held), 16):
            chunk = held[k : k + 16]
            initial = _images([it["image"] for it in chunk], device)
            refs = _images([it["reference"] for it in chunk], device) if use_ref else None
            images = initial
            if refiner is not None:
                refiner.eval()
                images = _to_uint8(refiner(normalise(initial), None if refs is None else normalise(refs)))
            shown.append(images.permute(0, 2, 3, 1).cpu().numpy())
            if disc is not None:
                d_map = torch.sigmoid(disc(normalise(images), None if refs is None else normalise(refs)))
                d_real.append(d_map.flatten(1).mean(dim=1).cpu().double().numpy())
                weights.append(importance_weights(d_map, joint.c, joint.weight_clip).cpu().numpy())
    patches = np.concatenate(shown)
    val_items = [maker.finish(it["index"], patches[k], it["labels"]) for k, it in enumerate(held)]
    best, table, _ = validate_thresholds(segmenter, val_items, config, out_dir)

    d_prob = np.concatenate(d_real) if d_real else None
    w = np.concatenate(weights) if weights else None
    n = min(joint.preview, len(held))
    if n and (refiner is not None or disc is not None):
        sheet = refined_grid(
            [it["image"] for it in held[:n]],
            list(patches[:n]) if refiner is not None else None,
            [it["reference"] for it in held[:n]],
            None if w is None else list(w[:n]),
            None if d_prob is None else list(d_prob[:n]),
        )
        write_png(out_dir / GRID, sheet)
    report = None
    if w is not None and d_prob is not None:
        report = weight_report(torch.from_numpy(w), joint.weight_clip)
        lo, hi = joint.weight_clip
        picture = histogram_plot(
            {"D > 0.5 (realistic)": w[d_prob > 0.5], "D <= 0.5": w[d_prob <= 0.5]},
            value_range=(lo, hi) if math.isfinite(hi) else None,
            title="importance weights of held-out patches",
            xlabel="weight w = c D / (1 - D)",
        )
        write_png(out_dir / HISTOGRAM, picture)
    if refiner is not None:
        _save_gan(out_dir / REFINER, refiner)
    if disc is not None:
        _save_gan(out_dir / DISCRIMINATOR, disc)
    summary = run.summary(
        sources_note,
        {"refiner_steps": run.counters["g_steps"], "discriminator_steps": run.counters["d_steps"]},
        joint=_json_safe(joint.to_dict()),
        held_out_weights=None if report is None else _json_safe(report.to_dict()),
        collapse_warned=run.counters["warned"],
        validation=table[0],
    )
    save_model(out_dir, segmenter, config.synth.model_mpp, best, summary)
    return summary

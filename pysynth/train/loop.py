"""Training the two-head U-Net on synthetic patches: data, optimisation, threshold selection.

Batch ``t`` holds items ``t·B .. t·B + B - 1`` of the synthetic stream (or of a stored dataset), and item ``i``'s
synthesis and augmentation depend on ``(seed, i)`` only; with the checkpoint holding the weights, optimiser and
step, a resumed run continues exactly where the interrupted one stopped. The run folder, checkpoints, logging and
Ctrl-C are :class:`pysynth.train.run.TrainingRun`'s, shared with joint training.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pysynth.errors import PysynthError
from pysynth.fsutil import atomic_write_text
from pysynth.instances import InstanceConfig, find_instances
from pysynth.models.io import normalise, save_model
from pysynth.models.unet import UNet
from pysynth.runs import sources_files
from pysynth.train.augment import augment
from pysynth.train.config import TrainConfig, dump_config
from pysynth.train.run import StepResult, TrainingRun
from pysynth.train.targets import (
    IGNORE_LABEL,
    border_weights,
    class_targets,
    core_targets,
    make_targets,
    two_head_loss,
)

log = logging.getLogger("pysynth")

CHECKPOINT_FORMAT = "pysynth-segmenter-checkpoint"
CHECKPOINT_VERSION = 1
LOSS_COLUMNS = ("step", "loss", "bce_detection", "bce_segmentation", "lr", "wall_s")
#: The losses columns of a network with a class output.
CLASS_LOSS_COLUMNS = ("step", "loss", "bce_detection", "bce_segmentation", "bce_lymphocyte", "lr", "wall_s")
WORK = "work"
#: Validation items come from their own stream, far from any training index.
VAL_OFFSET = 1 << 40


def centres_of(labels: np.ndarray) -> np.ndarray:
    """``(n, 2)`` centroids ``(x, y)`` of labels 1..max (NaN for absent labels)."""
    n = int(labels.max()) if labels.size else 0
    ys, xs = np.nonzero(labels)
    ids = labels[ys, xs]
    count = np.bincount(ids, minlength=n + 1)[1:].astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        cx = np.bincount(ids, xs + 0.5, minlength=n + 1)[1:] / count
        cy = np.bincount(ids, ys + 0.5, minlength=n + 1)[1:] / count
    return np.stack([cx, cy], axis=1)


@dataclass
class ItemMaker:
    """Training item ``i``: a synthetic patch, augmented, with targets and pixel weights (depends on (seed, i))."""

    source: Callable[[int], tuple[dict[str, np.ndarray], dict]]
    config: TrainConfig

    def __call__(self, index: int) -> dict[str, np.ndarray]:
        """Arrays ``image`` (s, s, 3) uint8, ``detection``/``segmentation``/``weights`` (s, s) float32, ``labels``."""
        arrays, _ = self.source(index)
        # A per-sample loss weight travels with the item when its source gives one (importance weights); else 1.
        return self.finish(
            index, arrays["image"], arrays["labels"], arrays.get("weight", 1.0), classes=arrays.get("classes")
        )

    def finish(
        self,
        index: int,
        image: np.ndarray,
        labels: np.ndarray,
        weight: float = 1.0,
        classes: np.ndarray | None = None,
    ) -> dict[str, np.ndarray]:
        """Item ``index`` made from a given patch: its augmentation (from ``(seed, index)``) and targets.

        Joint training calls this on the refined patch in place of the source's initial one. With a class output
        (``config.model.classes``) the item also has ``lymphocyte`` and ``class_weights`` from ``classes`` (one
        code per label, :mod:`pysynth.synth.lymphocytes`; None: no class known, e.g. a pseudo-labelled crop).
        """
        from pysynth.synth.store import item_rng

        c = self.config
        rng = item_rng(c.seed + 7_919, index)
        image, labels, valid = augment(image, labels, rng, c.augment, c.crop)
        det, seg, weights = item_targets(labels, valid, c)
        item = {
            "image": image,
            "detection": det,
            "segmentation": seg,
            "weights": weights,
            "labels": labels,
            "sample_weight": np.float32(weight),
        }
        if c.model.classes:
            lymphocyte, known = class_targets(np.where(labels == IGNORE_LABEL, 0, labels), classes)
            item["lymphocyte"], item["class_weights"] = lymphocyte, known * weights
            item["classes"] = np.zeros(0, np.uint8) if classes is None else np.asarray(classes, np.uint8)
        return item


def item_targets(
    labels: np.ndarray, valid: np.ndarray | float, config: TrainConfig
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(detection, segmentation, pixel weights)`` of a patch's labels, float32 ``(s, s)`` each.

    ``valid`` (1 where the pixels are real, 0 where padded) multiplies the border weights; pixels labelled
    :data:`IGNORE_LABEL` (unsure parts of pseudo-labels) are background with zero weight.
    """
    ignore = labels == IGNORE_LABEL
    if ignore.any():
        labels = np.where(ignore, 0, labels)
        valid = valid * (~ignore).astype(np.float32)
    if config.detection_target == "core":
        det, seg = core_targets(labels, config.core_fraction)
    else:
        det, seg = make_targets(labels, centres_of(labels))
    return det, seg, border_weights(labels.shape, config.border, config.border_weight) * valid


def make_source(
    config: TrainConfig,
    out_dir: Path,
    real: Sequence[Path] = (),
    synthetic: Path | None = None,
    input_mpp: float | None = None,
) -> Callable[[int], tuple[dict[str, np.ndarray], dict]]:
    """``source(i) -> (arrays, meta)``: streaming synthesis from real tiles, or a stored dataset (cycled, shuffled).

    Raises:
        PysynthError: If the sources give no usable tissue, or the dataset cannot be read.
    """
    if synthetic is not None:
        from pysynth.synth.generate import SyntheticPatches

        try:
            dataset = SyntheticPatches(synthetic)
            n = len(dataset)
        except (OSError, ValueError, KeyError) as exc:
            raise PysynthError(f"{synthetic}: not a readable synthetic dataset ({exc})") from None
        if n == 0:
            raise PysynthError(f"{synthetic}: the dataset is empty")

        def from_dataset(i: int) -> tuple[dict[str, np.ndarray], dict]:
            epoch, k = divmod(i, n)
            order = np.random.default_rng([config.seed, epoch]).permutation(n)
            item = dataset[int(order[k])]
            if config.model.classes and "classes" not in item:
                raise PysynthError(
                    f"{synthetic}: the dataset has no nucleus classes (made by an earlier pysynth); a network with "
                    "a class output needs them: make it again with `pysynth synthesize`"
                )
            # xy (patch and reference positions in the source tile) lets joint training crop the reference.
            arrays = {"image": item["image"], "labels": item["labels"], "xy": item["xy"]}
            if "classes" in item:
                arrays["classes"] = item["classes"]
            return arrays, item["meta"]

        return from_dataset
    from pysynth.synth.generate import streaming_dataset

    stream = streaming_dataset(real, out_dir / WORK, config.synth, seed=config.seed, input_mpp=input_mpp)
    maker = stream.make_item
    return lambda i: maker(i, seed=config.seed)


def lr_at(step: int, config: TrainConfig) -> float:
    """The segmenter's learning rate at ``step``: linear warm-up, then cosine decay to 2% of ``config.lr``."""
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    t = (step - config.warmup) / max(1, config.steps - config.warmup)
    return config.lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def batch_tensors(items: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    """Items stacked into a batch: the normalised images (channels-last) and every target they carry."""
    images = torch.from_numpy(np.stack([it["image"] for it in items])).permute(0, 3, 1, 2)
    out = {"image": normalise(images).contiguous(memory_format=torch.channels_last)}
    for key in ("detection", "segmentation", "weights", "sample_weight", "lymphocyte", "class_weights"):
        if key in items[0]:
            out[key] = torch.from_numpy(np.stack([it[key] for it in items]))
    return out


@torch.no_grad()
def predict_batch(model: UNet, images: np.ndarray) -> np.ndarray:
    """Probabilities ``(N, 2, H, W)`` float32 for uint8 images ``(N, H, W, 3)`` (H, W multiples of 2**depth)."""
    device = next(model.parameters()).device
    x = normalise(torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2))
    return torch.sigmoid(model(x.contiguous(memory_format=torch.channels_last))).float().cpu().numpy()


#: Minimum confidences :func:`choose_thresholds` tries.
MIN_CONFIDENCE_GRID = (0.0, 0.5, 0.6, 0.7, 0.8)

#: Minimum nucleus areas (µm²) that the wider search (``validate_thresholds(min_areas=True)``) tries besides the
#: base minimum size and twice it: discs of about 2.3, 3.2, 3.9 and 4.5 µm diameter, below the size of a
#: lymphocyte's nucleus (about 6 µm).
MIN_AREA_GRID_UM2 = (4.0, 8.0, 12.0, 16.0)


def min_size_grid(base_px: int, mpp: float, areas_um2: Sequence[float] = MIN_AREA_GRID_UM2) -> tuple[int, ...]:
    """The minimum sizes (px at ``mpp`` µm/px) the wider search tries: ``base_px``, twice it, and ``areas_um2``.

    Sorted and without repeats; sizes below the base are left out.
    """
    sizes = {base_px, 2 * base_px, *(round(a / (mpp * mpp)) for a in areas_um2)}
    return tuple(sorted(s for s in sizes if s >= base_px))


def choose_thresholds(
    maps: np.ndarray,
    labels: Sequence[np.ndarray],
    base: InstanceConfig,
    min_confidences: Sequence[float] = MIN_CONFIDENCE_GRID,
    min_sizes: Sequence[int] | None = None,
) -> tuple[InstanceConfig, list[dict[str, float]]]:
    """Grid-search post-processing on labelled (synthetic) patches: the most selective setting as good as the best.

    Searched together: the seed and foreground thresholds, the smoothing of the detection map (1 or 2 px: more
    merges the several blobs a large or vesicular nucleus may give), the minimum size (``min_sizes``; default
    ``base.min_size`` or twice it) and the minimum confidence (``min_confidences``: instances whose mean
    segmentation probability is below it are dropped). The instances of each setting are made once and filtered
    for every minimum confidence.

    The choice is the one-standard-error rule (Hastie, Tibshirani and Friedman, *Elements of Statistical Learning*,
    §7.10): the setting with the best mean AJI (ties: PQ) is the reference; every setting whose per-patch AJI falls
    short of it by no more than one standard error of the paired differences is as good on these patches; of those,
    the most selective is chosen: the highest minimum confidence, then the largest minimum size (then the best mean
    AJI, then PQ). Why the most selective: synthetic patches hold no unlabelled nucleus-like structures, so they
    cannot show what either filter gains on real tissue, where the dominant error is false nuclei of low mean
    probability and of about half a true nucleus' area (purple cytoplasm, smudges, debris); they do show what it
    costs (real-looking pale or small nuclei dropped), and that cost is what the rule bounds.

    Args:
        maps: ``(N, 2, H, W)`` probabilities of the patches.
        labels: Their true instance labels.
        base: Other post-processing settings.
        min_confidences: The minimum confidences tried.
        min_sizes: The minimum sizes tried (px); default ``(base.min_size, 2 * base.min_size)``.

    Returns:
        ``(chosen, table)``: the chosen configuration and every tried one's settings, mean scores, ``aji_short``
        (its mean per-patch AJI below the reference's), ``aji_se`` (the standard error of that difference) and
        ``as_good`` (within one standard error), the chosen one first, then by mean AJI (ties: PQ).
    """
    from pysynth.metrics import mean_scores, score

    table: list[dict[str, Any]] = []
    per_patch: list[np.ndarray] = []
    for sigma in (1.0, 2.0):
        for min_size in (base.min_size, 2 * base.min_size) if min_sizes is None else min_sizes:
            for det_t in (0.3, 0.4, 0.5, 0.6, 0.7):
                for fg_t in (0.3, 0.4, 0.5, 0.6):
                    cfg = replace(
                        base,
                        detection_threshold=det_t,
                        foreground_threshold=fg_t,
                        detection_sigma=sigma,
                        min_size=min_size,
                        min_confidence=0.0,
                    )
                    found = [find_instances(m[0], m[1], cfg) for m in maps]
                    for min_confidence in min_confidences:
                        scores = [
                            score(lab, f.above(min_confidence).labels) for f, lab in zip(found, labels, strict=True)
                        ]
                        s = mean_scores(scores)
                        table.append({**asdict(replace(cfg, min_confidence=float(min_confidence))), **s.to_dict()})
                        per_patch.append(np.array([x.aji for x in scores], np.float64))
    order = sorted(range(len(table)), key=lambda i: (table[i]["aji"], table[i]["pq"]), reverse=True)
    reference = per_patch[order[0]]
    n = reference.size
    for row, aji in zip(table, per_patch, strict=True):
        short = reference - aji
        se = float(short.std(ddof=1) / np.sqrt(n)) if n > 1 else 0.0
        row.update(aji_short=float(short.mean()), aji_se=se, as_good=bool(short.mean() <= se))
    chosen = max(
        (i for i in order if table[i]["as_good"]),
        key=lambda i: (table[i]["min_confidence"], table[i]["min_size"], table[i]["aji"], table[i]["pq"]),
    )
    table = [table[chosen]] + [table[i] for i in order if i != chosen]
    best = InstanceConfig(**{k: table[0][k] for k in asdict(base)})
    return best, table


#: The lymphocyte threshold of a model with a class output: the decision boundary of an output trained by
#: cross-entropy (calibrated to the synthetic share of lymphocytes); chosen without labels, real or synthetic.
LYMPHOCYTE_THRESHOLD = 0.5


def class_validation(maps: np.ndarray, items: Sequence[dict[str, np.ndarray]]) -> dict[str, Any]:
    """The class output on held-out synthetic patches: per-nucleus lymphocyte AUROC, and F1 at the threshold.

    Each synthetic nucleus of a known class scores the mean lymphocyte probability over its true pixels. These are
    synthetic nuclei: the numbers say the network learnt the synthetic classes, not how it does on real tissue.
    """
    from pysynth.instances import instance_means
    from pysynth.metrics import auroc
    from pysynth.synth.lymphocytes import LYMPHOCYTE, UNKNOWN, label_classes

    scores, truth = [], []
    for m, it in zip(maps, items, strict=True):
        labels, classes = it["labels"], it.get("classes")
        n = int(labels.max())
        if classes is None or n == 0:
            continue
        codes = label_classes(classes, n)
        keep = (np.bincount(labels.ravel(), minlength=n + 1) > 0) & (codes != UNKNOWN)
        scores.append(instance_means(labels, m[2])[keep])
        truth.append(codes[keep] == LYMPHOCYTE)
    s = np.concatenate(scores) if scores else np.zeros(0)
    y = np.concatenate(truth) if truth else np.zeros(0, bool)
    called = s >= LYMPHOCYTE_THRESHOLD
    tp = int((called & y).sum())
    f1 = 2 * tp / max(1, int(called.sum()) + int(y.sum()))
    return {
        "names": ["Lymphocyte"],
        "lymphocyte_threshold": LYMPHOCYTE_THRESHOLD,
        "synthetic_validation": {
            "nuclei": len(s),
            "lymphocytes": int(y.sum()),
            "auroc": round(auroc(s, y), 4) if len(s) else None,
            "f1": round(f1, 4),
        },
    }


def init_segmenter(model: UNet, config: TrainConfig) -> None:
    """Load the weights of ``config.init`` (a model folder) into ``model``; nothing when it is empty.

    A model without a class output may start a network with one (the shipped segmenter gaining the class output):
    every weight is copied, the output layer's detection and segmentation channels too, and only the new class
    channel keeps its random initialisation; a model with a class output may start one without (its class channel
    is dropped).

    Raises:
        PysynthError: If the folder is not a model, or its network has another shape than ``config.model``.
    """
    if not config.init:
        return
    from pysynth.models.io import load_model, resolve_model_dir

    start, info = load_model(resolve_model_dir(config.init))
    same_body = replace(info.unet, classes=config.model.classes) == config.model
    if not same_body:
        raise PysynthError(
            f"{config.init}: its network ({info.unet}) is not the one configured for training ({config.model}); "
            "set model: in the config to match it"
        )
    state = start.state_dict()
    if info.unet.classes != config.model.classes:  # the output layer gains or drops the class channel
        own = model.state_dict()
        for key in ("head.weight", "head.bias"):
            resized = own[key].clone()
            keep = min(len(resized), len(state[key]))
            resized[:keep] = state[key][:keep]
            state[key] = resized
    model.load_state_dict(state)


def new_segmenter(config: TrainConfig, device: torch.device) -> tuple[UNet, torch.optim.Optimizer]:
    """The segmenter to train (from ``config.init`` when set) on ``device``, channels-last, and its optimiser.

    Built right after the torch seed is set (:meth:`TrainingRun.claim`), so that plain and joint training with
    the same seed start from the same weights.
    """
    model = UNet(config.model).to(device, memory_format=torch.channels_last)
    init_segmenter(model, config)
    return model, torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)


def set_lr(optimiser: torch.optim.Optimizer, step: int, config: TrainConfig) -> float:
    """Give the segmenter's optimiser the learning rate of ``step`` (warm-up, then cosine); returns it."""
    lr = lr_at(step, config)
    for group in optimiser.param_groups:
        group["lr"] = lr
    return lr


def segmenter_update(optimiser: torch.optim.Optimizer, model: UNet, loss: torch.Tensor) -> None:
    """One optimiser step of the segmenter on ``loss``, its gradient norm clipped at 1."""
    optimiser.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimiser.step()


def validate_thresholds(
    model: UNet,
    val_items: Sequence[dict[str, np.ndarray]],
    config: TrainConfig,
    out_dir: Path,
    min_areas: bool = False,
) -> tuple[InstanceConfig, list[dict[str, float]], np.ndarray]:
    """Post-processing chosen on held-out items (``validation.json``): ``(best, grid table, probability maps)``.

    ``min_areas``: the minimum size is also searched over :data:`MIN_AREA_GRID_UM2` (:func:`min_size_grid`): three
    times the settings, and the grid's time with them (on 96 patches of 240² px the base grid alone takes about
    4 minutes on a 2-core CPU, a one-off timing), so training leaves it off; ``bench.thresholds
    --min-area-grid`` runs it.
    """
    maps = np.concatenate(
        [
            predict_batch(model, np.stack([it["image"] for it in val_items[k : k + 16]]))
            for k in range(0, len(val_items), 16)
        ]
    )
    base = InstanceConfig(min_size=max(1, round(20 * (0.25 / config.synth.model_mpp) ** 2)))
    sizes = min_size_grid(base.min_size, config.synth.model_mpp) if min_areas else None
    best, table = choose_thresholds(maps, [it["labels"] for it in val_items], base, min_sizes=sizes)
    atomic_write_text(out_dir / "validation.json", json.dumps({"chosen": asdict(best), "grid": table}, indent=1) + "\n")
    return best, table, maps


def _row(run: TrainingRun, lr: float) -> dict[str, float]:
    """One ``losses.csv`` row: the means over the window's ``[loss, parts]`` records."""
    window = run.window
    names = ("bce_detection", "bce_segmentation", *(("bce_lymphocyte",) if run.config.model.classes else ()))
    row: dict[str, float] = {"step": run.step, "loss": float(np.mean([w[0] for w in window]))}
    row.update({name: float(np.mean([w[1][name] for w in window])) for name in names})
    row.update(lr=lr, wall_s=round(run.wall_s, 2))
    return row


def train(
    config: TrainConfig,
    out_dir: str | Path,
    *,
    real: Sequence[Path] = (),
    synthetic: Path | None = None,
    input_mpp: float | None = None,
    overwrite: bool = False,
    progress: Callable[[int, dict[str, float]], None] | None = None,
    sources_note: Sequence[str] = (),
    device: torch.device | str = "cpu",
    wrap_source: Callable[[Callable], Callable] | None = None,
) -> dict[str, Any]:
    """Train (or resume training) a segmenter into ``out_dir``; returns the summary written to ``model.json``.

    ``wrap_source`` (adaptation) turns the synthetic source ``i -> (arrays, meta)`` into the one trained on, e.g.
    mixing in pseudo-labelled real crops; items whose labels hold :data:`~pysynth.train.targets.IGNORE_LABEL` have
    zero loss weight there.

    Writes ``config.yaml`` (the resolved configuration), ``checkpoint.pt`` every ``checkpoint_every`` steps,
    ``snapshots/step_*.pt`` every ``snapshot_every`` steps, ``losses.csv`` and ``loss_curve.png``, and at the end
    ``model.pt`` + ``model.json`` with thresholds chosen on held-out synthetic patches (``validation.json``).

    On a CUDA ``device`` the forward and backward passes run in bf16 autocast (weights and optimiser stay fp32).

    Raises:
        PysynthError: If ``out_dir`` holds a run with another configuration (unless ``overwrite``), or the data
            cannot be used.
    """
    out_dir = Path(out_dir)
    run = TrainingRun(
        out_dir,
        config,
        checkpoint_format=CHECKPOINT_FORMAT,
        checkpoint_version=CHECKPOINT_VERSION,
        columns=CLASS_LOSS_COLUMNS if config.model.classes else LOSS_COLUMNS,
        make_row=_row,
        progress=progress,
    )
    run.claim({"config.yaml": dump_config(config), **sources_files(real, synthetic)}, overwrite)
    device = torch.device(device)
    if config.model.classes and synthetic is None and config.synth.lymphocyte_fraction <= 0:
        raise PysynthError(
            "model.classes is 1 but synth.lymphocyte_fraction is 0: the class output would never see a lymphocyte"
        )
    model, optimiser = new_segmenter(config, device)

    def restore(state: dict[str, Any]) -> None:
        model.load_state_dict(state["model"])
        optimiser.load_state_dict(state["optimiser"])

    run.resume(lambda: {"model": model.state_dict(), "optimiser": optimiser.state_dict()}, restore)
    source = make_source(config, out_dir, real, synthetic, input_mpp)
    if wrap_source is not None:
        source = wrap_source(source)
    maker = ItemMaker(source, config)

    def batch_items(t: int) -> list[dict[str, np.ndarray]]:
        return [maker(t * config.batch + k) for k in range(config.batch)]

    def step(t: int, items: list[dict[str, np.ndarray]]) -> StepResult:
        batch = {k: v.to(device, non_blocking=True) for k, v in batch_tensors(items).items()}
        lr = set_lr(optimiser, t, config)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(batch["image"]).float()
        loss, parts = two_head_loss(
            logits,
            batch["detection"],
            batch["segmentation"],
            batch["weights"],
            batch["sample_weight"],
            dice_weight=config.dice_weight,
            lymphocyte=batch.get("lymphocyte"),
            class_weights=batch.get("class_weights"),
            class_weight=config.class_weight,
        )
        segmenter_update(optimiser, model, loss)
        value = float(loss.detach())
        return StepResult([value, parts], lr, {"loss": value})

    model.train()
    run.run_steps(batch_items, step, snapshot=model)
    model.eval()
    log.info("choosing post-processing thresholds on %d held-out synthetic patches", config.val_patches)
    # Held-out synthetic patches: their own index range, never trained on.
    val_items = [maker(VAL_OFFSET + k) for k in range(config.val_patches)]
    best, table, maps = validate_thresholds(model, val_items, config, out_dir)
    summary = run.summary(sources_note, validation=table[0])
    if config.model.classes:
        summary["classes"] = class_validation(maps, val_items)
    if config.init:  # the starting model by its weights: its name or folder may hold another model later
        from pysynth.models.io import model_digest, resolve_model_dir

        summary["init_digest"] = model_digest(resolve_model_dir(config.init))
    if config.synth.guide:  # the guide by its weights: its name may point to another model later
        from pysynth.synth.generate import guide_digest

        summary["guide_digest"] = guide_digest(config.synth)
    save_model(out_dir, model, config.synth.model_mpp, best, summary)
    return summary

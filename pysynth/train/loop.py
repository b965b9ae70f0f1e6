"""Training the two-head U-Net on synthetic patches: data, optimisation, checkpoints, threshold selection.

Batch ``t`` holds items ``t·B .. t·B + B - 1`` of the synthetic stream (or of a stored dataset), and item ``i``'s
synthesis and augmentation depend on ``(seed, i)`` only; with the checkpoint holding the weights, optimiser and
step, a resumed run continues exactly where the interrupted one stopped.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pysynth.errors import PysynthError
from pysynth.fsutil import atomic_write_bytes, atomic_write_text
from pysynth.instances import InstanceConfig, find_instances
from pysynth.models.io import normalise, save_model
from pysynth.models.unet import UNet
from pysynth.train.augment import augment
from pysynth.train.config import TrainConfig, dump_config
from pysynth.train.targets import (
    IGNORE_LABEL,
    border_weights,
    class_targets,
    core_targets,
    make_targets,
    two_head_loss,
)

log = logging.getLogger("pysynth")

CHECKPOINT = "checkpoint.pt"
#: The content identity of what a run trains on (see :func:`sources_record`).
SOURCES_FILE = "sources.yaml"
CHECKPOINT_FORMAT = "pysynth-segmenter-checkpoint"
CHECKPOINT_VERSION = 1
LOSS_COLUMNS = ("step", "loss", "bce_detection", "bce_segmentation", "lr", "wall_s")
#: The losses columns of a network with a class output.
CLASS_LOSS_COLUMNS = ("step", "loss", "bce_detection", "bce_segmentation", "bce_lymphocyte", "lr", "wall_s")
SNAPSHOTS = "snapshots"
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


def claim_run(
    out_dir: Path,
    files: dict[str, str],
    overwrite: bool,
    stale: Sequence[str] = (),
    progress_files: Sequence[str] = (CHECKPOINT, "model.pt"),
) -> None:
    """Refuse a folder that holds a run with other settings (unless ``overwrite``); write the resolved configs.

    A folder holds a run once it has made progress (a checkpoint or a model, ``progress_files``): until then a
    failed start (sources without tissue, a typo in the config) leaves nothing to protect, and the corrected
    command starts afresh with its own settings.

    Args:
        out_dir: The run folder.
        files: ``{file name: resolved YAML}`` that define the run (configuration, sources).
        overwrite: Start afresh: delete ``stale`` files (the checkpoint and losses always) instead of refusing.
        stale: Further outputs of an earlier run to delete on ``overwrite``.
        progress_files: Files whose presence means the run has made progress.

    Raises:
        PysynthError: If a file differs, the run has made progress and ``overwrite`` is off; the message lists
            the changed keys.
    """
    import yaml

    from pysynth.ledger import flatten

    started = any((out_dir / name).exists() for name in progress_files)
    if not overwrite and started:
        for name, resolved in files.items():
            path = out_dir / name
            if not path.exists() and name != "config.yaml" and (out_dir / "config.yaml").exists():
                log.warning("%s: the run has no record of its %s (an earlier pysynth); recording these", out_dir, name)
            if path.exists() and path.read_text() != resolved:
                old, new = flatten(yaml.safe_load(path.read_text()) or {}), flatten(yaml.safe_load(resolved))
                changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
                if not changed:  # only comments differ (a source's path)
                    continue
                raise PysynthError(
                    f"{out_dir}: holds a training run with other {'sources' if name == SOURCES_FILE else 'settings'} "
                    f"({', '.join(changed)}); "
                    "use another --out or --overwrite"
                )
    elif overwrite:
        for name in (CHECKPOINT, "losses.csv", *stale):
            (out_dir / name).unlink(missing_ok=True)
    for name, resolved in files.items():
        atomic_write_text(out_dir / name, resolved)


def _sources_file(real: Sequence[Path], synthetic: Path | None) -> dict[str, str]:
    return {SOURCES_FILE: sources_record(real, synthetic)} if real or synthetic is not None else {}


def sources_record(real: Sequence[Path] = (), synthetic: Path | None = None) -> str:
    """What a run trains on, as YAML for :func:`claim_run`: the content identity of every source file.

    A ``pysynth sample`` folder counts by its ``manifest.csv``, a synthetic dataset by its ``index.json``, other
    sources by each slide or image they name. Paths are kept for the reader; a resume compares contents (size and
    hash, in order), so moved sources still resume and changed ones are refused.
    """
    import yaml

    from pysynth.ledger import file_identity
    from pysynth.sources import collect_sources
    from pysynth.synth.store import INDEX_NAME

    items = []
    files: list[Path] = []
    for r in real:
        manifest = Path(r) / "manifest.csv"
        files.extend([manifest] if manifest.is_file() else collect_sources([r]))
    if synthetic is not None and (Path(synthetic) / INDEX_NAME).is_file():  # else the dataset check says why
        files.append(Path(synthetic) / INDEX_NAME)
    for f in files:
        ident = file_identity(f)
        items.append({"content": f"{ident['size']}:{ident['hash']}", "path": ident["path"]})
    # The paths are comments: for the reader, not compared (a moved source folder still resumes).
    comments = "".join(f"# {k}: {i['path']}\n" for k, i in enumerate(items))
    return comments + yaml.safe_dump({"contents": [i["content"] for i in items]}, sort_keys=False)


def load_checkpoint(path: Path, fmt: str, version: int) -> dict[str, Any]:
    """A checkpoint's state (tensors and plain data only: nothing in it is executed).

    Raises:
        PysynthError: If the file is unreadable, of another kind of run, or of another version.
    """
    import pickle

    advice = "delete it or train with --overwrite"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise PysynthError(f"{path}: corrupt or unreadable checkpoint ({first}); {advice}") from None
    if not isinstance(state, dict) or state.get("format") != fmt:
        kind = state.get("format", "an unknown kind") if isinstance(state, dict) else "an unknown kind"
        raise PysynthError(f"{path}: checkpoint of {kind}, not {fmt}; {advice}")
    if state.get("version") != version:
        raise PysynthError(f"{path}: checkpoint version {state.get('version')}, this pysynth reads {version}")
    return state


def write_losses(out_dir: Path, rows: list[dict[str, float]], columns: Sequence[str]) -> None:
    """``losses.csv`` (replaced whole) and ``loss_curve.png`` from the logged rows."""
    part = out_dir / "losses.csv.part"
    with part.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, list(columns))
        writer.writeheader()
        writer.writerows(rows)
    part.replace(out_dir / "losses.csv")
    if rows:
        _plot_losses(rows, out_dir / "loss_curve.png")


def _lr_at(step: int, config: TrainConfig) -> float:
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    t = (step - config.warmup) / max(1, config.steps - config.warmup)
    return config.lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def _batch_tensors(items: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
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


#: Minimum confidences :func:`choose_thresholds` tries (0 first: on a tie, nothing is dropped).
MIN_CONFIDENCE_GRID = (0.0, 0.5, 0.6, 0.7, 0.8)


def choose_thresholds(
    maps: np.ndarray,
    labels: Sequence[np.ndarray],
    base: InstanceConfig,
    min_confidences: Sequence[float] = MIN_CONFIDENCE_GRID,
) -> tuple[InstanceConfig, list[dict[str, float]]]:
    """Grid-search post-processing for the best mean AJI (ties: PQ) on labelled patches.

    Searched together: the seed and foreground thresholds, the smoothing of the detection map (1 or 2 px: more
    merges the several blobs a large or vesicular nucleus may give), the minimum size (``base.min_size`` or twice
    it) and the minimum confidence (``min_confidences``: instances whose mean segmentation probability is below it
    are dropped). The instances of each setting are made once and filtered for every minimum confidence.

    Args:
        maps: ``(N, 2, H, W)`` probabilities of the patches.
        labels: Their true instance labels.
        base: Other post-processing settings.
        min_confidences: The minimum confidences tried.

    Returns:
        ``(best, table)``: the best configuration and every tried one's settings and mean scores, best first.
    """
    from pysynth.metrics import mean_scores, score

    table = []
    for sigma in (1.0, 2.0):
        for min_size in (base.min_size, 2 * base.min_size):
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
                        s = mean_scores(
                            [score(lab, f.above(min_confidence).labels) for f, lab in zip(found, labels, strict=True)]
                        )
                        table.append({**asdict(replace(cfg, min_confidence=float(min_confidence))), **s.to_dict()})
    table.sort(key=lambda row: (row["aji"], row["pq"]), reverse=True)
    best = InstanceConfig(**{k: table[0][k] for k in asdict(base)})
    return best, table


class StopAtStepEnd:
    """Ctrl-C handling for long loops (training steps, `infer`'s regions): ``requested`` after a first SIGINT.

    A first Ctrl-C only asks the loop to stop after the current step; a second one interrupts at once. The loop
    then saves a whole step (a checkpoint, a region), so nothing done is lost on resume.
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> StopAtStepEnd:
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        import signal

        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def _atomic_torch_save(obj: Any, path: Path) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


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


def _plot_losses(rows: list[dict[str, float]], path: Path) -> None:
    from pysynth.viz import line_plot

    steps = np.array([r["step"] for r in rows], np.float64)
    series = {
        key: np.array([r[key] for r in rows], np.float64) for key in ("loss", "bce_detection", "bce_segmentation")
    }
    image = line_plot(steps, series, title="training loss", xlabel="step", log_y=True)
    import cv2

    atomic_write_bytes(path, cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))[1].tobytes())


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
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint_path = out_dir / CHECKPOINT
    claim_run(out_dir, {"config.yaml": dump_config(config), **_sources_file(real, synthetic)}, overwrite)

    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    device = torch.device(device)
    if config.model.classes and synthetic is None and config.synth.lymphocyte_fraction <= 0:
        raise PysynthError(
            "model.classes is 1 but synth.lymphocyte_fraction is 0: the class output would never see a lymphocyte"
        )
    model = UNet(config.model).to(device, memory_format=torch.channels_last)
    init_segmenter(model, config)
    optimiser = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    step, wall, rows = 0, 0.0, []
    window: list[tuple[float, dict[str, float]]] = []
    if checkpoint_path.exists():
        state = load_checkpoint(checkpoint_path, CHECKPOINT_FORMAT, CHECKPOINT_VERSION)
        try:
            model.load_state_dict(state["model"])
            optimiser.load_state_dict(state["optimiser"])
        except (KeyError, RuntimeError, ValueError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise PysynthError(f"{checkpoint_path}: does not fit this model ({first}); use --overwrite") from None
        step, wall, rows = int(state["step"]), float(state["wall_s"]), list(state["rows"])
        # The steps since the last losses row: without them a resumed run's next row averages fewer steps.
        window = [(float(loss), dict(parts)) for loss, parts in state.get("window", [])]
        log.info("resuming at step %d of %d", step, config.steps)
        if progress is not None:
            progress(step, {})
    source = make_source(config, out_dir, real, synthetic, input_mpp)
    if wrap_source is not None:
        source = wrap_source(source)
    maker = ItemMaker(source, config)

    def batch_items(t: int) -> list[dict[str, np.ndarray]]:
        return [maker(t * config.batch + k) for k in range(config.batch)]

    def save_checkpoint() -> None:
        state = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "step": step, "wall_s": wall}
        state.update({"model": model.state_dict(), "optimiser": optimiser.state_dict(), "rows": rows})
        state["window"] = [[loss, parts] for loss, parts in window]
        _atomic_torch_save(state, checkpoint_path)
        write_losses(out_dir, rows, CLASS_LOSS_COLUMNS if config.model.classes else LOSS_COLUMNS)

    model.train()
    with StopAtStepEnd() as stop, ThreadPoolExecutor(1) as pool:  # the next batch is made while this one trains
        pending = pool.submit(batch_items, step) if step < config.steps else None
        while step < config.steps:
            started = time.perf_counter()
            assert pending is not None
            items = pending.result()
            pending = pool.submit(batch_items, step + 1) if step + 1 < config.steps else None
            batch = {k: v.to(device, non_blocking=True) for k, v in _batch_tensors(items).items()}
            lr = _lr_at(step, config)
            for group in optimiser.param_groups:
                group["lr"] = lr
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
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimiser.step()
            step += 1
            wall += time.perf_counter() - started
            window.append((float(loss.detach()), parts))
            if step % 10 == 0 or step == config.steps:
                row = {
                    "step": step,
                    "loss": float(np.mean([w[0] for w in window])),
                    "bce_detection": float(np.mean([w[1]["bce_detection"] for w in window])),
                    "bce_segmentation": float(np.mean([w[1]["bce_segmentation"] for w in window])),
                    **(
                        {"bce_lymphocyte": float(np.mean([w[1]["bce_lymphocyte"] for w in window]))}
                        if config.model.classes
                        else {}
                    ),
                    "lr": lr,
                    "wall_s": round(wall, 2),
                }
                rows.append(row)
                window = []
            if progress is not None:
                progress(step, {"loss": float(loss.detach())})
            if step % config.checkpoint_every == 0 or step == config.steps:
                save_checkpoint()
            if config.snapshot_every and step % config.snapshot_every == 0:
                (out_dir / SNAPSHOTS).mkdir(exist_ok=True)
                _atomic_torch_save(model.state_dict(), out_dir / SNAPSHOTS / f"step_{step:06d}.pt")
            if stop.requested:
                save_checkpoint()
                log.info("interrupted: checkpoint saved at step %d", step)
                raise KeyboardInterrupt
    model.eval()
    log.info("choosing post-processing thresholds on %d held-out synthetic patches", config.val_patches)
    # Held-out synthetic patches: their own index range, never trained on.
    val_items = [maker(VAL_OFFSET + k) for k in range(config.val_patches)]
    maps = np.concatenate(
        [
            predict_batch(model, np.stack([it["image"] for it in val_items[k : k + 16]]))
            for k in range(0, len(val_items), 16)
        ]
    )
    base = InstanceConfig(min_size=max(1, round(20 * (0.25 / config.synth.model_mpp) ** 2)))
    best, table = choose_thresholds(maps, [it["labels"] for it in val_items], base)
    atomic_write_text(out_dir / "validation.json", json.dumps({"chosen": asdict(best), "grid": table}, indent=1) + "\n")
    summary = {
        "steps": step,
        "train_wall_s": round(wall, 1),
        "sources": list(sources_note),
        "train": json.loads(json.dumps(config.to_dict())),
        "validation": table[0],
    }
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

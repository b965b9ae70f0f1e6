"""Adaptation to a user's own unlabelled slides: rounds of self-training from a trained segmenter.

Each round, the teacher (the given model, then the previous round's student) labels real tiles of the user's
slides with test-time augmentation. Its pseudo-labels keep only what it is sure of: nuclei whose mean segmentation
probability is at least ``sure`` are nuclei, pixels it gives a low probability (and objects it itself doubts, below
``negative_below``) are background, and everything in between (unsure objects with a ring around them, and
middling pixels) is ignored by the loss. The student starts from the teacher and trains on a mix of synthetic
patches (exact labels; synthesis guided by the teacher, so the backgrounds keep the tissue's own non-nuclear
structure) and pseudo-labelled real crops under the same strong augmentation. Every round is a resumable training
run of its own; a round whose dev-free sanity checks collapse (far fewer sure nuclei, or far less of the tissue
labelled with confidence, than in round 1) stops the adaptation with one clear message, keeping the last good model.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from pysynth.dye import dye_labels
from pysynth.errors import PysynthError
from pysynth.fsutil import atomic_write_bytes, atomic_write_text
from pysynth.instances import InstanceConfig, find_instances
from pysynth.train.config import TrainConfig
from pysynth.train.targets import IGNORE_LABEL

log = logging.getLogger("pysynth")

PSEUDO = "pseudo"
ROUNDS = "rounds"
FORMAT = "pysynth-adapt"


@dataclass(frozen=True)
class AdaptConfig:
    """Self-training rounds (sizes in px at the model's resolution).

    Attributes:
        rounds: Teacher → student rounds.
        steps: Optimiser steps per round.
        lr: Peak learning rate of each round (the student starts from a trained teacher: lower than from scratch).
        warmup: Warm-up steps of each round.
        real_fraction: Share of each batch that is pseudo-labelled real crops (the rest synthetic).
        tta: Flips/rotations averaged in the teacher's predictions (1, 2, 4 or 8).
        sure: A teacher nucleus whose mean segmentation probability is at least this is a labelled nucleus.
        negative_below: A teacher object below this mean probability is labelled background (the teacher itself
            doubts it; 0: such objects are ignored like the other unsure ones).
        background_below: Pixels outside the teacher's objects with probability below this are background; the
            rest are ignored.
        ring: Width (px) of the ignored band around every unsure object.
        guided: Guide the synthetic half's synthesis by the round's teacher (``SynthConfig.guide``).
        min_ratio: Sanity check: a round whose sure nuclei per tissue Mpx, or confidently labelled share of the
            tissue, falls below this fraction of round 1's stops the adaptation.
    """

    rounds: int = 2
    steps: int = 600
    lr: float = 1e-3
    warmup: int = 50
    real_fraction: float = 0.5
    tta: int = 8
    sure: float = 0.8
    negative_below: float = 0.5
    background_below: float = 0.15
    ring: int = 2
    guided: bool = True
    min_ratio: float = 0.5

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> None:
            raise ValueError(f"AdaptConfig.{name} {why}, got {getattr(self, name)!r}")

        for name in ("rounds", "steps"):
            if getattr(self, name) < 1:
                bad(name, "must be at least 1")
        if self.lr <= 0:
            bad("lr", "must be positive")
        if self.warmup < 0 or self.ring < 0:
            bad("warmup", "and ring must be non-negative")
        for name in ("real_fraction", "sure", "negative_below", "background_below", "min_ratio"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                bad(name, "must be in [0, 1]")
        if self.negative_below > self.sure:
            bad("negative_below", "must not exceed sure")
        if self.tta not in (1, 2, 4, 8):
            bad("tta", "must be 1, 2, 4 or 8")

    def to_dict(self) -> dict:
        """JSON/YAML-able form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> AdaptConfig:
        """From a (partial) mapping; unknown keys raise ``ValueError``."""
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown adaptation parameter(s): {', '.join(sorted(unknown))}")
        return cls(**values)


def pseudo_labels(
    detection: np.ndarray,
    segmentation: np.ndarray,
    instances: InstanceConfig,
    config: AdaptConfig,
    rgb: np.ndarray | None = None,
) -> tuple[np.ndarray, dict[str, float]]:
    """A teacher's maps → int32 labels: sure nuclei ``1..n``, background 0, :data:`IGNORE_LABEL` where unsure.

    With the tile's ``rgb`` (on the maps' grid), objects of marking dye's colours (:mod:`pysynth.dye`) are
    background, however sure the teacher is: what ``segment`` and ``infer`` drop, the student learns is not a
    nucleus.

    Returns:
        ``(labels, stats)``; stats: ``objects``, ``sure`` (count), ``negatives`` (count, dye included), ``dye``
        (count), ``labelled`` (share of pixels not ignored), ``nuclear`` (share of pixels in sure nuclei),
        ``mean_confidence``.
    """
    # every object, whatever the model's minimum confidence: the doubted ones are sorted below
    objects = find_instances(detection, segmentation, replace(instances, min_confidence=0.0))
    found, confidence = objects.labels, objects.confidence
    n = int(found.max()) if found.size else 0
    is_sure = confidence >= config.sure
    is_negative = confidence < config.negative_below
    dye = dye_labels(found, rgb, n) if rgb is not None else np.zeros(n + 1, bool)
    is_sure &= ~dye
    is_negative |= dye
    is_sure[0] = is_negative[0] = False
    new_id = np.zeros(n + 1, np.int32)
    new_id[is_sure] = np.arange(1, int(is_sure.sum()) + 1, dtype=np.int32)
    labels = new_id[found]
    unsure_object = (found > 0) & ~is_sure[found] & ~is_negative[found]
    if config.ring and unsure_object.any():
        k = 2 * config.ring + 1
        unsure_object = cv2.dilate(unsure_object.view(np.uint8), np.ones((k, k), np.uint8)).astype(bool)
    middling = (found == 0) & (segmentation >= config.background_below)
    ignore = (unsure_object | middling) & (labels == 0)
    labels[ignore] = IGNORE_LABEL
    stats = {
        "objects": float(n),
        "sure": float(is_sure.sum()),
        "negatives": float(is_negative[1:].sum()) if n else 0.0,
        "dye": float(dye[1:].sum()) if n else 0.0,
        "labelled": float(1.0 - ignore.mean()),
        "nuclear": float((labels[~ignore] > 0).sum() / labels.size),
        "mean_confidence": float(confidence[1:].mean()) if n else 0.0,
    }
    return labels, stats


def label_tiles(
    teacher_dir: Path,
    tiles: Sequence[tuple[str, np.ndarray]],
    out_dir: Path,
    config: AdaptConfig,
    mpp: float,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Pseudo-label every real tile with the teacher into ``out_dir`` (one ``.npz`` each, atomic; kept on resume).

    Returns:
        The round's pseudo-label statistics (summed counts per tissue Mpx, mean shares), also written as
        ``out_dir/stats.json``.
    """
    from pysynth.infer import inference_model
    from pysynth.io import tissue_mask_from_rgb
    from pysynth.segment import predict_maps, to_model_grid

    out_dir.mkdir(parents=True, exist_ok=True)
    stats_path = out_dir / "stats.json"
    if stats_path.exists():
        return json.loads(stats_path.read_text())
    model, info = inference_model(str(teacher_dir))
    per_tile = []
    for k, (name, rgb) in enumerate(tiles):
        path = out_dir / f"{k:05d}.npz"
        if path.exists():
            with np.load(path) as z:
                per_tile.append(json.loads(str(z["stats"])))
        else:
            scaled = np.ascontiguousarray(to_model_grid(rgb, mpp, info.mpp))
            det, seg = predict_maps(model, scaled, tta=config.tta)
            labels, stats = pseudo_labels(det, seg, info.instances, config, scaled)
            tissue = tissue_mask_from_rgb(scaled, info.mpp)
            stats["tissue_mpx"] = float(tissue.sum() / 1e6)
            stats["labelled_tissue"] = float((labels[tissue] != IGNORE_LABEL).mean()) if tissue.any() else 0.0
            stats["name"] = name
            import io

            buffer = io.BytesIO()
            np.savez(buffer, rgb=scaled, labels=labels, tissue=tissue, stats=json.dumps(stats))
            atomic_write_bytes(path, buffer.getvalue())
            per_tile.append(stats)
        if progress is not None:
            progress(1)
    tissue_mpx = sum(s["tissue_mpx"] for s in per_tile)
    summary = {
        "tiles": len(per_tile),
        "tissue_mpx": round(tissue_mpx, 3),
        "sure_per_tissue_mpx": round(sum(s["sure"] for s in per_tile) / max(tissue_mpx, 1e-9), 2),
        "negatives_per_tissue_mpx": round(sum(s["negatives"] for s in per_tile) / max(tissue_mpx, 1e-9), 2),
        "labelled_tissue": round(float(np.mean([s["labelled_tissue"] for s in per_tile])), 4),
        "mean_confidence": round(float(np.mean([s["mean_confidence"] for s in per_tile])), 4),
    }
    atomic_write_text(stats_path, json.dumps(summary, indent=1) + "\n")
    return summary


@dataclass
class RealCrops:
    """Item ``i``: a random crop of a pseudo-labelled real tile (depends on (seed, i) only)."""

    folder: str
    size: int
    seed: int

    def __post_init__(self) -> None:
        self._tiles: list[tuple[np.ndarray, np.ndarray, np.ndarray]] | None = None

    def _load(self) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        if self._tiles is None:
            tiles = []
            for path in sorted(Path(self.folder).glob("*.npz")):
                with np.load(path) as z:
                    if min(z["labels"].shape) >= self.size:
                        tiles.append((z["rgb"], z["labels"], z["tissue"]))
            if not tiles:
                raise PysynthError(f"no pseudo-labelled real tile of at least {self.size} px")
            self._tiles = tiles
        return self._tiles

    def __call__(self, index: int) -> tuple[dict[str, np.ndarray], dict]:
        """Arrays ``image`` and ``labels`` (with :data:`IGNORE_LABEL` where unsure) of crop ``index``; meta."""
        from pysynth.synth.store import item_rng

        tiles = self._load()
        rng = item_rng(self.seed + 104_729, index)
        k = int(rng.integers(len(tiles)))
        rgb, labels, tissue = tiles[k]
        h, w = labels.shape
        s = self.size
        for _ in range(8):  # prefer crops that hold tissue
            y, x = int(rng.integers(h - s + 1)), int(rng.integers(w - s + 1))
            if tissue[y : y + s, x : x + s].mean() >= 0.3:
                break
        crop = labels[y : y + s, x : x + s]
        return {"image": rgb[y : y + s, x : x + s], "labels": crop}, {"source": f"real:{k}", "index": index}


@dataclass
class MixedSource:
    """Item ``i``: pseudo-labelled real with probability ``real_fraction`` (decided by (seed, i)), else synthetic.

    Validation items (index ≥ ``first_validation``) are always synthetic: thresholds are chosen on exact labels.
    """

    synthetic: Callable[[int], tuple[dict[str, np.ndarray], dict]]
    real: Callable[[int], tuple[dict[str, np.ndarray], dict]]
    real_fraction: float
    seed: int
    first_validation: int

    def __call__(self, index: int) -> tuple[dict[str, np.ndarray], dict]:
        """Item ``index`` of the real or the synthetic source."""
        from pysynth.synth.store import item_rng

        if index < self.first_validation and item_rng(self.seed + 15_485_863, index).random() < self.real_fraction:
            return self.real(index)
        return self.synthetic(index)


def _round_config(base: TrainConfig, config: AdaptConfig, teacher: Path, round_index: int) -> TrainConfig:
    synth = replace(base.synth, guide=str(teacher)) if config.guided else base.synth
    return replace(
        base,
        synth=synth,
        steps=config.steps,
        lr=config.lr,
        warmup=min(config.warmup, config.steps - 1),
        init=str(teacher),
        seed=base.seed + round_index,
        snapshot_every=0,
    )


def adapt(
    base: TrainConfig,
    config: AdaptConfig,
    model_dir: Path,
    out_dir: Path,
    real: Sequence[Path],
    *,
    input_mpp: float | None = None,
    overwrite: bool = False,
    progress: Callable[[str, int, int], None] | None = None,
    device: Any = "cpu",
) -> dict[str, Any]:
    """Adapt the model in ``model_dir`` to the real sources; the result (a model folder) goes to ``out_dir``.

    ``out_dir`` holds ``adapt.yaml`` (the settings), ``rounds/rN/`` (each round: ``pseudo/`` labels of the real
    tiles with ``stats.json``, and a training run folder), ``rounds.json`` (per-round statistics) and, at the end,
    ``model.pt`` + ``model.json`` of the last good round.

    Raises:
        PysynthError: If the model or the sources cannot be used, ``out_dir`` holds an adaptation with other
            settings (without ``overwrite``), or a round's sanity checks collapse.
    """
    import yaml

    from pysynth.models.io import model_digest, read_model_info
    from pysynth.runs import claim_run
    from pysynth.synth.generate import collect_real_tiles
    from pysynth.train.config import dump_config
    from pysynth.train.loop import VAL_OFFSET, train

    info = read_model_info(model_dir)
    if base.model != info.unet:
        base = replace(base, model=info.unet)
    if abs(base.synth.model_mpp - info.mpp) > 1e-9:
        ratio = info.mpp / base.synth.mpp
        if ratio > 1 and abs(ratio - round(ratio)) < 1e-6:  # a coarser model: synthesis stays where it is calibrated
            synth = replace(base.synth, output_mpp=info.mpp)
        else:
            synth = replace(base.synth, mpp=info.mpp, output_mpp=0.0)
        base = replace(base, synth=synth)
    settings = {
        "format": FORMAT,
        "model": str(Path(model_dir).resolve()),
        "model_digest": model_digest(model_dir),
        "sources": [str(Path(p).resolve()) for p in real],
        "input_mpp": input_mpp,
        "adapt": config.to_dict(),
        "train": json.loads(json.dumps(base.to_dict())),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    if overwrite and (out_dir / ROUNDS).exists():
        shutil.rmtree(out_dir / ROUNDS)
    # on --overwrite the earlier adaptation's results go too: none may stand beside the new settings
    stale = ("rounds.json", "model.pt", "model.json")
    claim_run(
        out_dir,
        {"adapt.yaml": yaml.safe_dump(settings, sort_keys=False)},
        overwrite,
        stale,
        progress_files=(ROUNDS, "rounds.json", "model.pt"),
    )
    tiles, failures = collect_real_tiles(real, base.synth, input_mpp=input_mpp, seed=base.seed)
    for message in failures:
        log.warning("%s", message)
    if not tiles:
        raise PysynthError("no usable real tissue in the sources: " + ("; ".join(failures) or "none given"))
    teacher = Path(model_dir)
    history: list[dict[str, Any]] = []
    for r in range(1, config.rounds + 1):
        folder = out_dir / ROUNDS / f"r{r}"
        stats = label_tiles(
            teacher,
            tiles,
            folder / PSEUDO,
            config,
            base.synth.mpp,
            progress=(lambda n, r=r: progress(f"round {r}: pseudo-labels", n, len(tiles))) if progress else None,
        )
        entry = {"round": r, "teacher": str(teacher), "pseudo_labels": stats}
        if history:
            first = history[0]["pseudo_labels"]
            for key in ("sure_per_tissue_mpx", "labelled_tissue"):
                if stats[key] < config.min_ratio * first[key]:
                    atomic_write_text(out_dir / "rounds.json", json.dumps([*history, entry], indent=1) + "\n")
                    raise PysynthError(
                        f"round {r}: pseudo-labels collapsed ({key} {stats[key]} against {first[key]} in round 1); "
                        f"stopped, the model of round {r - 1} is kept in {out_dir}"
                    )
        run_config = _round_config(base, config, teacher, r)
        run_dir = folder / "train"
        real_crops = RealCrops(str(folder / PSEUDO), run_config.synth.size, run_config.seed)

        def mixed(synthetic, real_crops=real_crops, run_config=run_config):
            return MixedSource(synthetic, real_crops, config.real_fraction, run_config.seed, VAL_OFFSET)

        finished = run_dir / "model.json"
        if finished.exists() and (run_dir / "config.yaml").read_text() == dump_config(run_config):
            entry["validation"] = json.loads(finished.read_text())["validation"]  # a finished round: kept
            history.append(entry)
            teacher = run_dir
            continue
        summary = train(
            run_config,
            run_dir,
            real=real,
            input_mpp=input_mpp,
            progress=(lambda step, parts, r=r: progress(f"round {r}: training", step, config.steps))
            if progress
            else None,
            sources_note=[Path(p).name for p in real],
            device=device,
            wrap_source=mixed,
        )
        entry["validation"] = summary["validation"]
        history.append(entry)
        atomic_write_text(out_dir / "rounds.json", json.dumps(history, indent=1) + "\n")
        teacher = run_dir
    final = read_model_info(teacher)
    for name in ("model.pt",):
        shutil.copyfile(teacher / name, out_dir / f".{name}.part")
        (out_dir / f".{name}.part").replace(out_dir / name)
    meta = json.loads((teacher / "model.json").read_text())
    meta["adapt"] = {"from": settings["model"], "from_digest": settings["model_digest"], "rounds": history}
    atomic_write_text(out_dir / "model.json", json.dumps(meta, indent=1) + "\n")
    return {"rounds": history, "instances": asdict(final.instances)}

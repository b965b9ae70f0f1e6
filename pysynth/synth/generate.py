"""From real tissue to a synthetic dataset: collecting real tiles, preparing them once, making items.

A dataset folder holds ``sources/`` (each real tile prepared for synthesis, saved once) beside the store's
``index.json`` and ``shards/``. Items keep the reference patch as its position in its source tile (``xy``), not
as pixels: the tile is in the folder anyway, so :class:`SyntheticPatches` crops references on read at no cost
in disk space (half of every item would otherwise be a second image).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from pysynth.errors import PysynthError, SlideError
from pysynth.fsutil import atomic_write_bytes, atomic_write_text
from pysynth.synth.config import SynthConfig
from pysynth.synth.guide import NucleusBank
from pysynth.synth.source import SourceTile, prepare_source

log = logging.getLogger("pysynth")

SOURCES_DIR = "sources"
#: Real tiles read from large slides: side in px at the synthesis resolution, and how many per slide.
SLIDE_TILE = 1024
TILES_PER_SLIDE = 8


def collect_real_tiles(
    inputs: Sequence[Path], config: SynthConfig, *, input_mpp: float | None = None, seed: int = 0
) -> tuple[list[tuple[str, np.ndarray]], list[str]]:
    """Real RGB tiles at ``config.mpp`` from patch folders (``pysynth sample`` output), slides or images.

    A folder with a ``manifest.csv`` is taken as ``pysynth sample`` output (its µm/px in the manifest). Other files
    are opened as slides or images: small ones are read whole at ``config.mpp``, large ones give
    :data:`TILES_PER_SLIDE` random tissue tiles of :data:`SLIDE_TILE` px.

    Returns:
        ``(tiles, failures)``: ``(name, rgb)`` pairs, and one message per unusable input.
    """
    from pysynth.io import (
        compute_tissue_mask,
        load_rgb,
        open_slide,
        read_region,
        read_thumbnail,
        tissue_mask_from_rgb,
    )
    from pysynth.io.tissue import warn_if_greyscale
    from pysynth.sample import place_patches, source_rng
    from pysynth.sources import collect_sources

    tiles: list[tuple[str, np.ndarray]] = []
    failures: list[str] = []
    plain: list[Path] = []
    for item in inputs:
        manifest = Path(item) / "manifest.csv"
        if manifest.is_file():
            with manifest.open(newline="") as handle:
                for row in csv.DictReader(handle):
                    rgb = load_rgb(Path(item) / row["file"])
                    mpp = float(row["mpp"])
                    if abs(mpp - config.mpp) > 1e-6:
                        f = mpp / config.mpp
                        rgb = cv2.resize(rgb, (round(rgb.shape[1] * f), round(rgb.shape[0] * f)))
                    tiles.append((row["file"], rgb))
        else:
            plain.extend(collect_sources([item]))
    for path in plain:
        try:
            with open_slide(path, input_mpp) as reader:
                h0, w0 = reader.level_shapes_hw[0]
                f = config.mpp / reader.mpp
                if max(h0, w0) / f <= 2 * SLIDE_TILE:
                    rgb = read_thumbnail(reader, config.mpp)
                    small = rgb[::4, ::4]  # a large slide's warning comes from compute_tissue_mask
                    warn_if_greyscale(reader.name, small, tissue_mask_from_rgb(small, 4 * config.mpp))
                    tiles.append((path.name, rgb))
                    continue
                tissue = compute_tissue_mask(reader)
                extent = SLIDE_TILE * f
                xy, _ = place_patches(
                    tissue, (h0, w0), extent, TILES_PER_SLIDE, 0.5, source_rng(seed, path.name), TILES_PER_SLIDE * 200
                )
                for k, (x, y) in enumerate(xy):
                    tiles.append((f"{path.name}#{k}", read_region(reader, x, y, (SLIDE_TILE, SLIDE_TILE), config.mpp)))
        except SlideError as exc:
            failures.append(str(exc))
    kept = []
    for name, rgb in tiles:
        if min(rgb.shape[:2]) < config.synth_size:
            wanted = f"--size {config.size}" + (f" at {config.output_mpp} µm/px" if config.factor > 1 else "")
            failures.append(f"{name}: {rgb.shape[1]}×{rgb.shape[0]} px at {config.mpp} µm/px is smaller than {wanted}")
        elif tissue_mask_from_rgb(rgb[::4, ::4], 4 * config.mpp).mean() < 0.05:
            failures.append(f"{name}: no tissue")
        else:
            kept.append((name, rgb))
    return kept, failures


def _prepare_one(args: tuple[str, np.ndarray, dict, str, Any]) -> None:
    name, rgb, config, path, guide = args
    cv2.setNumThreads(1)
    s = prepare_source(rgb, SynthConfig.from_dict(config), name, guide)
    buffer = io.BytesIO()
    bank = {}
    if s.bank is not None:
        bank = {"bank_boxes": s.bank.boxes, "bank_delta": s.bank.delta, "bank_mask": s.bank.mask}
        if s.bank.classes is not None:
            bank["bank_classes"] = s.bank.classes
    np.savez(
        buffer,
        rgb=s.rgb,
        background=s.background,
        tissue=s.tissue,
        stain=s.stain,
        darkness=s.darkness,
        texture=s.texture,
        density=np.float64(s.density),
        median_area=np.float64(s.median_area),
        darkness_min=np.float64(s.darkness_min),
        **bank,
    )
    atomic_write_bytes(path, buffer.getvalue())


def save_sources(
    tiles: Sequence[tuple[str, np.ndarray]],
    config: SynthConfig,
    out_dir: Path,
    *,
    workers: int = 1,
    progress: Callable[[int], None] | None = None,
    digests: Sequence[str] | None = None,
) -> None:
    """Prepare every tile for synthesis and save it under ``out_dir/sources`` (atomic; kept on resume).

    ``sources/digests.json`` records the tiles' pixel digests and the configuration they were prepared with;
    prepared tiles of other pixels or another configuration (an earlier run with other sources) are redone, never
    reused under a new tile's name. ``digests``: the tiles' :func:`tile_digest`, when the caller has them.
    """
    folder = out_dir / SOURCES_DIR
    folder.mkdir(parents=True, exist_ok=True)
    record = {
        "config": config.to_dict(),
        "guide": guide_digest(config),
        "tiles": list(digests) if digests is not None else [tile_digest(rgb) for _, rgb in tiles],
    }
    record_path = folder / "digests.json"
    try:
        earlier = json.loads(record_path.read_text())
    except (OSError, ValueError):
        earlier = None
    if earlier != json.loads(json.dumps(record)):
        keep = 0
        same_setup = earlier and (earlier.get("config"), earlier.get("guide")) == (record["config"], record["guide"])
        if same_setup:  # the same leading tiles stay (a resume)
            for old, new in zip(earlier.get("tiles", []), record["tiles"], strict=False):
                if old != new:
                    break
                keep += 1
        for stale in folder.glob("*.npz"):
            if not stale.stem.isdigit() or int(stale.stem) >= keep:
                stale.unlink()
        atomic_write_text(record_path, json.dumps(record))
    todo = [
        (name, rgb, config.to_dict(), str(folder / f"{k:05d}.npz"), None)
        for k, (name, rgb) in enumerate(tiles)
        if not (folder / f"{k:05d}.npz").exists()
    ]
    if config.guide and todo:
        from pysynth.synth.guide import guide_maps

        log.info("running the synthesis guide %s on %d real tile(s)", config.guide, len(todo))
        todo = [(*t[:4], guide_maps(config.guide, t[1], config.mpp, config.guide_tta)) for t in todo]
    if workers > 1 and len(todo) > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(min(workers, len(todo)), mp_context=multiprocessing.get_context("spawn")) as pool:
            for _ in pool.map(_prepare_one, todo):
                if progress is not None:
                    progress(1)
    else:
        for args in todo:
            _prepare_one(args)
            if progress is not None:
                progress(1)
    atomic_write_text(folder / "sources.json", json.dumps({"names": [name for name, _ in tiles]}, indent=1))


def load_sources(dataset_dir: str | Path) -> list[SourceTile]:
    """The prepared source tiles of a dataset folder."""
    folder = Path(dataset_dir) / SOURCES_DIR
    try:
        names = json.loads((folder / "sources.json").read_text())["names"]
    except (OSError, ValueError, KeyError) as exc:
        raise PysynthError(f"{folder}: no prepared sources ({exc})") from None
    tiles = []
    for k, name in enumerate(names):
        with np.load(folder / f"{k:05d}.npz") as z:
            rgb = z["rgb"]
            tiles.append(
                SourceTile(
                    name=name,
                    rgb=rgb,
                    background=z["background"],
                    tissue=z["tissue"],
                    super_mask=None,
                    stain=z["stain"],
                    darkness=z["darkness"],
                    texture=z["texture"],
                    density=float(z["density"]),
                    median_area=float(z["median_area"]),
                    darkness_min=float(z["darkness_min"]) if "darkness_min" in z else 0.0,
                    bank=NucleusBank(
                        z["bank_boxes"],
                        z["bank_delta"],
                        z["bank_mask"],
                        z.get("bank_classes"),
                    )
                    if "bank_boxes" in z
                    else None,
                )
            )
    return tiles


def synth_schema(size: int):
    """What every synthetic item holds."""
    from pysynth.synth.schema import Field, Schema

    return Schema(
        {
            "image": Field("uint8", (size, size, 3)),
            "labels": Field("uint16", (size, size)),
            "centres": Field("float32", (None, 2)),
            "classes": Field("uint8", (None,)),
            "xy": Field("int32", (4,)),
        }
    )


@dataclass
class SynthMaker:
    """``make_item(i)`` for the store and the streaming dataset: item ``i`` depends on (seed, i) only.

    Picklable: worker processes load the prepared sources themselves, once.
    """

    dataset_dir: str
    config: dict
    seed: int

    def __post_init__(self) -> None:
        self._sources: list[SourceTile] | None = None
        self._config = SynthConfig.from_dict(self.config)

    def __getstate__(self) -> dict:
        return {"dataset_dir": self.dataset_dir, "config": self.config, "seed": self.seed}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.__post_init__()

    def __call__(self, index: int, seed: int | None = None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Item ``index`` (of the stream ``seed``, default the maker's): its arrays and meta (source, seed, index)."""
        seed = self.seed if seed is None else int(seed)
        from pysynth.synth.recipe import synthesize_patch
        from pysynth.synth.store import item_rng

        if self._sources is None:
            cv2.setNumThreads(1)
            self._sources = load_sources(self.dataset_dir)
        rng = item_rng(seed, index)
        k = int(rng.integers(len(self._sources)))
        patch = synthesize_patch(self._sources[k], rng, self._config)
        xy = np.array([*patch.patch_xy, *patch.reference_xy], np.int32)
        arrays = {
            "image": patch.image,
            "labels": patch.labels,
            "centres": patch.centres,
            "classes": patch.classes,
            "xy": xy,
        }
        return arrays, {"source": k, "seed": seed, "index": index}


class SyntheticPatches:
    """A synthetic dataset for training: ``ds[i]`` gives image, labels, centres, reference and meta.

    Args:
        path: Dataset folder written by :func:`synthesize_dataset`.
    """

    def __init__(self, path: str | Path) -> None:
        from pysynth.synth.store import SynthDataset

        self.path = Path(path)
        self.items = SynthDataset(self.path)
        self._rgb: list[np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = self.items[i]
        if self._rgb is None:  # only the real tiles are needed here, not their prepared maps
            folder = self.path / SOURCES_DIR
            count = len(json.loads((folder / "sources.json").read_text())["names"])
            self._rgb = []
            for k in range(count):
                with np.load(folder / f"{k:05d}.npz") as z:
                    self._rgb.append(z["rgb"])
        s = item["image"].shape[0]
        factor = SynthConfig.from_dict(self.items.attrs.get("config", {})).factor
        rx, ry = int(item["xy"][2]), int(item["xy"][3])  # in the source tile, at the synthesis resolution
        reference = self._rgb[int(item["meta"]["source"])][ry : ry + s * factor, rx : rx + s * factor]
        if factor > 1:  # at the stored patches' resolution, as the synthesis made them
            reference = cv2.resize(reference, (s, s), interpolation=cv2.INTER_AREA)
        item["reference"] = reference
        return item


def synthesize_dataset(
    inputs: Sequence[Path],
    out_dir: str | Path,
    n: int,
    config: SynthConfig,
    *,
    seed: int = 0,
    workers: int = 1,
    input_mpp: float | None = None,
    shard_size: int = 1024,
    overwrite: bool = False,
    progress: Callable[[int], None] | None = None,
) -> tuple[Any, list[str]]:
    """Collect and prepare real tiles, then write ``n`` synthetic patches as a sharded dataset (resumable).

    Returns:
        ``(report, failures)``: the store's write report and the inputs that could not be used.

    Raises:
        PysynthError: If no input gives a usable tile, or the folder holds a dataset with other settings.
    """
    from pysynth.synth.store import write_dataset

    out_dir = Path(out_dir)
    tiles, failures = collect_real_tiles(inputs, config, input_mpp=input_mpp, seed=seed)
    if not tiles:
        raise PysynthError("no usable real tissue in the sources: " + ("; ".join(failures) or "none given"))
    attrs = {
        "config": config.to_dict(),
        "seed": seed,
        "sources": [name for name, _ in tiles],
        "source_digests": [tile_digest(rgb) for _, rgb in tiles],
        **({"guide_digest": guide_digest(config)} if config.guide else {}),
    }
    _check_earlier_dataset(out_dir, attrs, overwrite)
    log.info("preparing %d real tile(s) for synthesis", len(tiles))
    save_sources(tiles, config, out_dir, workers=workers, digests=attrs["source_digests"])
    maker = SynthMaker(str(out_dir), config.to_dict(), seed)
    report = write_dataset(
        out_dir,
        n,
        maker,
        schema=synth_schema(config.size),
        shard_size=shard_size,
        workers=workers,
        progress=progress,
        attrs=attrs,
        overwrite=overwrite,
    )
    return report, failures


def tile_digest(rgb: np.ndarray) -> str:
    """A BLAKE2 digest of a real tile's pixels (with its shape): what a dataset was made from."""
    digest = hashlib.blake2b(digest_size=12)
    digest.update(str(rgb.shape).encode())
    digest.update(np.ascontiguousarray(rgb).tobytes())
    return digest.hexdigest()


def guide_digest(config: SynthConfig) -> str | None:
    """The model digest of the synthesis guide (``None`` without one).

    A guide is named (``default``), and what a name points to changes when the shipped model does, so prepared
    tiles and datasets record the weights that made them.
    """
    if not config.guide:
        return None
    from pysynth.models.io import model_digest
    from pysynth.synth.guide import resolve_guide

    return model_digest(resolve_guide(config.guide))


def _check_earlier_dataset(out_dir: Path, attrs: dict, overwrite: bool) -> None:
    """Refuse, before anything is written, a folder whose dataset was made from other tiles or settings.

    Raises :class:`~pysynth.synth.store.DatasetMismatchError` (settings named as recorded: ``seed``,
    ``config.<field>``, ``sources``, ...; the command line words them as its options).

    The prepared tiles of ``sources/`` are kept on resume only when they are the same tiles (:func:`save_sources`).
    """
    from pysynth.ledger import settings_diff
    from pysynth.synth.store import INDEX_NAME, DatasetMismatchError

    index = out_dir / INDEX_NAME
    if overwrite or not index.exists():
        return  # save_sources redoes prepared tiles that are not these tiles
    try:
        earlier = json.loads(index.read_text()).get("attrs") or {}
    except (OSError, ValueError):
        return  # the store reports an unreadable index
    now = json.loads(json.dumps(attrs, sort_keys=True))
    if earlier.get("source_digests") != now["source_digests"]:
        tiles = f"{len(earlier.get('sources', []))} tile(s) -> {len(now['sources'])}"
        detail = f"{tiles}, or the same names with other pixels"
        raise DatasetMismatchError(out_dir, [("real tissue", detail)])
    changed = settings_diff({k: v for k, v in earlier.items() if k != "source_digests"}, now)
    changed = [c for c in changed if not c.startswith("source_digests")]
    if changed:  # "key old -> new"; keys are identifiers joined by "."
        named = [(key, detail) for key, _, detail in (c.partition(" ") for c in changed)]
        raise DatasetMismatchError(out_dir, named, what="other settings:")


def write_preview(dataset_dir: str | Path, count: int = 24) -> Path:
    """``preview.png``: synthetic patches, the same with label outlines, and their real reference patches.

    Outlines are green, those of synthetic lymphocytes blue (the colours of ``segment``'s and ``infer``'s overlays).
    """
    from pysynth.segment import CLASS_COLOURS, LYMPHOCYTE
    from pysynth.synth.lymphocytes import LYMPHOCYTE as LYMPHOCYTE_CODE
    from pysynth.synth.lymphocytes import label_classes
    from pysynth.synth.store import outline_mask
    from pysynth.viz import contact_sheet

    ds = SyntheticPatches(dataset_dir)
    images, captions = [], []
    for i in np.linspace(0, len(ds) - 1, min(count, len(ds))).astype(int)[: count // 3 * 3 or 1]:
        item = ds[int(i)]
        outlined = item["image"].copy()
        edge = outline_mask(item["labels"])
        outlined[edge] = (0, 255, 0)
        lymphocytes = 0
        if "classes" in item and len(item["classes"]):
            is_lym = label_classes(item["classes"], int(item["labels"].max()))[item["labels"]] == LYMPHOCYTE_CODE
            outlined[edge & is_lym] = CLASS_COLOURS[LYMPHOCYTE]
            lymphocytes = int((item["classes"] == LYMPHOCYTE_CODE).sum())
        images += [item["image"], outlined, item["reference"]]
        extra = f", {lymphocytes} lymph." if lymphocytes else ""
        captions += [f"#{i}", f"#{i} {len(item['centres'])} nuclei{extra}", "real"]
    sheet = contact_sheet(images, captions, columns=9)
    path = Path(dataset_dir) / "preview.png"
    atomic_write_bytes(path, cv2.imencode(".png", cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR))[1].tobytes())
    return path


def streaming_dataset(
    inputs: Sequence[Path],
    work_dir: str | Path,
    config: SynthConfig,
    *,
    seed: int = 0,
    length: int | None = None,
    input_mpp: float | None = None,
):
    """A torch ``IterableDataset`` of synthetic patches made on the fly (no shards written).

    The real tiles are prepared once into ``work_dir/sources`` (reused if already there), so DataLoader workers
    load them instead of redoing the preparation; item ``i`` equals item ``i`` of a dataset written with the same
    sources, config and seed.

    Returns:
        A :class:`pysynth.synth.stream.StreamingDataset`; batch it with
        ``collate_fn=functools.partial(collate, ragged=("centres",))``.
    """
    from pysynth.synth.stream import StreamingDataset

    work_dir = Path(work_dir)
    if not (work_dir / SOURCES_DIR / "sources.json").exists():
        tiles, failures = collect_real_tiles(inputs, config, input_mpp=input_mpp, seed=seed)
        if not tiles:
            raise PysynthError("no usable real tissue in the sources: " + ("; ".join(failures) or "none given"))
        save_sources(tiles, config, work_dir)
    maker = SynthMaker(str(work_dir), config.to_dict(), seed)
    return StreamingDataset(maker, seed=seed, length=length, schema=synth_schema(config.size))

"""The training loop: outputs, exact resume, determinism, refusing a different run, the dataset path."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from pysynth.errors import PysynthError
from pysynth.instances import InstanceConfig
from pysynth.models.io import load_model
from pysynth.train.config import TrainConfig, dump_config, load_config_file
from pysynth.train.loop import MIN_CONFIDENCE_GRID, min_size_grid, train

TINY = {
    "model": {"width": 4, "depth": 2, "max_width": 16},
    "synth": {"size": 80},
    "augment": {"scale": [0.9, 1.1]},
    "crop": 64,
    "batch": 2,
    "steps": 4,
    "warmup": 1,
    "val_patches": 4,
    "checkpoint_every": 1,
    "snapshot_every": 2,
    "threads": 1,
}


@pytest.fixture(scope="module")
def real_png(tmp_path_factory: pytest.TempPathFactory, tissue_rgb: np.ndarray) -> Path:
    path = tmp_path_factory.mktemp("real") / "tissue.png"
    cv2.imwrite(str(path), cv2.cvtColor(tissue_rgb, cv2.COLOR_RGB2BGR))
    return path


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return torch.load(folder / "model.pt", weights_only=True)


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_writes_a_usable_model_folder(tmp_path: Path, real_png: Path) -> None:
    config = TrainConfig.from_dict(TINY)
    summary = train(config, tmp_path / "m", real=[real_png], input_mpp=0.25)
    folder = tmp_path / "m"
    for name in ("config.yaml", "checkpoint.pt", "losses.csv", "loss_curve.png", "model.pt", "model.json"):
        assert (folder / name).is_file(), name
    assert sorted(p.name for p in (folder / "snapshots").iterdir()) == ["step_000002.pt", "step_000004.pt"]
    assert summary["steps"] == 4
    model, info = load_model(folder)
    assert info.unet.width == 4
    assert info.mpp == 0.25
    assert TrainConfig.from_dict(load_config_file(folder / "config.yaml")) == config
    validation = json.loads((folder / "validation.json").read_text())
    assert len(validation["grid"]) == 80 * len(MIN_CONFIDENCE_GRID)  # training's grid: the base size and twice it
    assert {row["min_size"] for row in validation["grid"]} == {20, 40}
    # The model keeps the grid's chosen setting: as good as the best (one-standard-error rule), and no setting as good
    # has a higher minimum confidence (choose_thresholds' rule itself is checked in test_choose_thresholds.py).
    keys = InstanceConfig.__dataclass_fields__
    (kept,) = [row for row in validation["grid"] if {k: row[k] for k in keys} == asdict(info.instances)]
    assert kept == validation["grid"][0]
    assert kept["as_good"]
    as_good = [row for row in validation["grid"] if row["as_good"]]
    assert kept["min_confidence"] == max(row["min_confidence"] for row in as_good)
    same_confidence = [row["min_size"] for row in as_good if row["min_confidence"] == kept["min_confidence"]]
    assert kept["min_size"] == max(same_confidence)
    assert validation["chosen"] == asdict(info.instances)
    # The held-out patches are rebuilt from the folder alone, and the same rule gives the same choice.
    from pysynth.bench.thresholds import rechoose

    again = rechoose(str(folder), [real_png], 0.25)
    assert again["chosen"] == again["recorded"] == asdict(info.instances)
    assert again["chosen_row"] == kept
    assert again["settings"] == len(validation["grid"])
    # The wider grid (bench.thresholds --min-area-grid): the minimum areas too, chosen by the same rule.
    wide = rechoose(str(folder), [real_png], 0.25, min_areas=True)
    sizes = min_size_grid(20, config.synth.model_mpp)
    assert len(sizes) == 6
    assert wide["settings"] == 40 * len(sizes) * len(MIN_CONFIDENCE_GRID)
    assert wide["chosen_row"]["as_good"]
    assert wide["chosen"]["min_confidence"] >= kept["min_confidence"]  # the narrower grid's settings are in it
    # --save: a copy of the folder whose model.json has the given post-processing, the weights unchanged.
    from pysynth.bench.thresholds import main as thresholds_main
    from pysynth.bench.thresholds import save_rechosen

    chosen = dict(again["chosen"], min_size=again["chosen"]["min_size"] + 1)
    save_rechosen(str(folder), chosen, tmp_path / "m2")
    _, saved = load_model(tmp_path / "m2")
    assert asdict(saved.instances) == chosen
    assert (tmp_path / "m2" / "model.pt").read_bytes() == (folder / "model.pt").read_bytes()
    assert asdict(load_model(folder)[1].instances) == asdict(info.instances)  # the source folder is not changed
    with pytest.raises(PysynthError, match="exists"):
        save_rechosen(str(folder), chosen, tmp_path / "m2")
    argv = [str(folder), "--real", str(real_png), "--input-mpp", "0.25", "--save", str(tmp_path / "m2")]
    assert thresholds_main(argv) == 1  # refused before any patch is made
    out = model(torch.zeros(1, 3, 32, 32))
    assert out.shape == (1, 2, 32, 32)


def test_interrupted_run_resumes_exactly(tmp_path: Path, real_png: Path) -> None:
    config = TrainConfig.from_dict(TINY)
    train(config, tmp_path / "straight", real=[real_png], input_mpp=0.25)

    def stop_after_two(step: int, _parts: dict) -> None:
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(config, tmp_path / "resumed", real=[real_png], input_mpp=0.25, progress=stop_after_two)
    assert not (tmp_path / "resumed" / "model.pt").exists()
    train(config, tmp_path / "resumed", real=[real_png], input_mpp=0.25)
    assert _same(_weights(tmp_path / "straight"), _weights(tmp_path / "resumed"))

    # The losses rows too (the window of steps since the last row is checkpointed), all but the wall time.
    def rows(folder: Path) -> list[dict[str, str]]:
        import csv

        with (folder / "losses.csv").open() as handle:
            return [{k: v for k, v in row.items() if k != "wall_s"} for row in csv.DictReader(handle)]

    assert rows(tmp_path / "resumed") == rows(tmp_path / "straight")
    assert len(rows(tmp_path / "straight")) >= 1


def test_seed_decides_the_result(tmp_path: Path, real_png: Path) -> None:
    train(TrainConfig.from_dict(TINY), tmp_path / "a", real=[real_png], input_mpp=0.25)
    train(TrainConfig.from_dict(TINY), tmp_path / "b", real=[real_png], input_mpp=0.25)
    train(TrainConfig.from_dict({**TINY, "seed": 1}), tmp_path / "c", real=[real_png], input_mpp=0.25)
    assert _same(_weights(tmp_path / "a"), _weights(tmp_path / "b"))
    assert not _same(_weights(tmp_path / "a"), _weights(tmp_path / "c"))


def test_other_settings_are_refused_unless_overwrite(tmp_path: Path, real_png: Path) -> None:
    train(TrainConfig.from_dict(TINY), tmp_path / "m", real=[real_png], input_mpp=0.25)
    other = TrainConfig.from_dict({**TINY, "lr": 1e-3})
    with pytest.raises(PysynthError, match="lr"):
        train(other, tmp_path / "m", real=[real_png], input_mpp=0.25)
    train(other, tmp_path / "m", real=[real_png], input_mpp=0.25, overwrite=True)
    assert "lr: 0.001" in (tmp_path / "m" / "config.yaml").read_text()


def test_config_parts_and_errors(tmp_path: Path) -> None:
    config = TrainConfig.from_dict({"model": {"width": 12}, "synth": {"size": 256}, "augment": {"blur_p": 0.0}})
    assert config.model.width == 12
    assert config.model.depth == 4
    assert config.synth.size == 256
    assert config.augment.blur_p == 0.0
    (tmp_path / "c.yaml").write_text(dump_config(config))
    assert TrainConfig.from_dict(load_config_file(tmp_path / "c.yaml")) == config
    with pytest.raises(ValueError, match="unknown training"):
        TrainConfig.from_dict({"stepz": 3})
    with pytest.raises(ValueError, match="unknown model"):
        TrainConfig.from_dict({"model": {"widht": 3}})
    with pytest.raises(ValueError, match="crop"):
        TrainConfig.from_dict({"crop": 100})
    (tmp_path / "bad.yaml").write_text("steps: [1,\n")
    with pytest.raises(PysynthError, match="YAML"):
        load_config_file(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(PysynthError, match="mapping"):
        load_config_file(tmp_path / "list.yaml")


def test_training_from_a_stored_dataset(tmp_path: Path, real_png: Path) -> None:
    from pysynth.synth.config import SynthConfig
    from pysynth.synth.generate import synthesize_dataset

    synthesize_dataset([real_png], tmp_path / "ds", 6, SynthConfig(size=80), input_mpp=0.25, shard_size=4)
    summary = train(TrainConfig.from_dict(TINY), tmp_path / "m", synthetic=tmp_path / "ds")
    assert summary["steps"] == 4
    assert (tmp_path / "m" / "model.pt").is_file()
    assert not (tmp_path / "m" / "work").exists()


def test_items_carry_their_sample_weight() -> None:
    from pysynth.train.loop import ItemMaker

    labels = np.zeros((80, 80), np.uint16)
    labels[20:40, 20:40] = 1
    image = np.full((80, 80, 3), 200, np.uint8)

    def source(i: int, weight: float | None = None) -> tuple[dict, dict]:
        arrays = {"image": image, "labels": labels}
        if i % 2:
            arrays["weight"] = np.float32(0.25)
        return arrays, {}

    maker = ItemMaker(source, TrainConfig.from_dict(TINY))
    assert maker(0)["sample_weight"] == 1.0
    assert maker(1)["sample_weight"] == pytest.approx(0.25)


def test_ctrl_c_stops_after_the_step_and_saves_it(tmp_path: Path, real_png: Path) -> None:
    import os
    import signal

    config = TrainConfig.from_dict({**TINY, "checkpoint_every": 100})  # no regular checkpoint before the end
    before = signal.getsignal(signal.SIGINT)  # the default, or SIG_IGN in a background job

    def interrupt_at_two(step: int, _parts: dict) -> None:
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        train(config, tmp_path / "m", real=[real_png], input_mpp=0.25, progress=interrupt_at_two)
    state = torch.load(tmp_path / "m" / "checkpoint.pt", weights_only=False)
    assert state["step"] == 2
    assert signal.getsignal(signal.SIGINT) is before  # the handler the run found is back
    train(config, tmp_path / "m", real=[real_png], input_mpp=0.25)
    train(config, tmp_path / "straight", real=[real_png], input_mpp=0.25)
    assert _same(_weights(tmp_path / "m"), _weights(tmp_path / "straight"))


def test_a_corrupt_or_foreign_checkpoint_is_one_clear_error(tmp_path: Path, real_png: Path) -> None:
    config = TrainConfig.from_dict(TINY)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(PysynthError, match="corrupt or unreadable checkpoint"):
        train(config, tmp_path / "m", real=[real_png], input_mpp=0.25)
    torch.save({"format": "pysynth-joint-checkpoint", "version": 1}, tmp_path / "m" / "checkpoint.pt")
    with pytest.raises(PysynthError, match="not pysynth-segmenter-checkpoint"):
        train(config, tmp_path / "m", real=[real_png], input_mpp=0.25)


def test_init_starts_the_segmenter_from_a_model_folder(tmp_path: Path, real_png: Path) -> None:
    from pysynth.models.unet import UNet
    from pysynth.train.loop import init_segmenter

    first = TrainConfig.from_dict(TINY)
    train(first, tmp_path / "a", real=[real_png], input_mpp=0.25)
    start = _weights(tmp_path / "a")
    config = TrainConfig.from_dict({**TINY, "init": str(tmp_path / "a")})
    model = UNet(config.model)
    init_segmenter(model, config)
    assert _same(model.state_dict(), start)
    # A fine-tuning run starts there: after zero learning it ends where it started (lr tiny, weight decay off).
    still = TrainConfig.from_dict({**TINY, "init": str(tmp_path / "a"), "lr": 1e-12, "weight_decay": 0.0, "steps": 1})
    train(still, tmp_path / "b", real=[real_png], input_mpp=0.25)
    ended = _weights(tmp_path / "b")
    assert all(
        torch.allclose(ended[k].float(), start[k].float(), atol=1e-6)
        for k in start
        if "running" not in k and "num_batches" not in k
    )
    # Another shape, or a folder that is not a model: one clear error.
    other = TrainConfig.from_dict(
        {**TINY, "model": {"width": 8, "depth": 2, "max_width": 16}, "init": str(tmp_path / "a")}
    )
    with pytest.raises(PysynthError, match="not the one configured"):
        init_segmenter(UNet(other.model), other)
    with pytest.raises(PysynthError, match="no such model folder"):
        init_segmenter(UNet(config.model), TrainConfig.from_dict({**TINY, "init": str(tmp_path / "nothing")}))

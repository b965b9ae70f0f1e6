"""Joint training: outputs, exact resume, ablation switches, collapse report, bad checkpoints, configuration."""

from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from pysynth.errors import PysynthError
from pysynth.gan.weights import importance_weights
from pysynth.models.io import load_model
from pysynth.train.config import TrainConfig
from pysynth.train.joint import JointConfig, dump_joint_config, load_gan, train_joint
from pysynth.train.targets import two_head_loss

TINY = {
    "model": {"width": 4, "depth": 2, "max_width": 16},
    "synth": {"size": 80},
    "augment": {"scale": [0.9, 1.1]},
    "crop": 64,
    "batch": 2,
    "steps": 5,
    "warmup": 1,
    "val_patches": 3,
    "checkpoint_every": 1,
    "snapshot_every": 0,
    "threads": 1,
}
TINY_GAN = {
    "gan": {
        "style_dim": 8,
        "style_channels": 4,
        "refiner_channels": 4,
        "refiner_blocks": 1,
        "disc_channels": 4,
        "disc_max_channels": 8,
        "disc_layers": 3,
    },
    "seg_warmup": 1,
    "d_warmup": 1,
    "g_every": 1,
    "d_every": 2,
    "history": 4,
    "lr_g": 1e-2,
    "lr_d": 1e-3,
    "preview": 2,
}


def _config(**changes: object) -> TrainConfig:
    return TrainConfig.from_dict({**TINY, **changes})


def _joint(**changes: object) -> JointConfig:
    return JointConfig.from_dict({**TINY_GAN, **changes})


@pytest.fixture(scope="module")
def real_png(tmp_path_factory: pytest.TempPathFactory, tissue_rgb: np.ndarray) -> Path:
    path = tmp_path_factory.mktemp("real") / "tissue.png"
    cv2.imwrite(str(path), cv2.cvtColor(tissue_rgb, cv2.COLOR_RGB2BGR))
    return path


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory, real_png: Path) -> Path:
    from pysynth.synth.config import SynthConfig
    from pysynth.synth.generate import synthesize_dataset

    folder = tmp_path_factory.mktemp("ds") / "ds"
    synthesize_dataset([real_png], folder, 8, SynthConfig(size=80), input_mpp=0.25, shard_size=4)
    return folder


def _state(path: Path) -> dict[str, torch.Tensor]:
    state = torch.load(path, weights_only=True)
    return state.get("state_dict", state)


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _rows(folder: Path) -> list[dict[str, float]]:
    with (folder / "losses.csv").open(newline="") as handle:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(handle)]


def test_a_joint_run_writes_all_three_networks_and_the_pictures(tmp_path: Path, real_png: Path) -> None:
    folder = tmp_path / "m"
    summary = train_joint(_config(), _joint(), folder, real=[real_png], input_mpp=0.25)
    for name in (
        *("config.yaml", "joint.yaml", "checkpoint.pt", "losses.csv", "loss_curve.png", "validation.json"),
        *("model.pt", "model.json", "refiner.pt", "discriminator.pt", "refined_grid.png", "weight_histogram.png"),
    ):
        assert (folder / name).is_file(), name
    # Schedule: step 0 segmenter only, step 1 D warm-up, steps 2-4 G every step and D at steps 2 and 4.
    assert (summary["steps"], summary["refiner_steps"], summary["discriminator_steps"]) == (5, 3, 3)
    model, info = load_model(folder)
    assert info.unet.width == 4
    assert info.extra["joint"]["gan"]["refiner_channels"] == 4
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 2, 32, 32)
    refiner = load_gan(folder / "refiner.pt")
    assert refiner.delta.weight.abs().sum() > 0  # G moved off the identity
    disc = load_gan(folder / "discriminator.pt")
    assert disc.output_shape((80, 80)) == (8, 8)
    with pytest.raises(PysynthError, match="not a refiner or discriminator"):
        load_gan(folder / "model.pt")
    (row,) = _rows(folder)
    assert row["step"] == 5
    for key in ("loss", "d_loss", "g_loss", "g_real", "w_mean", "w_min", "w_max", "p_real"):
        assert math.isfinite(row[key]), key
    assert 0.2 <= row["w_min"] <= row["w_mean"] <= row["w_max"] <= 2.0
    assert row["g_hard"] < 0  # -L_task
    assert JointConfig.from_dict(__import__("yaml").safe_load((folder / "joint.yaml").read_text())) == _joint()
    grid = cv2.imread(str(folder / "refined_grid.png"))
    assert grid.shape[1] > grid.shape[0] > 100  # 2 triplets side by side
    assert cv2.imread(str(folder / "weight_histogram.png")).std() > 0


def test_interrupted_joint_run_resumes_exactly(tmp_path: Path, dataset: Path) -> None:
    # The segmenter's loss (default Dice) is the fused importance-weighted op: its PyTorch path on the CPU.
    config, joint = _config(), _joint()
    train_joint(config, joint, tmp_path / "straight", synthetic=dataset)

    def stop_at_four(step: int, _parts: dict) -> None:
        if step == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_joint(config, joint, tmp_path / "resumed", synthetic=dataset, progress=stop_at_four)
    state = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)
    assert state["step"] == 3  # step 4 was done but not saved: it is redone
    assert state["history"]["size"] == 4  # the image history travels with the checkpoint
    assert not (tmp_path / "resumed" / "model.pt").exists()
    train_joint(config, joint, tmp_path / "resumed", synthetic=dataset)
    for name in ("model.pt", "refiner.pt", "discriminator.pt"):
        assert _same(_state(tmp_path / "straight" / name), _state(tmp_path / "resumed" / name)), name
    a, b = _rows(tmp_path / "straight"), _rows(tmp_path / "resumed")
    for row in (*a, *b):
        row.pop("wall_s")
    assert a == b
    assert 0.2 <= a[0]["w_min"] < a[0]["w_max"] <= 2.0


def test_without_refiner_and_weights_it_is_plain_training(tmp_path: Path, dataset: Path) -> None:
    from pysynth.train.loop import train

    joint = _joint(refiner=False, importance=False)
    assert not joint.uses_discriminator
    train_joint(_config(), joint, tmp_path / "joint", synthetic=dataset)
    train(_config(), tmp_path / "plain", synthetic=dataset)
    # Same initial patches, augmentations, weights 1 and optimiser: the segmenter ends bit for bit the same.
    assert _same(_state(tmp_path / "joint" / "model.pt"), _state(tmp_path / "plain" / "model.pt"))
    for name in ("refiner.pt", "discriminator.pt", "refined_grid.png", "weight_histogram.png"):
        assert not (tmp_path / "joint" / name).exists(), name
    (row,) = _rows(tmp_path / "joint")
    assert row["w_min"] == row["w_max"] == 1.0
    assert math.isnan(row["d_loss"])
    assert math.isnan(row["g_loss"])


def _direct_per_sample_loss(logits: torch.Tensor, det: torch.Tensor, seg: torch.Tensor, pw: torch.Tensor):
    """Each sample's pixel-weighted BCE of both heads, written out: Σ pw·(BCE_det + BCE_seg) / Σ pw."""

    def bce(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return -(t * torch.log(torch.sigmoid(x)) + (1 - t) * torch.log(1 - torch.sigmoid(x)))

    return (pw * (bce(logits[:, 0], det) + bce(logits[:, 1], seg))).sum(dim=(1, 2)) / pw.sum(dim=(1, 2))


@pytest.mark.parametrize("dice_weight", [0.0, 0.5])
def test_each_samples_loss_scales_with_its_importance_weight(dice_weight: float) -> None:
    # The segmenter's loss in joint training is the batch mean of w_n · L_n, from the fused op (on the CPU its
    # PyTorch path) given D's map, whose weights are w = D/(1 - D) at c = 1, with or without Dice. A weight must
    # scale its own sample's loss and gradient, exactly.
    from pysynth.kernels.weighted_loss import weighted_two_head_loss

    g = torch.Generator().manual_seed(0)
    n, h, w = 3, 12, 10
    logits = (2 * torch.randn(n, 2, h, w, generator=g, dtype=torch.float64)).requires_grad_()
    det = torch.rand(n, h, w, generator=g, dtype=torch.float64)
    seg = (torch.rand(n, h, w, generator=g, dtype=torch.float64) > 0.5).double()
    pw = 0.1 + torch.rand(n, h, w, generator=g, dtype=torch.float64)

    def loss_and_grad(weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        d_map = (weights / (1 + weights))[:, None, None].expand(n, 4, 4)  # D's map, the same in every cell
        per_sample, used = weighted_two_head_loss(
            logits, det, seg, pw, d_map, clip_lo=0.1, clip_hi=4.0, dice_weight=dice_weight
        )
        torch.testing.assert_close(used, weights, rtol=1e-9, atol=0)
        (grad,) = torch.autograd.grad(per_sample.mean(), logits)
        return per_sample.mean().detach(), grad

    # Each sample's own loss: written out for the BCE; with Dice, that of the sample alone in an unweighted batch of
    # the unfused two_head_loss.
    if dice_weight == 0:
        alone = _direct_per_sample_loss(logits.detach(), det, seg, pw)
    else:
        parts = []
        for k in range(n):
            one = slice(k, k + 1)
            parts.append(two_head_loss(logits[one], det[one], seg[one], pw[one], dice_weight=dice_weight)[0])
        alone = torch.stack(parts).detach()
    ones = torch.ones(n, dtype=torch.float64)
    base_loss, base_grad = loss_and_grad(ones)
    torch.testing.assert_close(base_loss, alone.mean(), rtol=1e-12, atol=0)
    for weights in ([1.0, 3.0, 1.0], [0.5, 2.0, 1.25]):
        wt = torch.tensor(weights, dtype=torch.float64)
        loss, grad = loss_and_grad(wt)
        torch.testing.assert_close(loss, (wt * alone).mean(), rtol=1e-12, atol=0)
        # Sample k's gradient (it reaches only its own logits) is w_k times its gradient at weight 1.
        for k in range(n):
            torch.testing.assert_close(grad[k], wt[k] * base_grad[k], rtol=1e-12, atol=1e-15)


def test_weights_without_refiner_come_from_d_on_initial_patches(
    tmp_path: Path, dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pysynth.train.joint as joint_module

    # Record the weights D gives and the sample weights the segmenter's loss is given: weight 1 in two_head_loss
    # before D is trained, then the fused op's importance weights from D's map.
    judged: list[torch.Tensor] = []
    used: list[torch.Tensor] = []
    fused = joint_module.weighted_two_head_loss

    def recording_weights(*args, **kwargs):
        out = importance_weights(*args, **kwargs)
        judged.append(out)
        return out

    def recording_loss(logits, detection, segmentation, pixel_weights, sample_weights=None, **kwargs):
        if sample_weights is not None and logits.requires_grad:
            used.append(sample_weights.detach().clone())
        return two_head_loss(logits, detection, segmentation, pixel_weights, sample_weights, **kwargs)

    def recording_fused(*args, **kwargs):
        per_sample, weights = fused(*args, **kwargs)
        used.append(weights.clone())
        return per_sample, weights

    monkeypatch.setattr(joint_module, "importance_weights", recording_weights)
    monkeypatch.setattr(joint_module, "two_head_loss", recording_loss)
    monkeypatch.setattr(joint_module, "weighted_two_head_loss", recording_fused)
    joint = _joint(refiner=False)
    summary = train_joint(_config(), joint, tmp_path / "m", synthetic=dataset)
    assert not (tmp_path / "m" / "refiner.pt").exists()
    assert (tmp_path / "m" / "discriminator.pt").is_file()
    assert (tmp_path / "m" / "weight_histogram.png").is_file()
    assert summary["refiner_steps"] == 0
    assert summary["discriminator_steps"] == 3
    (row,) = _rows(tmp_path / "m")
    assert math.isfinite(row["d_loss"])
    assert math.isnan(row["g_loss"])
    # Before D is trained each sample weighs 1; from then on the segmenter's loss weighs each sample by D's weight
    # of that very batch (the later D calls are the held-out patches of weight_histogram.png).
    assert joint.gan_start == 2
    assert len(used) == 5
    assert all(torch.equal(u, torch.ones_like(u)) for u in used[:2])
    for u, d in zip(used[2:], judged[:3], strict=True):
        torch.testing.assert_close(u, d.to(u.dtype), rtol=0, atol=0)
    assert not all(torch.equal(d, torch.ones_like(d)) for d in judged[:3])  # D's weights, not ones
    logged = torch.cat(used)
    assert (row["w_min"], row["w_max"]) == (float(logged.min()), float(logged.max()))


def test_gan_with_the_default_loss_runs_the_fused_op(
    run_cli, tmp_path: Path, dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `train --gan` with the default loss (dice_weight 0.5, as in every shipped configuration) computes the
    # segmenter's loss on every importance-weighted step with the fused op pysynth::weighted_two_head_loss (Triton on
    # CUDA), not with the unfused two_head_loss; and the fused loss is the unfused one given the logged weights.
    import yaml

    import pysynth.train.joint as joint_module

    assert "dice_weight" not in TINY
    assert TrainConfig().dice_weight == 0.5
    fused = joint_module.weighted_two_head_loss
    calls: list[dict] = []
    unfused: list[torch.Tensor] = []

    def recording_fused(logits, detection, segmentation, pixel_weights, d_map, **kwargs):
        per_sample, weights = fused(logits, detection, segmentation, pixel_weights, d_map, **kwargs)
        with torch.no_grad():
            expected, _ = two_head_loss(
                logits, detection, segmentation, pixel_weights, weights, dice_weight=kwargs["dice_weight"]
            )
        logged = importance_weights(d_map, kwargs["c"], (kwargs["clip_lo"], kwargs["clip_hi"]))
        calls.append(
            {**kwargs, "loss": per_sample.mean().detach(), "expected": expected, "w": weights, "logged": logged}
        )
        assert per_sample.requires_grad
        return per_sample, weights

    def recording_loss(logits, detection, segmentation, pixel_weights, sample_weights=None, **kwargs):
        if sample_weights is not None and torch.is_grad_enabled():
            unfused.append(sample_weights.detach().clone())
        return two_head_loss(logits, detection, segmentation, pixel_weights, sample_weights, **kwargs)

    monkeypatch.setattr(joint_module, "weighted_two_head_loss", recording_fused)
    monkeypatch.setattr(joint_module, "two_head_loss", recording_loss)
    (tmp_path / "gan.yaml").write_text(yaml.safe_dump({**TINY, "joint": TINY_GAN}))
    folder = tmp_path / "m"
    result = run_cli("train", "--synthetic", dataset, "--out", folder, "--config", tmp_path / "gan.yaml", "--gan")
    assert result.code == 0, result.err
    assert yaml.safe_load((folder / "config.yaml").read_text())["dice_weight"] == 0.5
    # Steps 0 and 1 (segmenter and D warm-ups) weigh every sample 1 in two_head_loss; steps 2-4 weigh by D's map.
    assert len(unfused) == 2
    assert all(torch.equal(u, torch.ones_like(u)) for u in unfused)
    assert len(calls) == 3
    for call in calls:
        assert (call["dice_weight"], call["c"], call["clip_lo"], call["clip_hi"]) == (0.5, 1.0, 0.2, 2.0)
        torch.testing.assert_close(call["loss"], call["expected"], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(call["w"], call["logged"], rtol=0, atol=0)  # trained with = logged
    (row,) = _rows(folder)
    weights = torch.cat([call["w"] for call in calls] + unfused)
    assert (row["w_min"], row["w_max"]) == (float(weights.min()), float(weights.max()))


@pytest.mark.needs_cuda
def test_joint_training_on_cuda_runs_the_triton_kernels(
    tmp_path: Path, dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("triton")
    from pysynth.kernels import weighted_loss

    launched: list[str] = []
    forward, backward = weighted_loss._forward_triton, weighted_loss._backward_triton
    monkeypatch.setattr(weighted_loss, "_forward_triton", lambda *a: launched.append("fwd") or forward(*a))
    monkeypatch.setattr(weighted_loss, "_backward_triton", lambda *a: launched.append("bwd") or backward(*a))
    train_joint(_config(), _joint(), tmp_path / "m", synthetic=dataset, device="cuda")
    assert launched == ["fwd", "bwd"] * 3  # the three importance-weighted steps, default dice_weight 0.5


def test_no_reference_no_importance_no_hard(tmp_path: Path, dataset: Path) -> None:
    joint = _joint(reference=False, importance=False, hard=False)
    assert joint.gan.use_reference is False
    assert not joint.uses_hard
    train_joint(_config(), joint, tmp_path / "m", synthetic=dataset)
    refiner = load_gan(tmp_path / "m" / "refiner.pt")
    assert refiner.config.use_reference is False
    assert refiner.encoder is None
    assert load_gan(tmp_path / "m" / "discriminator.pt").encoder is None
    (row,) = _rows(tmp_path / "m")
    assert row["w_min"] == row["w_max"] == 1.0  # no importance: every weight is 1 ...
    assert row["p_real"] > 0  # ... while D is trained and judges the patches
    assert row["g_hard"] == 0.0
    assert math.isfinite(row["g_real"])


def test_collapsed_discriminator_is_reported_once(
    tmp_path: Path, dataset: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pysynth.gan.models import Discriminator

    # A D that finds every patch fake (logits shifted far below 0) puts every weight on the lower clip bound.
    forward = Discriminator.forward
    monkeypatch.setattr(Discriminator, "forward", lambda self, patch, ref=None: forward(self, patch, ref) - 30.0)
    with caplog.at_level(logging.WARNING, logger="pysynth"):
        train_joint(_config(steps=12), _joint(), tmp_path / "m", synthetic=dataset)
    warnings = [r.getMessage() for r in caplog.records if "collapsed" in r.getMessage()]
    assert len(warnings) == 1
    assert "low clip bound" in warnings[0]
    assert "fake" in warnings[0]
    rows = _rows(tmp_path / "m")
    assert [r["collapsed"] for r in rows] == [1.0, 1.0]
    summary = json.loads((tmp_path / "m" / "model.json").read_text())
    assert summary["collapse_warned"] is True


def test_bad_checkpoints_give_clear_errors(tmp_path: Path, dataset: Path) -> None:
    from pysynth.train.loop import train

    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "checkpoint.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(PysynthError, match=r"corrupt or unreadable checkpoint.*--overwrite"):
        train_joint(_config(), _joint(), folder, synthetic=dataset)

    plain = tmp_path / "plain"
    train(_config(steps=1), plain, synthetic=dataset)
    with pytest.raises(PysynthError, match="checkpoint of pysynth-segmenter-checkpoint, not pysynth-joint"):
        train_joint(_config(steps=1), _joint(), plain, synthetic=dataset)

    joint_dir = tmp_path / "joint"
    train_joint(_config(steps=2), _joint(), joint_dir, synthetic=dataset)
    state = torch.load(joint_dir / "checkpoint.pt", weights_only=True)
    state["refiner"]["delta.weight"] = torch.zeros(1, 1, 1, 1)
    torch.save(state, joint_dir / "checkpoint.pt")
    with pytest.raises(PysynthError, match="does not fit this configuration"):
        train_joint(_config(steps=2), _joint(), joint_dir, synthetic=dataset)


def test_other_settings_are_refused_unless_overwrite(tmp_path: Path, dataset: Path) -> None:
    folder = tmp_path / "m"
    train_joint(_config(steps=2), _joint(), folder, synthetic=dataset)
    other = _joint(refiner=False)
    with pytest.raises(PysynthError, match="refiner"):
        train_joint(_config(steps=2), other, folder, synthetic=dataset)
    train_joint(_config(steps=2), other, folder, synthetic=dataset, overwrite=True)
    assert not (folder / "refiner.pt").exists()  # the old run's refiner is gone
    assert "refiner: false" in (folder / "joint.yaml").read_text()


def test_patches_too_small_for_the_discriminator(tmp_path: Path, dataset: Path) -> None:
    joint = _joint(gan={**TINY_GAN["gan"], "disc_layers": 6})
    with pytest.raises(PysynthError, match="too small for the discriminator"):
        train_joint(_config(steps=1), joint, tmp_path / "m", synthetic=dataset)


def test_joint_config_round_trip_and_validation() -> None:
    joint = JointConfig.from_dict({"reference": False, "weight_clip": [0.1, math.inf], "gan": {"disc_layers": 4}})
    assert joint.gan.use_reference is False
    assert joint.weight_clip == (0.1, math.inf)
    import yaml

    assert JointConfig.from_dict(yaml.safe_load(dump_joint_config(joint))) == joint
    assert JointConfig.from_dict(joint.to_dict()) == joint
    default = JointConfig()
    assert default.gan_start == default.seg_warmup + default.d_warmup
    steps = range(1500)
    assert sum(map(default.g_step_at, steps)) == 400
    assert sum(map(default.d_step_at, steps)) == 300
    with pytest.raises(ValueError, match="unknown joint"):
        JointConfig.from_dict({"refiners": True})
    with pytest.raises(ValueError, match="unknown gan"):
        JointConfig.from_dict({"gan": {"blocks": 3}})
    with pytest.raises(ValueError, match="use_reference"):
        JointConfig.from_dict({"gan": {"use_reference": False}})
    for bad in ({"weight_clip": [2.0, 1.0]}, {"c": 0.0}, {"g_every": 0}, {"betas": [0.5, 1.0]}, {"refiner": 1}):
        with pytest.raises(ValueError, match="JointConfig"):
            JointConfig.from_dict(bad)


def test_histogram_plot() -> None:
    from pysynth.train.pictures import histogram_plot

    rng = np.random.default_rng(0)
    picture = histogram_plot(
        {"a": rng.uniform(0.2, 2.0, 50), "b": np.array([0.2, 0.2, np.nan]), "empty": np.zeros(0)},
        bins=10,
        value_range=(0.2, 2.0),
        size=(200, 300),
    )
    assert picture.shape == (200, 300, 3)
    assert picture.dtype == np.uint8
    assert (picture != 255).any(axis=2).mean() > 0.02
    assert histogram_plot({}).shape == (420, 720, 3)
    with pytest.raises(ValueError, match="bins"):
        histogram_plot({"a": np.ones(3)}, bins=0)

"""The shared training run: logging window, counters and loop state through a checkpoint, snapshots, misfits."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import pytest
import torch

from pysynth.errors import PysynthError
from pysynth.train.config import TrainConfig
from pysynth.train.run import LOG_EVERY, StepResult, TrainingRun

STEPS = 2 * LOG_EVERY + 3  # rows at 10, 20 and 23


def _run(folder: Path, stop_at: int = 0) -> tuple[TrainingRun, torch.nn.Linear]:
    """A toy run: a linear map fitted to batches that depend on the step only, with a counter of odd steps."""
    config = TrainConfig.from_dict({"steps": STEPS, "checkpoint_every": 1, "snapshot_every": 5, "threads": 1})

    def make_row(run: TrainingRun, lr: float) -> dict[str, float]:
        return {"step": run.step, "loss": sum(r["loss"] for r in run.window) / len(run.window), "lr": lr}

    def progress(step: int, _shown: dict[str, float]) -> None:
        if step == stop_at:
            raise KeyboardInterrupt

    run = TrainingRun(
        folder,
        config,
        checkpoint_format="toy",
        checkpoint_version=1,
        columns=("step", "loss", "lr"),
        make_row=make_row,
        progress=progress,
        counters={"odd": 0},
    )
    run.claim({"config.yaml": "toy: 1\n"}, overwrite=False)
    net = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)

    def restore(state: dict[str, Any]) -> None:
        net.load_state_dict(state["net"])
        opt.load_state_dict(state["opt"])

    run.resume(lambda: {"net": net.state_dict(), "opt": opt.state_dict()}, restore)

    def batch(t: int) -> torch.Tensor:
        return torch.randn(4, 3, generator=torch.Generator().manual_seed(t))

    def step(t: int, x: torch.Tensor) -> StepResult:
        loss = (net(x) - x.sum(dim=1, keepdim=True)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        run.counters["odd"] += t % 2
        return StepResult({"loss": float(loss.detach())}, 0.1, {"loss": float(loss.detach())})

    run.run_steps(batch, step, snapshot=net)
    return run, net


def _rows(folder: Path) -> list[dict[str, str]]:
    with (folder / "losses.csv").open() as handle:
        return list(csv.DictReader(handle))


def test_a_resumed_run_logs_the_rows_and_counts_of_an_uninterrupted_one(tmp_path: Path) -> None:
    straight, net = _run(tmp_path / "straight")
    # Stopped at step 13 (not saved, redone): the checkpoint of step 12 holds the 2 steps since the row of step 10.
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "resumed", stop_at=LOG_EVERY + 3)
    state = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)
    assert (state["step"], len(state["rows"]), len(state["window"])) == (LOG_EVERY + 2, 1, 2)
    resumed, again = _run(tmp_path / "resumed")
    assert (resumed.step, resumed.counters) == (straight.step, straight.counters) == (STEPS, {"odd": STEPS // 2})
    assert resumed.rows == straight.rows
    assert [r["step"] for r in resumed.rows] == [LOG_EVERY, 2 * LOG_EVERY, STEPS]
    assert _rows(tmp_path / "resumed") == _rows(tmp_path / "straight")
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), again.state_dict().values(), strict=True))
    assert sorted(p.name for p in (tmp_path / "resumed" / "snapshots").iterdir()) == [
        f"step_{s:06d}.pt" for s in range(5, STEPS + 1, 5)
    ]
    summary = resumed.summary(["src"], {"odd_steps": resumed.counters["odd"]}, validation={})
    assert list(summary) == ["steps", "odd_steps", "train_wall_s", "sources", "train", "validation"]


def test_a_checkpoint_that_does_not_fit_is_one_clear_error(tmp_path: Path) -> None:
    _run(tmp_path / "m")
    state = torch.load(tmp_path / "m" / "checkpoint.pt", weights_only=True)
    del state["odd"]
    torch.save(state, tmp_path / "m" / "checkpoint.pt")
    with pytest.raises(PysynthError, match=r"checkpoint.pt: does not fit this model \('odd'\); use --overwrite"):
        _run(tmp_path / "m")
    torch.save({"format": "other", "version": 1}, tmp_path / "m" / "checkpoint.pt")
    with pytest.raises(PysynthError, match="checkpoint of other, not toy"):
        _run(tmp_path / "m")

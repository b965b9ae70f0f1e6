"""One slide spread over a Dask cluster by region: the local run's results byte for byte, also when a worker is
killed in the middle of the run (Dask runs its tasks again; each region is saved once)."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

distributed = pytest.importorskip("distributed")


@pytest.fixture(scope="module")
def slide_png(tmp_path_factory, sample_slide) -> Path:
    from pysynth.io import open_slide

    with open_slide(sample_slide) as slide:
        level0 = slide.read_level(0, 600, 1300, 640, 520)  # 20x: 1282 x 1042 px at the model's 0.25 µm/px
    path = tmp_path_factory.mktemp("slide") / "slide.png"
    cv2.imwrite(str(path), cv2.cvtColor(np.ascontiguousarray(level0), cv2.COLOR_RGB2BGR))
    return path


def _results(folder: Path) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in ("nuclei.geojson", "nuclei.parquet")}


def test_regions_on_a_cluster_with_a_worker_killed_give_the_local_results(tmp_path: Path, slide_png: Path) -> None:
    from pysynth.infer import PARTS, InferConfig, run_slide

    config = InferConfig(core=256)  # 5 x 5 regions: many tasks, so some are running when a worker dies
    common = {"model_dir": None, "input_mpp": 0.499, "device": "cpu", "config": config, "overwrite": False}
    local = run_slide(str(slide_png), str(tmp_path / "local"), **common)
    assert local["status"] == "done"
    assert local["regions"] >= 20
    expected = _results(tmp_path / "local" / "slide")

    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None, silence_logs=40
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        parts = tmp_path / "dask" / "slide" / PARTS
        outcome: dict = {}

        def go() -> None:
            outcome["record"] = run_slide(str(slide_png), str(tmp_path / "dask"), client=client, **common)

        runner = threading.Thread(target=go)
        runner.start()
        deadline = time.monotonic() + 240
        while not list(parts.glob("0*.json")) and runner.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        saved_before = len(list(parts.glob("0*.json")))
        pids = client.run(os.getpid)  # {worker address: pid}
        victim = sorted(pids.values())[0]
        os.kill(victim, signal.SIGKILL)  # mid-run: one region saved, others running or queued
        runner.join(timeout=300)
        assert not runner.is_alive()
    record = outcome["record"]
    assert record["status"] == "done", record
    assert 0 < saved_before < local["regions"]  # the worker died with regions still to do
    assert record["nuclei"] == local["nuclei"]
    assert _results(tmp_path / "dask" / "slide") == expected  # neither a region missing nor one twice

"""One slide spread over a Dask cluster by region: the local run's results byte for byte, also when a worker is
killed in the middle of the run (Dask runs its tasks again; each region is saved once); a scheduler killed in the
middle fails the slide in one line and keeps its saved regions for the rerun."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
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


#: 5 x 5 regions: many tasks, so some are running when a worker or the scheduler dies.
CORE = 256
INPUT_MPP = 0.499


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, slide_png: Path) -> tuple[dict, dict[str, bytes]]:
    """The slide's record and results (GeoJSON and table bytes) from a local run, the reference of every test."""
    from pysynth.infer import InferConfig, run_slide

    out = tmp_path_factory.mktemp("local")
    config = InferConfig(core=CORE)
    record = run_slide(
        str(slide_png), str(out), model_dir=None, input_mpp=INPUT_MPP, device="cpu", config=config, overwrite=False
    )
    assert record["status"] == "done"
    assert record["regions"] >= 20
    return record, _results(out / "slide")


def test_regions_on_a_cluster_with_a_worker_killed_give_the_local_results(
    tmp_path: Path, slide_png: Path, local_run
) -> None:
    from pysynth.infer import PARTS, InferConfig, run_slide

    local, expected = local_run
    config = InferConfig(core=CORE)
    common = {"model_dir": None, "input_mpp": INPUT_MPP, "device": "cpu", "config": config, "overwrite": False}

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


def test_a_scheduler_lost_mid_run_fails_the_slide_in_one_line_and_the_rerun_resumes(
    tmp_path: Path, slide_png: Path, local_run
) -> None:
    from pysynth.infer import PARTS

    local, expected = local_run
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = f"tcp://127.0.0.1:{port}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "env": env}
    dask = [sys.executable, "-m"]
    scheduler = subprocess.Popen(
        [*dask, "distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
        **quiet,
    )
    worker = subprocess.Popen(
        [*dask, "distributed.cli.dask_worker", address, "--nworkers", "1", "--nthreads", "1", "--no-dashboard"],
        **quiet,
    )
    second = tmp_path / "second.png"  # not started once the scheduler is gone
    second.write_bytes(slide_png.read_bytes())
    infer = [sys.executable, "-c", "from pysynth.cli import main; main()", "infer", str(slide_png), str(second)]
    infer += ["--input-mpp", str(INPUT_MPP), "--core", str(CORE), "--out", str(tmp_path / "out")]
    try:
        run = subprocess.Popen(
            [*infer, "--scheduler", address], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        parts = tmp_path / "out" / "slide" / PARTS
        deadline = time.monotonic() + 240
        while not list(parts.glob("0*.json")) and run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        scheduler.kill()  # mid-run: a region saved, the others running or queued
        stdout, stderr = run.communicate(timeout=240)
    finally:
        for proc in (scheduler, worker):
            proc.kill()
            proc.wait()
    assert run.returncode == 1, stdout + stderr
    assert "Traceback" not in stderr
    assert "Traceback" not in stdout
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2, stderr
    assert "lost the Dask scheduler" in errors[0]
    assert "second.png: not started, the Dask scheduler" in errors[1]
    saved = len(list(parts.glob("0*.json")))
    assert 0 < saved < local["regions"], "the scheduler should die with regions still to do"
    assert not (tmp_path / "out" / "slide" / "nuclei.geojson").exists()

    again = subprocess.run(infer, capture_output=True, text=True, env=env)  # no scheduler now: runs here
    assert again.returncode == 0, again.stderr
    assert _results(tmp_path / "out" / "slide") == expected  # neither a region missing nor one twice
    second_geojson = (tmp_path / "out" / "second" / "nuclei.geojson").read_bytes()
    assert second_geojson == expected["nuclei.geojson"]  # (its table names another source)
    summary = (tmp_path / "out" / "slide" / "summary.json").read_text()
    assert f'"resumed_regions": {saved}' in summary

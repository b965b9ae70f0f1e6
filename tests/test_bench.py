from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest


def test_bench_quick_synthesis_writes_json(run_cli, tmp_path):
    out = tmp_path / "out.json"
    result = run_cli("bench", "--quick", "--section", "synthesis", "--json", out)
    assert result.code == 0, result.err
    assert "synthesize_patch 200x200" in result.out
    assert "vs baseline" in result.out
    record = json.loads(out.read_text())
    machine = record["machine"]
    assert machine["cpu_count"] >= 1
    assert machine["python"]
    assert "numpy" in machine
    assert record["quick"] is True
    section = record["sections"]["synthesis"]
    assert section["available"]
    timings = {t["name"]: t for t in section["timings"]}
    for size in (200, 400):
        ours = timings[f"synthesize_patch {size}x{size}"]
        baseline = timings[ours["extra"]["baseline"]]
        assert "baseline" in baseline["name"]
        assert ours["rate"] > 0
        assert baseline["rate"] > 0
        assert ours["ratio_vs_baseline"] == pytest.approx(ours["rate"] / baseline["rate"])
    workers = [t for t in section["timings"] if t["name"].startswith("write_dataset")]
    assert [t["extra"]["workers"] for t in workers] == [1, 2]
    assert all(t["rate"] > 0 for t in workers)
    assert section["notes"]["scaling_speedup_2_workers"] > 0
    assert section["notes"]["cpu"]["logical_cpus"] >= 1
    assert "physical_cores" in section["notes"]["cpu"]


def test_bench_missing_section_is_reported(run_cli, monkeypatch):
    from pysynth.bench import suite

    monkeypatch.setattr(suite, "load_section", lambda name: None)
    result = run_cli("bench", "--quick", "--section", "store")
    assert result.code == 1
    assert "store section not available" in result.err
    assert suite.run_section("store", quick=True).notes == {"status": "store section not available"}


def test_suite_pairs_and_notes(monkeypatch):
    import types

    from pysynth.bench import suite
    from pysynth.bench.harness import Timing

    ours, library = Timing("a", 1.0, 0.9, 1.1, 3), Timing("a [library]", 3.0, 2.9, 3.1, 3)
    fake = types.SimpleNamespace(run=lambda quick: [(ours, library), {"note": "x"}])
    monkeypatch.setattr(suite, "load_section", lambda name: fake)
    result = suite.run_section("kernels", quick=True)
    assert result.ratio(ours) == pytest.approx(3.0)
    assert result.ratio(library) is None
    table = suite.format_section(result)
    assert "3.00x" in table
    assert "baseline" in table
    assert "note: x" in table


@pytest.fixture(scope="module")
def real_tile():
    from pysynth.bench.synthesis import real_tiles

    return real_tiles(n=1, side=400)[0]


@pytest.mark.parametrize("size", [200, 400])
def test_baseline_patch_is_plausible(real_tile, size):
    from pysynth.bench.baseline_synthesis import baseline_patch
    from pysynth.synth.store import item_rng

    nonempty = 0
    for i in range(6):
        image, labels = baseline_patch(real_tile, item_rng(0, i), size)
        assert image.shape == (size, size, 3)
        assert image.dtype == np.uint8
        assert labels.shape == (size, size)
        n = int(labels.max())
        assert set(np.unique(labels)) == set(range(n + 1))
        if n:
            nonempty += 1
            nuclei = labels > 0
            # Nuclei are darker than their surroundings.
            assert image[nuclei].mean() < image[~nuclei].mean()
    assert nonempty >= 3


def test_baseline_draw_nonempty_mask():
    from pysynth.bench.baseline_synthesis import _draw_polygons

    labels = _draw_polygons(np.random.default_rng(0), 200, 10)
    assert labels.max() >= 5
    assert (labels > 0).mean() > 0.02


def test_rgb2hed_matches_skimage():
    from skimage.color import rgb2hed as reference

    from pysynth.bench.baseline_synthesis import rgb2hed

    rgb = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    np.testing.assert_allclose(rgb2hed(rgb), reference(rgb), atol=1e-10)


def test_bench_quick_segment(run_cli, tmp_path):
    out = tmp_path / "seg.json"
    result = run_cli("bench", "--quick", "--section", "segment", "--json", out)
    assert result.code == 0, result.err
    section = json.loads(out.read_text())["sections"]["segment"]
    names = [t["name"] for t in section["timings"]]
    assert any(n.startswith("segment 512²") for n in names)
    assert any("NCHW" in n for n in names)
    assert section["notes"]["kflop_per_px"] > 10
    assert section["notes"]["segment_mpx_per_s"] > 0


def test_dev_scores_on_a_tiny_copy_of_both_dev_sets(tmp_path, shared_data):
    """The dev-score table: segment's predictions scored by evaluate's rules on a crop of each dev set."""
    import cv2

    from pysynth.bench.dev_scores import markdown, score_model
    from pysynth.detection import centroids, detection_scores, read_dots
    from pysynth.metrics import score
    from pysynth.models.io import load_model
    from pysynth.segment import segment_rgb

    mon, brca = tmp_path / "monuseg", tmp_path / "brca"
    for sub in ("monuseg/images", "monuseg/labels", "brca/images", "brca/labels"):
        (tmp_path / sub).mkdir(parents=True)
    label_path = sorted((shared_data / "monuseg-train" / "labels").glob("*.png"))[0]
    image = cv2.imread(str(shared_data / "monuseg-train" / "images" / label_path.name))[:256, :256]
    gt = cv2.imread(str(label_path), cv2.IMREAD_UNCHANGED)[:256, :256]
    cv2.imwrite(str(mon / "images" / label_path.name), image)
    cv2.imwrite(str(mon / "labels" / label_path.name), gt)
    name = (shared_data / "brca-m2c" / "brca_ds_test.txt").read_text().split()[0]
    cv2.imwrite(str(brca / "images" / name), cv2.imread(str(shared_data / "brca-m2c" / "images" / name)))
    dots = f"{name[:-4]}_gt_class_coords.txt"
    (brca / "labels" / dots).write_text((shared_data / "brca-m2c" / "labels" / dots).read_text())
    (brca / "brca_ds_test.txt").write_text(name + "\n")
    row = score_model("default", mon, brca)
    # the same numbers by hand, through segment's library call and evaluate's metrics
    model, info = load_model()
    rgb = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    expected = score(gt.astype(np.int32), segment_rgb(model, info, rgb, 0.25))
    assert row["aji"] == pytest.approx(expected.aji, abs=1e-6)
    assert row["dice_avg"] == pytest.approx(expected.dice_avg, abs=1e-6)
    b = cv2.cvtColor(cv2.imread(str(brca / "images" / name)), cv2.COLOR_BGR2RGB)
    yx, classes = read_dots(brca / "labels" / dots, b.shape[:2])
    det = detection_scores(centroids(segment_rgb(model, info, b, 0.5)), yx, classes, 6.0)
    assert row["brca_f1"] == pytest.approx(det.f1, abs=1e-9)
    assert 0 < row["brca_f1"] <= 1
    assert 0 < row["pixel_precision"] <= 1
    half = score_model("default", mon, brca, precision="bf16")  # the network in bf16 autocast, as segment runs it
    from pysynth.infer import inference_model
    from pysynth.models.io import default_model_dir

    folded, _ = inference_model(str(default_model_dir()))  # bf16 rounds folded BatchNorm differently
    expected = score(gt.astype(np.int32), segment_rgb(folded, info, rgb, 0.25, precision="bf16"))
    assert half["aji"] == pytest.approx(expected.aji, abs=1e-6)
    assert half["precision"] == "bf16"
    assert "(bf16)" in markdown([half])
    assert "| default | 1 |" in markdown([row])


def test_gpu_check_says_no_cuda_and_exits_0(tmp_path: Path) -> None:
    import subprocess

    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the check would run for minutes")
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "gpu.json"
    done = subprocess.run(["bash", str(root / "bench" / "gpu_check.sh"), str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "no CUDA device" in done.stdout
    report = json.loads(out.read_text())
    assert report["cuda"] is False
    assert report["environment"]["torch"] == torch.__version__


def test_gpu_check_steps_run_on_the_cpu_path(tmp_path: Path, monkeypatch) -> None:
    # The steps' own code (training, the generated slide, infer with its stage split) on the CPU, small: what the
    # GPU run does apart from the device, so a first run on a GPU machine fails only for CUDA reasons.
    from pysynth.bench import gpu_check

    tiny = {"model": {"width": 4, "depth": 2, "max_width": 8}, "synth": {"size": 80}, "crop": 64, "warmup": 1}
    for gan in (False, True):
        row = gpu_check._train(2, gan, tmp_path, device="cpu", batch=2, val_patches=4, **tiny)
        assert row["steps"] == 2
        assert row["s_per_step"] > 0
    path, slide = gpu_check._slide(tmp_path, 2.0, "cpu")
    assert slide["tissue_mpx"] >= 1.5
    row = gpu_check._infer(path, tmp_path / "out", "cpu", "fp32")
    assert row["nuclei"] > 100
    assert set(row["stages_s"]) >= {"read", "network", "post", "write"}
    assert row["mpx_per_s"] > 0

"""The stages of ``pysynth.infer``, each alone: settings, the slide folder, the network, the region pipeline, the
model cache, and the one QuPath feature builder that ``segment`` and ``infer`` share."""

from __future__ import annotations

import json
import os
import platform
import shutil
from pathlib import Path

import numpy as np
import pytest

from pysynth.infer import (
    PARTS,
    SETTINGS,
    SUMMARY,
    InferConfig,
    Network,
    Timings,
    claim_slide_dir,
    fit_colour,
    inference_model,
    plan_regions,
    read_window,
    run_regions,
    slide_settings,
)
from pysynth.infer.run import region_record
from pysynth.io import ArrayReader
from pysynth.ledger import SettingsMismatch
from pysynth.models.io import default_model_dir


def test_slide_settings_record_what_decides_the_result(model_info, tissue_crop):
    _, info = model_info
    reader = ArrayReader(tissue_crop, 0.25)
    settings, instances, threshold = slide_settings(reader, info, InferConfig(min_confidence=0.3), "abc")
    assert settings["model"] == "abc"
    assert settings["config"]["min_confidence"] == 0.3
    assert instances.min_confidence == 0.3  # the run's, not the model's
    assert settings["instances"]["min_confidence"] == 0.3
    assert info.has_classes
    assert threshold == info.lymphocyte_threshold
    assert settings["lymphocyte_threshold"] == threshold
    _, _, chosen = slide_settings(reader, info, InferConfig(lymphocyte_threshold=0.2), "abc")
    assert chosen == 0.2


def test_claim_slide_dir_keeps_refuses_and_redoes(tmp_path, caplog):
    slide_dir = tmp_path / "s"
    settings = {"model": "m", "config": {"core": 2048}}
    assert claim_slide_dir(slide_dir, settings, overwrite=False) is None
    assert json.loads((slide_dir / PARTS / SETTINGS).read_text()) == settings
    # An unfinished run's saved regions: kept for the same settings, redone (with a warning) for others.
    (slide_dir / PARTS / "000003.json").write_text("{}")
    assert claim_slide_dir(slide_dir, settings, overwrite=False) is None
    assert (slide_dir / PARTS / "000003.json").exists()
    other = {"model": "m", "config": {"core": 1024}}
    with caplog.at_level("WARNING", logger="pysynth"):
        assert claim_slide_dir(slide_dir, other, overwrite=False) is None
    assert not (slide_dir / PARTS / "000003.json").exists()
    assert any("redoing the 1 finished region" in r.getMessage() for r in caplog.records)
    # A finished slide: returned for its settings, refused for others unless overwritten.
    summary = {"nuclei": 7, "settings": other}
    (slide_dir / SUMMARY).write_text(json.dumps(summary))
    assert claim_slide_dir(slide_dir, other, overwrite=False) == summary
    with pytest.raises(SettingsMismatch, match=r"config\.core 1024 -> 2048"):
        claim_slide_dir(slide_dir, settings, overwrite=False)
    assert json.loads((slide_dir / SUMMARY).read_text()) == summary  # untouched by the refusal
    (slide_dir / SUMMARY).write_text("{not json")
    with pytest.raises(SettingsMismatch, match="unreadable"):
        claim_slide_dir(slide_dir, settings, overwrite=False)
    assert claim_slide_dir(slide_dir, settings, overwrite=True) is None
    assert not (slide_dir / SUMMARY).exists()


def test_network_stage_gives_the_maps_of_segment(model_info, tissue_crop):
    from pysynth.segment import predict_maps

    model, info = model_info
    net = Network(model, InferConfig(), classes=info.has_classes)
    maps = net(tissue_crop)
    reference = predict_maps(model, tissue_crop, tile=max(tissue_crop.shape[:2]), classes=True)
    assert len(maps) == 3 == len(reference)
    for a, b in zip(maps, reference, strict=True):
        assert a.shape == tissue_crop.shape[:2]
        np.testing.assert_allclose(a, b, atol=1e-6)  # the same pass (threads may sum in another order)
    tiled = Network(model, InferConfig(tile=256), classes=True)(tissue_crop)  # exact tiles: the same maps
    for a, b in zip(tiled, maps, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_region_pipeline_saves_every_region_and_stops_when_asked(tmp_path, model_info, tissue_crop):
    model, info = model_info
    reader = ArrayReader(tissue_crop, 0.25)
    config = InferConfig(core=192, margin=128)
    regions = plan_regions(reader, info.mpp, config, None)
    assert len(regions) == 6  # 2 rows × 3 columns of 192 px
    net = Network(model, config, classes=True)
    colour = fit_colour([], "none")

    def go(parts: Path, stop=None) -> tuple[bool, list[int], Timings]:
        parts.mkdir(parents=True)
        counts, timings = [], Timings()
        complete = run_regions(
            reader, regions, net, colour, parts, mpp=info.mpp, margin=config.margin, instances=info.instances,
            timings=timings, on_region=counts.append, stop=stop,
        )  # fmt: skip
        return complete, counts, timings

    complete, counts, timings = go(tmp_path / "all")
    assert complete
    assert len(counts) == 6
    assert sum(counts) > 20
    saved = sorted(p.name for p in (tmp_path / "all").glob("0*.json"))
    assert saved == [f"{r.index:06d}.json" for r in regions]
    for region, n in zip(regions, counts, strict=True):
        record = json.loads((tmp_path / "all" / f"{region.index:06d}.json").read_text())
        assert record["region"]["index"] == region.index
        assert len(record["nuclei"]) == n
        assert all("lymphocyte" in nuc for nuc in record["nuclei"])
    assert min(timings.network, timings.read, timings.post) > 0
    calls = []
    complete, counts, _ = go(tmp_path / "stopped", stop=lambda: calls.append(1) or len(calls) >= 2)
    assert not complete
    assert len(counts) == 2  # the region passed when stop came is saved too
    assert len(list((tmp_path / "stopped").glob("0*.json"))) == 2


@pytest.mark.skipif(platform.system() != "Linux", reason="per-thread nice values are Linux's")
def test_region_pipeline_helpers_yield_the_cpu_to_the_network(tmp_path, model_info, tissue_crop, monkeypatch):
    import pysynth.infer.run as run

    model, info = model_info
    reader = ArrayReader(tissue_crop, 0.25)
    config = InferConfig(core=192, margin=128)
    regions = plan_regions(reader, info.mpp, config, None)[:3]
    net = Network(model, config, classes=True)
    seen: dict[str, set[int]] = {"read": set(), "post": set(), "network": set()}

    def niceness() -> int:
        return os.getpriority(os.PRIO_PROCESS, 0)

    def read(*args, **kwargs):
        seen["read"].add(niceness())
        return read_window(*args, **kwargs)

    def record(*args, **kwargs):
        seen["post"].add(niceness())
        return region_record(*args, **kwargs)

    def network(window):
        seen["network"].add(niceness())
        return net(window)

    monkeypatch.setattr(run, "read_window", read)
    monkeypatch.setattr(run, "region_record", record)
    before = niceness()
    parts = tmp_path / "parts"
    parts.mkdir()
    assert run.run_regions(
        reader, regions, network, fit_colour([], "none"), parts, mpp=info.mpp, margin=config.margin,
        instances=info.instances, timings=Timings(),
    )  # fmt: skip
    assert seen["network"] == {before}  # the caller's thread (the network's) keeps its priority
    assert seen["read"] == seen["post"] == {max(run.HELPER_NICE, before)}
    assert niceness() == before
    assert len(list(parts.glob("0*.json"))) == 3


def test_inference_model_is_loaded_again_when_its_folder_changes(tmp_path):
    import torch

    folder = tmp_path / "m"
    shutil.copytree(default_model_dir(), folder)
    first, _ = inference_model(str(folder))
    assert inference_model(str(folder))[0] is first  # cached
    state = torch.load(folder / "model.pt", weights_only=True)
    key = next(k for k, v in state.items() if v.dtype.is_floating_point and v.ndim == 4)
    state[key] = state[key] * 0.5
    torch.save(state, folder / "model.pt")
    second, _ = inference_model(str(folder))
    assert second is not first
    changed = [
        not torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values(), strict=True)
    ]
    assert any(changed)  # the new weights, not the cached network


def test_segment_and_infer_features_share_the_qupath_schema(tmp_path, model_info, tissue_crop):
    from pysynth.infer import infer_slide
    from pysynth.segment import segment_image, write_outputs

    model, info = model_info
    found = segment_image(model, info, tissue_crop, 0.25, info.instances)
    (tmp_path / "seg").mkdir()
    write_outputs(tmp_path / "seg", "t", tissue_crop, found, mpp=0.25, lymphocyte_threshold=info.lymphocyte_threshold)
    seg = json.loads((tmp_path / "seg" / "t.geojson").read_text())["features"]
    infer_slide(ArrayReader(tissue_crop, 0.25), model, info, tmp_path / "inf", config=InferConfig(), model_id="x")
    inf = json.loads((tmp_path / "inf" / "nuclei.geojson").read_text())["features"]
    assert len(seg) == len(inf) > 20
    for a, b in ((seg[0], inf[0]), (seg[-1], inf[-1])):
        assert a["type"] == b["type"] == "Feature"
        assert a["properties"]["objectType"] == b["properties"]["objectType"] == "detection"
        ring_a, ring_b = a["geometry"]["coordinates"][0], b["geometry"]["coordinates"][0]
        assert ring_a[0] == ring_a[-1]
        assert ring_b[0] == ring_b[-1]
    names = {f["properties"]["classification"]["name"] for f in seg} | {
        f["properties"]["classification"]["name"] for f in inf
    }
    assert names <= {"Nucleus", "Lymphocyte"}
    colours = {
        (f["properties"]["classification"]["name"], tuple(f["properties"]["classification"]["color"])) for f in seg
    }
    assert colours == {
        (f["properties"]["classification"]["name"], tuple(f["properties"]["classification"]["color"])) for f in inf
    }
    shared = set(seg[0]["properties"]["measurements"]) & set(inf[0]["properties"]["measurements"])
    assert {"Confidence", "Detection peak", "Lymphocyte probability", "Area µm^2", "Circularity"} <= shared

"""The package as users install it: the stub of the compiled core, and the wheel's layout."""

from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_core_stub_matches_the_compiled_module() -> None:
    from pysynth import _core

    tree = ast.parse((ROOT / "pysynth" / "_core.pyi").read_text())
    stubbed = {node.name for node in tree.body if isinstance(node, ast.FunctionDef | ast.ClassDef)}
    compiled = {name for name in dir(_core) if not name.startswith("_")}
    assert stubbed == compiled


@pytest.mark.slow
def test_wheel_holds_the_whole_package(tmp_path: Path) -> None:
    """A wheel built from the tree maps cli/, kernels/ and bench/ into pysynth and carries the core and data."""
    pytest.importorskip("scikit_build_core")
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(ROOT)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    (wheel,) = tmp_path.glob("pysynth_histo-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for required in (
        "pysynth/__init__.py",
        "pysynth/py.typed",
        "pysynth/_core.pyi",
        "pysynth/cli/__init__.py",
        "pysynth/cli/sample.py",
        "pysynth/kernels/__init__.py",
        "pysynth/bench/harness.py",
        "pysynth/io/base.py",
        "pysynth/data/CMU-1-Small-Region.svs",
        "pysynth/data/README.md",
        "pysynth/models/default/model.pt",
        "pysynth/models/default/model.json",
        "pysynth/models/default/MODEL_CARD.md",
        "pysynth/models/plain/model.pt",
        "pysynth/models/plain/model.json",
        "pysynth/models/plain/MODEL_CARD.md",
        "pysynth/cli/segment.py",
        "pysynth/cli/train.py",
    ):
        assert required in names, required
    from pysynth.models.io import SHIPPED

    for name in SHIPPED:  # every model selectable by name ships with its files
        for file in ("model.pt", "model.json", "MODEL_CARD.md"):
            assert f"pysynth/models/{name}/{file}" in names, (name, file)
    assert any(n.startswith("pysynth/_core.") and n.endswith((".so", ".pyd")) for n in names)
    assert not any(n.startswith(("tests/", "cli/", "kernels/")) for n in names)
    metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
    text = zipfile.ZipFile(wheel).read(metadata).decode()
    assert "Name: pysynth-histo" in text
    assert "Requires-Dist: torch>=2.4" in text

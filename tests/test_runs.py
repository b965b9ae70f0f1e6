"""The generic run machinery lives in :mod:`pysynth.runs`, and what uses it imports it from there."""

from __future__ import annotations

import ast
import os
import signal
from pathlib import Path

import pytest

import pysynth

ROOT = Path(pysynth.__file__).resolve().parent.parent


def _imports(path: Path) -> list[tuple[str, str]]:
    """``(module, name)`` of every ``from module import name`` in a file, nested imports included."""
    tree = ast.parse(path.read_text())
    return [(n.module or "", a.name) for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names]


def test_runs_provides_the_generic_helpers() -> None:
    from pysynth import runs

    for name in ("StopAtStepEnd", "claim_run", "sources_record", "sources_files", "CHECKPOINT", "SOURCES_FILE"):
        assert hasattr(runs, name), name


def test_users_import_the_run_helpers_from_pysynth_runs() -> None:
    # infer (not a training command) and adaptation take StopAtStepEnd and claim_run from pysynth.runs, not from
    # the training loop; nothing in the package, the commands or the benches imports them from there.
    assert ("pysynth.runs", "StopAtStepEnd") in _imports(ROOT / "cli" / "infer.py")
    assert ("pysynth.runs", "claim_run") in _imports(ROOT / "pysynth" / "train" / "adapt.py")
    generic = {"StopAtStepEnd", "claim_run", "sources_record"}
    for folder in ("pysynth", "cli", "bench"):
        for path in (ROOT / folder).rglob("*.py"):
            wrong = [n for m, n in _imports(path) if m.startswith("pysynth.train") and n in generic]
            assert not wrong, f"{path.relative_to(ROOT)} imports {wrong} from pysynth.train"


def test_joint_training_uses_no_private_helper_of_the_plain_loop() -> None:
    private = [n for m, n in _imports(ROOT / "pysynth" / "train" / "joint.py") if m.startswith("pysynth.train.loop")]
    assert private, "joint.py imports nothing from the plain loop: this test checks nothing"
    assert not [n for n in private if n.startswith("_")]


def test_a_first_ctrl_c_asks_a_second_interrupts_and_the_handler_comes_back() -> None:
    from pysynth.runs import StopAtStepEnd

    before = signal.getsignal(signal.SIGINT)
    with StopAtStepEnd() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested  # the loop goes on to the end of its step
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before


def test_claim_run_refuses_other_settings_once_started(tmp_path: Path) -> None:
    from pysynth.errors import PysynthError
    from pysynth.runs import CHECKPOINT, claim_run

    claim_run(tmp_path, {"config.yaml": "lr: 1\n"}, overwrite=False)
    claim_run(tmp_path, {"config.yaml": "lr: 2\n"}, overwrite=False)  # no progress yet: a corrected start
    (tmp_path / CHECKPOINT).write_bytes(b"")
    with pytest.raises(PysynthError, match=r"other settings \(lr\)"):
        claim_run(tmp_path, {"config.yaml": "lr: 3\n"}, overwrite=False)
    claim_run(tmp_path, {"config.yaml": "lr: 3\n"}, overwrite=True)
    assert not (tmp_path / CHECKPOINT).exists()
    assert (tmp_path / "config.yaml").read_text() == "lr: 3\n"

"""collector.start_up: the cyclic collector held off while a command starts, its objects frozen after, and the
process as before once the command ends."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ccld_trt import collector


def test_start_up_holds_the_collector_then_freezes_what_it_made() -> None:
    assert gc.isenabled() and gc.get_freeze_count() == 0
    with collector.start_up() as started:
        assert not gc.isenabled()
        made = [[i] for i in range(20_000)]  # tracked containers, as an import makes
        started()
        assert gc.isenabled()
        assert gc.get_freeze_count() >= len(made)
        started()  # a second call changes nothing
        assert gc.get_freeze_count() >= len(made)
    assert gc.isenabled() and gc.get_freeze_count() == 0


def test_a_failed_start_up_leaves_the_collector_as_it_was() -> None:
    with pytest.raises(RuntimeError), collector.start_up():
        raise RuntimeError("no models")
    assert gc.isenabled() and gc.get_freeze_count() == 0


def test_a_collector_its_owner_turned_off_is_left_alone() -> None:
    gc.disable()
    try:
        with collector.start_up() as started:
            started()
            assert not gc.isenabled() and gc.get_freeze_count() == 0
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_a_collector_its_owner_froze_is_left_frozen() -> None:
    owned = [object()]  # a container the collector tracks, frozen by its owner
    gc.freeze()
    try:
        with collector.start_up() as started:
            assert gc.isenabled()
            started()
        # still in the permanent generation, which get_objects does not list (the freeze count is not compared:
        # another thread of the test process may free frozen objects meanwhile, as it did in one CI run)
        assert gc.isenabled() and gc.get_freeze_count() > 0
        assert not any(o is owned for o in gc.get_objects())
    finally:
        gc.unfreeze()
    assert any(o is owned for o in gc.get_objects())  # the check above can fail: unfrozen, it is listed


_PROBE = """
import gc, json, sys
import ccld_trt.stage_clock as stage_clock
collections = [0]
gc.callbacks.append(lambda phase, info: collections.__setitem__(0, collections[0] + (phase == "start")))
seen = {}
def mark(stage):
    seen[stage] = {"collections": collections[0], "torch": "torch" in sys.modules, "frozen": gc.get_freeze_count()}
stage_clock.mark = mark
from ccld_trt.cli import run
status = run(sys.argv[1:])
seen["after"] = {"enabled": gc.isenabled(), "frozen": gc.get_freeze_count()}
print("SEEN " + json.dumps(seen))
sys.exit(status)
"""


def test_sample_imports_with_the_collector_held(seed3_dir: Path, tmp_path: Path) -> None:
    """``sample``'s imports (torch's, the backend's: ~1 M objects kept until exit) run without a collection (each
    walked them all again: ~0.3 s of a 2 s start); they are frozen before the models load, and the process is as
    before once the command has run."""
    argv = ["sample", "a lighthouse", "--fast", "--backend", "torch", "--models", str(seed3_dir),
            "--output-dir", str(tmp_path / "out")]
    env = {**os.environ, "CCLD_TRT_BUILD": str(tmp_path / "build")}
    done = subprocess.run([sys.executable, "-c", _PROBE, *argv], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    seen = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("SEEN "))[5:])
    assert seen["imports"]["torch"]
    assert seen["imports"]["collections"] == seen["cli"]["collections"]
    assert seen["backend ready"]["frozen"] > 100_000
    assert seen["after"] == {"enabled": True, "frozen": 0}
    assert (tmp_path / "out" / "out_00000.png").is_file()

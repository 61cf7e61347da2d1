"""stopping.leave, the CLI's exit: it skips module teardown but keeps what an exit must do (handlers, streams,
threads)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import atexit, sys, tempfile, threading, time, weakref
from pathlib import Path
from ccld_trt.stopping import leave
atexit.register(lambda: print("exit handler ran", flush=True))
scratch = tempfile.TemporaryDirectory()  # removed by its finalizer, an exit handler
Path(sys.argv[1]).write_text(scratch.name)
sys.stdout.write("unflushed text")  # a pipe's buffer, not yet written
if sys.argv[2] == "thread":
    threading.Thread(target=lambda: (time.sleep(0.5), print("thread finished", flush=True))).start()
if sys.argv[2] == "executor":  # an idle worker, as OpenVINO's import leaves one: told to stop, not waited on forever
    from concurrent.futures import ThreadPoolExecutor
    ThreadPoolExecutor().submit(print, "task done", flush=True).result()
leave(int(sys.argv[3]))
"""


def run_child(tmp_path: Path, thread: str, status: int) -> tuple[subprocess.CompletedProcess[str], str]:
    name_file = tmp_path / "scratch-name"
    result = subprocess.run([sys.executable, "-c", CHILD, str(name_file), thread, str(status)],
                            capture_output=True, text=True, timeout=60)
    return result, name_file.read_text()


def test_leave_runs_the_exit_handlers_flushes_and_keeps_the_status(tmp_path: Path) -> None:
    result, scratch = run_child(tmp_path, "none", 3)
    assert result.returncode == 3
    assert "unflushed text" in result.stdout and "exit handler ran" in result.stdout
    assert not Path(scratch).exists()  # the temporary directory's finalizer ran
    assert result.stderr == ""


def test_leave_waits_for_a_running_thread_like_pythons_own_exit(tmp_path: Path) -> None:
    result, _ = run_child(tmp_path, "thread", 0)
    assert result.returncode == 0
    assert "thread finished" in result.stdout and "exit handler ran" in result.stdout


def test_leave_stops_an_idle_executor_worker_instead_of_waiting_forever(tmp_path: Path) -> None:
    result, _ = run_child(tmp_path, "executor", 5)
    assert result.returncode == 5
    assert "task done" in result.stdout and "exit handler ran" in result.stdout


MAIN_CHILD = r"""
import sys, weakref
from ccld_trt import api, cli
opened = api.Pipeline.open.__func__
def watched(cls, *args, **kwargs):
    pipe = opened(cls, *args, **kwargs)
    weakref.finalize(pipe, print, "pipeline torn down", flush=True).atexit = False  # only when collected
    return pipe
api.Pipeline.open = classmethod(watched)
sys.argv = ["ccld-trt", *sys.argv[1:]]
cli.main()
"""


def test_sample_leaves_its_pipeline_for_the_os_to_free(seed3_dir: Path, tmp_path: Path) -> None:
    """``ccld-trt sample`` exits without tearing its loaded pipeline down object by object (~0.2 s on OpenVINO);
    the image is written and the status kept."""
    env_build = {"CCLD_TRT_BUILD": str(tmp_path / "build")}
    result = subprocess.run([sys.executable, "-c", MAIN_CHILD, "sample", "a cat", "--models", str(seed3_dir),
                             "--steps", "2", "--output-dir", str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=300, env={**os.environ, **env_build})
    assert result.returncode == 0, result.stderr
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["out_00000.png"]
    assert "pipeline torn down" not in result.stdout

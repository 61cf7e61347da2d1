"""Stopping ``ccld-trt serve`` is bounded whatever runs (runtime/ccld_trt/serve.py, ModelLoader.stop): a running
job is cancelled at its next U-Net evaluation and new ones are refused; and a real server with a long job in flight
stops within STOP_S of SIGINT or SIGTERM, whatever signal dispositions it inherited (a background job of a
non-interactive shell starts with SIGINT and SIGQUIT ignored), with the CPU busy, several times in a row.
tests/test_serve.py's module teardown stops its server by SIGINT as this process's caller left it."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ccld_trt.export.errors import UserError
from ccld_trt.serve import ModelLoader, generate_for_page
from serve_process import STOP_S, start_long_job, start_server


def test_a_running_job_is_cancelled_at_its_next_evaluation(seed3_dir: Path, tmp_path: Path) -> None:
    from ccld_trt.export.models import ModelFiles
    from ccld_trt.runner import BackendOptions, ModelSource, open_session

    loader = ModelLoader(lambda: open_session(BackendOptions(), ModelSource(ModelFiles.resolve(seed3_dir))),
                         "torch on cpu")
    loader.start()
    deadline = time.monotonic() + 120
    while not loader.finished and time.monotonic() < deadline:
        time.sleep(0.1)
    evaluations: list[Any] = []
    stopped: list[bool] = []
    stopper = threading.Thread(target=lambda: stopped.append(loader.stop(timeout=60)))

    def progress(value: Any, **kw: Any) -> None:
        if kw.get("unit") == "U-Net evaluations":
            evaluations.append(value)
            if len(evaluations) == 2:  # Ctrl-C now, from another thread, as the server's main thread does
                stopper.start()
                time.sleep(0.2)  # it is waiting for this job

    start = time.monotonic()
    with pytest.raises(UserError, match=r"^the server is stopping: this job was cancelled$"):
        generate_for_page(loader, tmp_path, "a red house", None, 3.0, 1000, "ddim", 0, 1, 2.55, progress)
    assert evaluations == [(1, 1000), (2, 1000)]  # the third evaluation never reported: cancelled after the 2nd
    stopper.join(10)
    assert stopped == [True]  # stop() saw the job end
    assert time.monotonic() - start < 60
    with pytest.raises(UserError, match="stopping"):  # and refuses new jobs
        generate_for_page(loader, tmp_path, "a red house", None, 3.0, 2, "ddim", 0, 1, 2.55)


@pytest.fixture(scope="module")
def demo_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from ccld_trt.export.demo_weights import write_demo_weights

    models = tmp_path_factory.mktemp("serve-stop") / "models"
    write_demo_weights(models, "small", seed=0)
    return models


@contextlib.contextmanager
def busy_cpu(processes: int = 2) -> Iterator[None]:
    """``processes`` Python loops spinning beside the server (killed on leaving)."""
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(processes)]
    try:
        yield
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()


# the signal sent, and the signals the server inherits as ignored
STOPS = {"SIGINT, inherited ignored": (signal.SIGINT, (signal.SIGINT, signal.SIGQUIT)),
         "SIGTERM, inherited ignored": (signal.SIGTERM, (signal.SIGINT, signal.SIGQUIT, signal.SIGTERM)),
         "SIGTERM, inherited default": (signal.SIGTERM, ())}


@pytest.mark.parametrize("stop", STOPS)
@pytest.mark.parametrize("attempt", [1, 2])
def test_serve_stops_cleanly_on_a_signal_with_a_job_running(stop: str, attempt: int, demo_models: Path,
                                                            tmp_path: Path) -> None:
    signum, inherited = STOPS[stop]
    server = start_server(demo_models, tmp_path, ignore=inherited)
    start_long_job(server)
    assert server.work_dirs(), "the server has no work directory to remove"
    with busy_cpu(2):
        status, seconds = server.stop(signum)
    log = server.log()
    assert status == 0, f"the server did not stop cleanly on {stop} (status {status})\n{log}"
    assert seconds < STOP_S, f"stopping took {seconds:.1f} s"
    assert f"ccld-trt serve: {signal.Signals(signum).name} received: stopping" in log
    # the job cancelled at its next U-Net evaluation, or, on a CPU too busy to reach it in time, ended by the exit
    assert "ccld-trt serve: stopped (no job left running)" in log or "ends with the process" in log, log
    assert server.work_dirs() == [], f"the work directory was left behind\n{log}"

"""Stopping ``ccld-trt serve`` is bounded whatever runs (runtime/ccld_trt/serve.py, ModelLoader.stop): a running
job is cancelled at its next U-Net evaluation and new ones are refused. The Ctrl-C of a real server with a long
job in flight is checked by tests/test_serve.py's module teardown."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from ccld_trt.export.errors import UserError
from ccld_trt.serve import ModelLoader, generate_for_page


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

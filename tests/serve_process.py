"""A real ``ccld-trt serve`` in a subprocess, for the page tests (test_serve.py) and the stop tests
(test_serve_stop.py): start it on small demo weights, wait for it, give it a long job, stop it by a signal."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest
from gradio_client import Client

from ccld_trt.benchmarks.cold_start_servers import free_port
from launch import ignoring

SERVER_START_S = 120  # importing torch and gradio, then loading the models, on a busy 2-core CI machine
JOB_S = 120
# The target for a stop (SIGINT or SIGTERM) with a long job running: the server cancels the job at its next U-Net
# evaluation (a fraction of a second on the small demo weights), closes its HTTP server and work directory, exits.
STOP_S = 15



def wait_for(condition: Callable[[], bool], timeout: float, what: str, log: Callable[[], str] = lambda: "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}\n{log()}")
        time.sleep(0.25)


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log_path: Path
    temp_dir: Path  # the server's $TMPDIR, where its ccld-trt-serve-* work directory lives

    def log(self) -> str:
        return f"--- server log ---\n{self.log_path.read_text(errors='replace')}"

    def check_alive(self) -> None:
        """The process is running and still serves the page."""
        assert self.process.poll() is None, f"the server exited with {self.process.returncode}\n{self.log()}"
        assert answers(self.url), f"the server no longer answers\n{self.log()}"

    def work_dirs(self) -> list[Path]:
        return sorted(self.temp_dir.glob("ccld-trt-serve-*"))

    def stop(self, signum: int) -> tuple[int | None, float]:
        """Send ``signum``, wait up to STOP_S for the exit; (exit status or None if it had to be killed,
        seconds from the signal to the exit)."""
        self.process.send_signal(signum)
        start = time.monotonic()
        try:
            status: int | None = self.process.wait(STOP_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            status = None
        return status, time.monotonic() - start


def start_server(models: Path, root: Path, ignore: Iterable[int] | None = None) -> Server:
    """``python -m ccld_trt serve`` on ``models`` (its log, temp and Gradio cache folders under ``root``), up
    with its models loaded. ``ignore``: signals the server inherits as ignored, as from a background job of a
    non-interactive shell (SIGINT, SIGQUIT); None: whatever this process has."""
    port = free_port()
    log_path = root / "server.log"
    temp_dir = root / "tmp"
    temp_dir.mkdir()
    env = {**os.environ, "GRADIO_TEMP_DIR": str(root / "gradio-cache"), "PYTHONUNBUFFERED": "1",
           "TMPDIR": str(temp_dir)}
    command = [sys.executable, "-m", "ccld_trt", "serve", "--models", str(models), "--port", str(port)]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(ignoring(ignore, command) if ignore else command,
                                   stdout=log, stderr=subprocess.STDOUT, env=env)
    server = Server(f"http://127.0.0.1:{port}/", process, log_path, temp_dir)
    try:
        wait_for(lambda: process.poll() is not None or (answers(server.url) and "models ready" in server.log()),
                 SERVER_START_S, "the server to come up with its models loaded", server.log)
        assert process.poll() is None, f"the server exited with {process.returncode}\n{server.log()}"
    except BaseException:
        process.kill()
        process.wait()
        raise
    return server


def start_long_job(server: Server) -> None:
    """Submit a 1000-step job (minutes) and wait until it is sampling."""
    job = Client(server.url, verbose=False).submit("a lighthouse", None, 3.0, 1000, "ddim", 0, 1, 2.55,
                                                   api_name="/generate")
    wait_for(lambda: any(u.desc == "sampling" for u in job.status().progress_data or []), JOB_S,
             "the long job to start sampling", server.log)

"""``ccld-trt cluster`` stops within STOP_S of SIGTERM, and of SIGINT when it inherited SIGINT as ignored (a
background job of a non-interactive shell), with a request running: exit 0, and every process of its local Ray gone.

A real ``python -m ccld_trt cluster`` on small demo weights; Ray starts slowly on a busy 2-core machine, so one
run per signal.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from ccld_trt.benchmarks.cold_start_servers import free_port
from launch import ignoring

pytest.importorskip("ray")
psutil = pytest.importorskip("psutil")

START_S = 300  # Ray, Serve, the ingress and a replica loading its models, on a busy 2-core machine
STOP_S = 15



def long_request(url: str) -> None:
    """A 1000-step request (minutes on a CPU), left running: the stop must not wait for it."""
    body = json.dumps({"prompts": ["a lighthouse"], "steps": 1000, "method": "ddim"}).encode()
    request = urllib.request.Request(f"{url}/v1/generate", body, {"Content-Type": "application/json"})
    with contextlib.suppress(OSError):  # cut off by the stop
        urllib.request.urlopen(request, timeout=STOP_S * 4).read()


def running_processes(pids: list[int]) -> list[str]:
    alive = []
    for pid in pids:
        try:
            process = psutil.Process(pid)
            if process.status() != psutil.STATUS_ZOMBIE:
                alive.append(f"{pid} {' '.join(process.cmdline())[:100]}")
        except psutil.NoSuchProcess:
            pass
    return alive


STOPS = {"SIGTERM": (signal.SIGTERM, ()), "SIGINT, inherited ignored": (signal.SIGINT, (signal.SIGINT, signal.SIGQUIT))}


@pytest.mark.parametrize("stop", STOPS)
def test_cluster_stops_on_a_signal_with_its_ray_processes(stop: str, seed3_dir: Path, tmp_path: Path) -> None:
    signum, inherited = STOPS[stop]
    port = free_port()
    log_path = tmp_path / "cluster.log"

    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            ignoring(inherited, [sys.executable, "-m", "ccld_trt", "cluster", "--models", str(seed3_dir),
                                 "--port", str(port)]),
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    tree: list[int] = []
    try:
        deadline = time.monotonic() + START_S
        while "ready in" not in log_path.read_text(errors="replace"):
            assert process.poll() is None, log_path.read_text(errors="replace")
            assert time.monotonic() < deadline, f"not up in {START_S} s\n{log_path.read_text(errors='replace')}"
            time.sleep(1)
        threading.Thread(target=long_request, args=(f"http://127.0.0.1:{port}",), daemon=True).start()
        time.sleep(3)  # the request reaches the replica
        tree = [child.pid for child in psutil.Process(process.pid).children(recursive=True)]
        assert len(tree) >= 3, "no Ray processes under the cluster"  # GCS, raylet, workers...
        process.send_signal(signum)
        start = time.monotonic()
        try:
            status: int | None = process.wait(STOP_S)
        except subprocess.TimeoutExpired:
            status = None
        left = running_processes(tree)
        while left and time.monotonic() - start < STOP_S:
            time.sleep(0.2)
            left = running_processes(tree)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
        for pid in running_processes(tree):  # only what this test started, by id
            os.kill(int(pid.split()[0]), signal.SIGKILL)
    text = log_path.read_text(errors="replace")
    assert status == 0, f"status {status}\n{text}"
    assert left == [], f"Ray processes still running {STOP_S} s after {stop}: {left}\n{text}"
    assert f"ccld-trt cluster: {signal.Signals(signum).name} received: stopping" in text
    assert "ccld-trt cluster: stopped" in text, text

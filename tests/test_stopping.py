"""stopping.py: the stop handlers whatever dispositions were inherited, and bounded clean-up steps.

Signal handling is per process, so the handler tests run a small script in a child Python that starts with the
dispositions under test (as a background job of a non-interactive shell would give it), and print what it saw.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable

import pytest

from ccld_trt.stopping import StopSignals, bounded, forced_exit_status
from launch import ignoring

CHILD = r"""
import json, os, signal, subprocess, sys, threading
from ccld_trt.stopping import StopSignals
def dispositions():
    def name(handler):
        return "default_int_handler" if handler is signal.default_int_handler else getattr(handler, "name", "?")
    return {s: name(signal.getsignal(getattr(signal, s))) for s in ("SIGINT", "SIGTERM")}
seen = {"before": dispositions()}
with StopSignals("child") as stop:
    os.kill(os.getpid(), getattr(signal, sys.argv[1]))
    seen["requested"] = stop.wait(10)
    seen["signal"] = stop.signal_name
    # a process started now gets both signals at their default, not an inherited "ignore"
    status = subprocess.run(["cat", "/proc/self/status"], capture_output=True, text=True).stdout
    seen["child_ignores"] = status.split("SigIgn:")[1].split()[0]
    if sys.argv[2] == "twice":
        os.kill(os.getpid(), getattr(signal, sys.argv[1]))
        threading.Event().wait(10)  # the second signal ends the process before this returns
        seen["survived"] = True
seen["after"] = dispositions()
print(json.dumps(seen))
"""


def run_child(send: str, times: str, ignored: Iterable[int], script: str = CHILD) -> subprocess.CompletedProcess[str]:
    return subprocess.run(ignoring(ignored, [sys.executable, "-c", script, send, times]), capture_output=True,
                          text=True, timeout=60)


def sig_ign_mask(status_hex: str) -> set[int]:
    mask = int(status_hex, 16)
    return {n for n in range(1, 64) if mask >> (n - 1) & 1}


@pytest.mark.parametrize("send", ["SIGINT", "SIGTERM"])
def test_a_signal_inherited_as_ignored_asks_for_a_stop(send: str) -> None:
    result = run_child(send, "once", [signal.SIGINT, signal.SIGQUIT, signal.SIGTERM])
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    assert seen["before"] == {"SIGINT": "SIG_IGN", "SIGTERM": "SIG_IGN"}  # really inherited
    assert seen["requested"] is True and seen["signal"] == send
    assert f"child: {send} received: stopping" in result.stderr
    # SIGQUIT is not ours to change; SIGINT and SIGTERM reach the processes started inside at their default. (Other
    # signals may come ignored from whatever started the suite: CI's runner ignores signal 32, say.)
    child_ignores = sig_ign_mask(seen["child_ignores"])
    assert signal.SIGQUIT in child_ignores and not child_ignores & {signal.SIGINT, signal.SIGTERM}
    # on leaving: SIGINT is Python's default (Ctrl-C raises KeyboardInterrupt again), SIGTERM what it was
    assert seen["after"] == {"SIGINT": "default_int_handler", "SIGTERM": "SIG_IGN"}


def test_default_dispositions_come_back_after_the_block() -> None:
    result = run_child("SIGTERM", "once", [])
    seen = json.loads(result.stdout)
    assert seen["before"] == {"SIGINT": "default_int_handler", "SIGTERM": "SIG_DFL"}
    assert seen["after"] == {"SIGINT": "default_int_handler", "SIGTERM": "SIG_DFL"}


@pytest.mark.parametrize(("send", "status"), [("SIGINT", 130), ("SIGTERM", 143)])
def test_a_second_signal_exits_at_once_with_128_plus_its_number(send: str, status: int) -> None:
    start = time.monotonic()
    result = run_child(send, "twice", [signal.SIGINT])
    assert result.returncode == status == forced_exit_status(getattr(signal, send))
    assert time.monotonic() - start < 10  # not after the 10 s wait
    assert f"child: {send} again: exiting without clean-up" in result.stderr
    assert result.stdout == ""


def test_only_the_main_thread_can_install_them() -> None:
    errors: list[BaseException] = []

    def enter() -> None:
        try:
            with StopSignals("thread"):
                pass
        except RuntimeError as e:
            errors.append(e)

    thread = threading.Thread(target=enter)
    thread.start()
    thread.join(10)
    assert len(errors) == 1 and "main thread" in str(errors[0])


def test_wait_without_a_request_returns_false_after_its_timeout() -> None:
    with StopSignals("test") as stop:
        start = time.monotonic()
        assert stop.wait(0.5) is False
        assert 0.45 <= time.monotonic() - start < 5
        stop.request()
        assert stop.wait(0) is True and stop.signal_name is None


def test_bounded_steps() -> None:
    said: list[str] = []
    assert bounded(lambda: None, 5, "quick", said.append) is True
    release = threading.Event()
    start = time.monotonic()
    assert bounded(lambda: release.wait(30), 0.3, "stuck step", said.append) is False
    assert time.monotonic() - start < 5  # it waited 0.3 s, not for the step
    release.set()

    def fail() -> None:
        raise OSError("disk gone")

    assert bounded(fail, 5, "failing step", said.append) is False
    assert said == ["stuck step did not finish within 0.3 s; going on without it",
                    "failing step failed: OSError: disk gone"]


INTERRUPTING = r"""
import json, os, signal, sys, time
from ccld_trt.stopping import StopSignals
seen = {}
with StopSignals("child") as stop:
    start = time.monotonic()
    try:
        with stop.interrupting():
            os.kill(os.getpid(), getattr(signal, sys.argv[1]))
            time.sleep(10)  # a blocking start-up step, interrupted
    except KeyboardInterrupt:
        seen["interrupted_after"] = time.monotonic() - start
    seen["requested"], seen["signal"] = stop.requested, stop.signal_name
print(json.dumps(seen))
"""


def test_interrupting_raises_keyboardinterrupt_for_a_start_up_to_abandon() -> None:
    """In a child: a signal sent to the test process itself would reach whatever handlers earlier tests' libraries
    (Ray's init, in the whole suite) left in it."""
    result = run_child("SIGTERM", "once", [], INTERRUPTING)
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    assert seen["interrupted_after"] < 5
    assert seen["requested"] is True and seen["signal"] == "SIGTERM"


RECLAIM = r"""
import ctypes, os, signal, sys
from ccld_trt.stopping import StopSignals
with StopSignals("child") as stop:
    ctypes.CDLL(None).signal(signal.SIGTERM, 0)  # a library sets SIG_DFL underneath Python, as Ray's init does
    if sys.argv[1] == "reclaim":
        stop.reclaim()
    os.kill(os.getpid(), signal.SIGTERM)
    print(stop.wait(10))
"""


@pytest.mark.parametrize(("reclaim", "status"), [("reclaim", 0), ("no", -signal.SIGTERM)])
def test_reclaim_takes_the_signals_back_from_a_library(reclaim: str, status: int) -> None:
    result = subprocess.run([sys.executable, "-c", RECLAIM, reclaim], capture_output=True, text=True, timeout=60)
    assert result.returncode == status, result.stderr
    assert result.stdout == ("True\n" if reclaim == "reclaim" else "")


LAST_RESORT = r"""
import os, signal, time
from ccld_trt.stopping import StopSignals
with StopSignals("child", exit_within=0.5) as stop:
    os.kill(os.getpid(), signal.SIGTERM)
    stop.wait(10)
    time.sleep(10)  # a clean-up step that hangs
print("finished")
"""


def test_the_last_resort_ends_a_clean_up_that_hangs() -> None:
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-c", LAST_RESORT], capture_output=True, text=True, timeout=60)
    assert result.returncode == 143 and result.stdout == ""
    assert time.monotonic() - start < 8  # not after the 10 s step
    assert "child: still running 0.5 s after SIGTERM: exiting without the rest of the clean-up" in result.stderr

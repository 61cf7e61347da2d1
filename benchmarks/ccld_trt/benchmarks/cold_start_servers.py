"""bench --cold-start's server timings: a server process from exec until its URL answers, and a cluster's model
replica from its death until a new one is ready. The processes are stopped as a user stops them (Ctrl-C)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

POLL_S = 0.1          # how often a starting server is asked whether it answers
STOP_WAIT_S = 60.0    # after Ctrl-C, how long a server may take to stop before it is killed


class ColdRunFailed(Exception):
    """A measured process failed or timed out; the message is one line for the report."""


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else "no output"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _get(url: str) -> tuple[int, bytes]:
    """(status, body) of GET ``url``; (0, b"") when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return int(response.status), response.read()
    except urllib.error.HTTPError as e:
        return e.code, b""
    except (urllib.error.URLError, OSError):
        return 0, b""


@contextlib.contextmanager
def started_server(command: Sequence[str], url: str, env: Mapping[str, str], timeout_s: float) -> Iterator[float]:
    """Start ``command`` (a server), yield the seconds until GET ``url`` is 200, stop it on leaving (Ctrl-C, as a
    user would; killed if it has not stopped within STOP_WAIT_S). ColdRunFailed when it exits or never answers."""
    start = time.time()
    proc = subprocess.Popen(list(command), env=dict(env), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        while _get(url)[0] != 200:
            if proc.poll() is not None:
                raise ColdRunFailed(f"exited {proc.returncode} before answering: "
                                    f"{last_line(proc.stderr.read() if proc.stderr else '')}")
            if time.time() - start > timeout_s:
                raise ColdRunFailed(f"{url} did not answer within {timeout_s:.0f} s")
            time.sleep(POLL_S)
        yield time.time() - start
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen[str]) -> None:
    """Ctrl-C to ``proc``, then SIGKILL to its process group if it is still running after STOP_WAIT_S."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(STOP_WAIT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(STOP_WAIT_S)
    if proc.stderr:
        proc.stderr.close()


def replica_pids(base_url: str) -> set[int]:
    """The process ids of the model replicas a cluster's ``/v1/stats`` lists (none while it cannot answer)."""
    status, body = _get(f"{base_url}/v1/stats")
    if status != 200:
        return set()
    replicas: dict[str, Any] = json.loads(body).get("replicas", {})
    return {int(r["replica"]) for r in replicas.values() if "replica" in r}


def replica_restart_seconds(base_url: str, timeout_s: float) -> float:
    """Kill one live model replica of the cluster at ``base_url`` (SIGKILL, as a crash would) and return the seconds
    until another reports ready in ``/v1/stats``: Serve noticing the death, starting a replica process and that
    replica loading its models. ColdRunFailed when there is none to kill or none comes back in ``timeout_s``."""
    before = replica_pids(base_url)
    alive = sorted(pid for pid in before if process_alive(pid))  # /v1/stats lists a dead replica for a while
    if not alive:
        raise ColdRunFailed(f"{base_url}/v1/stats lists no live model replica")
    victim = alive[0]
    start = time.time()
    os.kill(victim, signal.SIGKILL)
    while not replica_pids(base_url) - before:
        if time.time() - start > timeout_s:
            raise ColdRunFailed(f"no new model replica reported within {timeout_s:.0f} s of killing {victim}")
        time.sleep(POLL_S)
    return time.time() - start


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` still runs."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        pass
    return True

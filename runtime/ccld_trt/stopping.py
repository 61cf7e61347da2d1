"""Stopping a server on SIGINT or SIGTERM, however the process was started, in bounded steps; and the CLI's exit.

A background job of a non-interactive shell starts with SIGINT (and SIGQUIT) ignored, and Python keeps an
inherited "ignore": a server that relies on KeyboardInterrupt then cannot be stopped by Ctrl-C, and SIGTERM (what
docker, systemd and Kubernetes send) kills it without its clean-up. ``StopSignals`` installs its own handlers for
both, whatever was inherited, and turns the first signal into a stop request that the server's main thread waits
for; ``bounded`` runs each clean-up step with a time limit, so that no step can keep the process alive.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from types import FrameType, TracebackType
from typing import Any, NoReturn

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# Servers promise to be gone within 15 s of SIGINT or SIGTERM: their clean-up budgets are shorter, and this is the
# last resort (StopSignals.exit_within) for whatever still runs then.
LAST_RESORT_S = 14.0
# The main thread looks at the stop request at least this often (a handler runs only between its bytecodes).
POLL_S = 0.2


def forced_exit_status(signum: int) -> int:
    """The exit status of a process ended by ``signum`` before finishing its clean-up: 128 + the signal's
    number, as a shell reports a process killed by it (130 for SIGINT, 143 for SIGTERM)."""
    return 128 + signum


class StopSignals:
    """The process's SIGINT and SIGTERM handlers while a server runs (a context manager, main thread only).

    The first signal asks the server to stop (``requested``, ``wait``); a second one ends the process at once
    with ``forced_exit_status``, for a clean-up that takes too long for its user, and so does the last resort,
    ``exit_within`` seconds after the first (it goes on after the block: the interpreter's exit is covered too).
    On leaving, SIGTERM gets back the disposition it had, and SIGINT Python's default (KeyboardInterrupt) even
    if it had been inherited as ignored. Processes started inside the block get both signals at their default
    (exec resets handlers, while an inherited "ignore" would have passed on to them).
    """

    def __init__(self, name: str, exit_within: float | None = None) -> None:
        self.name = name  # who is stopping, for the one line printed on a signal
        # A last resort, from the first signal: the process ends after this many seconds whatever still runs
        # (the interpreter's own exit included, where libraries' atexit hooks have no time limit).
        self.exit_within = exit_within
        self._stop = threading.Event()
        self._signum: int | None = None
        self._previous: dict[int, Any] = {}
        self._interrupt = False

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("signal handlers can only be installed from the main thread")
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def reclaim(self) -> None:
        """Install the handlers again, over those a library set meanwhile: for SIGTERM, Ray's ``init`` installs a
        C-level one that logs and aborts the process (rc -6) and a Python one that exits 1, without this
        process's clean-up."""
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._handle)

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        for signum, previous in self._previous.items():
            if signum == signal.SIGINT or previous is None:  # None: set outside Python, not restorable
                previous = signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL
            signal.signal(signum, previous)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self._signum is not None:
            sys.stderr.write(f"{self.name}: {signal.Signals(signum).name} again: exiting without clean-up\n")
            sys.stderr.flush()
            os._exit(forced_exit_status(signum))
        self._signum = signum
        sys.stderr.write(f"{self.name}: {signal.Signals(signum).name} received: stopping\n")
        sys.stderr.flush()
        self._stop.set()
        if self.exit_within is not None:
            threading.Thread(target=self._exit_later, args=(signum, self.exit_within), name="stop: last resort",
                             daemon=True).start()
        if self._interrupt:
            raise KeyboardInterrupt

    def _exit_later(self, signum: int, seconds: float) -> None:
        time.sleep(seconds)
        sys.stderr.write(f"{self.name}: still running {seconds:g} s after {signal.Signals(signum).name}: "
                         "exiting without the rest of the clean-up\n")
        sys.stderr.flush()
        os._exit(forced_exit_status(signum))

    @contextlib.contextmanager
    def interrupting(self) -> Iterator[None]:
        """Within this block, a stop request also raises KeyboardInterrupt in the main thread, as Python's own
        SIGINT handler does: for a start-up (e.g. Ray's) that should be abandoned rather than finished first."""
        self._interrupt = True
        try:
            yield
        finally:
            self._interrupt = False

    def request(self) -> None:
        """Ask for a stop as a signal would (for callers that stop for other reasons)."""
        self._stop.set()

    @property
    def requested(self) -> bool:
        return self._stop.is_set()

    @property
    def signal_name(self) -> str | None:
        """The signal that asked for the stop (e.g. "SIGTERM"), or None."""
        return None if self._signum is None else signal.Signals(self._signum).name

    def wait(self, timeout: float | None = None) -> bool:
        """Block until a stop is requested or ``timeout`` seconds pass (None: no limit); whether it was.

        Polls every POLL_S seconds rather than blocking once, so that the main thread runs the handlers
        promptly whatever the platform does with a signal that arrives during a blocking wait.
        """
        remaining = timeout
        while not self._stop.is_set():
            step = POLL_S if remaining is None else min(POLL_S, remaining)
            if step <= 0:
                break
            self._stop.wait(step)
            if remaining is not None:
                remaining -= step
        return self._stop.is_set()


def bounded(step: Callable[[], object], seconds: float, what: str,
            say: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True)) -> bool:
    """Run one clean-up ``step`` in a daemon thread and wait at most ``seconds`` for it; whether it finished
    without an exception. A step that overruns or fails is said (one line naming ``what``) and left behind: the
    process goes on with its other steps and exits, which ends the thread."""
    done = threading.Event()
    failures: list[BaseException] = []

    def run() -> None:
        try:
            step()
        except BaseException as e:  # reported below: a failing clean-up step must not end the stop
            failures.append(e)
        finally:
            done.set()

    threading.Thread(target=run, name=f"stop: {what}", daemon=True).start()
    if not done.wait(seconds):
        say(f"{what} did not finish within {seconds:g} s; going on without it")
        return False
    if failures:
        say(f"{what} failed: {type(failures[0]).__name__}: {failures[0]}")
        return False
    return True


def leave(status: int) -> NoReturn:
    """Exit with ``status`` as Python would, less its module teardown: after a ``sample`` with torch and a backend
    loaded, tearing every module down takes 0.4-0.7 s of the user's wait and does nothing the OS does not. What
    Python's exit does before that still happens, in its order: other threads are waited for (idle executor
    workers told to stop: OpenVINO's import leaves one), then the exit handlers run (logging, temporary files,
    Ray, Inductor's workers)."""
    threading._shutdown()  # type: ignore[attr-defined]  # the first step of Python's own exit (Py_FinalizeEx)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed or broken pipe: nothing more can be said on it
            stream.flush()
    os._exit(status)

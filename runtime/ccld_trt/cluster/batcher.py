"""Iteration-level batching: the U-Net evaluations of concurrent requests, merged into shared calls.

Each request samples in its own thread. Its sampler's ``model(x, t)`` becomes ``StepBatcher.evaluate``, which
queues the evaluation and blocks. One worker thread takes the waiting evaluations, oldest first, up to
``max_rows`` U-Net rows, hands them to the executor as one list (one U-Net call) and gives each caller its own
result. It starts a call as soon as every request that is sampling has an evaluation waiting (nobody else can
join this step), when the rows are full, or when the oldest has waited ``window_s`` (a request busy elsewhere
must not hold the others up). Requests join and leave between evaluations; none waits for another to finish.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

Call = TypeVar("Call")
Result = TypeVar("Result")


class BatcherClosed(RuntimeError):
    """The batcher stopped (its replica is shutting down) before this evaluation ran."""


@dataclass
class _Waiting(Generic[Call, Result]):
    call: Call
    rows: int
    since: float
    done: threading.Event = field(default_factory=threading.Event)
    result: Result | None = None
    error: BaseException | None = None


@dataclass
class BatchStats:
    """What the batcher has done so far (rows: U-Net rows, i.e. images x CFG conditions)."""

    calls: int = 0            # executor calls (each one U-Net call, or one per evaluation when not merging)
    evaluations: int = 0      # evaluations served
    rows: int = 0
    max_rows: int = 0         # the most rows in one call
    max_requests: int = 0     # the most requests in one call
    merged_calls: int = 0     # calls that served more than one request

    def as_dict(self) -> dict[str, float]:
        calls = max(self.calls, 1)
        return {"unet_calls": self.calls, "evaluations": self.evaluations, "merged_calls": self.merged_calls,
                "rows": self.rows, "rows_per_call_max": self.max_rows, "rows_per_call_mean": self.rows / calls,
                "requests_per_call_max": self.max_requests, "requests_per_call_mean": self.evaluations / calls}


class StepBatcher(Generic[Call, Result]):
    """Merges evaluations ``Call`` -> ``Result`` across threads; ``execute(calls)`` returns one result per call,
    in order, and runs on the worker thread only (so the backend behind it sees one call at a time).

    ``rows_of(call)``: the U-Net rows of an evaluation. ``merge`` False runs every evaluation on its own call
    (same worker, same order): the unbatched baseline. One evaluation larger than ``max_rows`` still runs, alone.
    """

    def __init__(self, execute: Callable[[Sequence[Call]], Sequence[Result]], rows_of: Callable[[Call], int],
                 max_rows: int, window_s: float = 0.005, merge: bool = True) -> None:
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        self._execute = execute
        self._rows_of = rows_of
        self.max_rows = max_rows
        self.window_s = window_s
        self.merge = merge
        self._lock = threading.Condition()
        self._waiting: list[_Waiting[Call, Result]] = []
        self._sampling = 0  # requests inside a ``sampling()`` block
        self._closed = False
        self._last_done = 0.0  # time.monotonic() at the end of the last call
        self._stats = BatchStats()
        self._worker = threading.Thread(target=self._loop, name="ccld-trt-step-batcher", daemon=True)
        self._worker.start()

    def configure(self, max_rows: int | None = None, merge: bool | None = None) -> None:
        """Change the row limit or merging for the calls not yet started."""
        with self._lock:
            if max_rows is not None:
                if max_rows < 1:
                    raise ValueError(f"max_rows must be >= 1, got {max_rows}")
                self.max_rows = max_rows
            if merge is not None:
                self.merge = merge
            self._lock.notify_all()

    @contextlib.contextmanager
    def sampling(self) -> Iterator[None]:
        """Count the calling request as sampling while inside: the worker waits for its next evaluation."""
        with self._lock:
            self._sampling += 1
        try:
            yield
        finally:
            with self._lock:
                self._sampling -= 1
                self._lock.notify_all()

    def evaluate(self, call: Call) -> Result:
        """Queue ``call``, wait for the merged call that includes it, return its own result (or raise the
        executor's error, or BatcherClosed)."""
        waiting: _Waiting[Call, Result] = _Waiting(call, self._rows_of(call), time.monotonic())
        with self._lock:
            if self._closed:
                raise BatcherClosed("the replica is shutting down")
            self._waiting.append(waiting)
            self._lock.notify_all()
        waiting.done.wait()
        if waiting.error is not None:
            raise waiting.error
        return waiting.result  # type: ignore[return-value]  # set with done when error is None

    def stats(self) -> dict[str, float]:
        """BatchStats as a dict, plus ``waiting`` (evaluations queued now) and ``sampling`` (requests)."""
        with self._lock:
            return {**self._stats.as_dict(), "waiting": len(self._waiting), "sampling": self._sampling}

    @property
    def alive(self) -> bool:
        """Whether the worker thread is serving (a replica's health)."""
        return self._worker.is_alive() and not self._closed

    def close(self) -> None:
        """Stop the worker; evaluations still queued fail with BatcherClosed."""
        with self._lock:
            self._closed = True
            self._lock.notify_all()
        self._worker.join(timeout=60)

    def _ready(self) -> bool:
        # under the lock, with something waiting
        rows = sum(w.rows for w in self._waiting)
        everyone = len(self._waiting) >= self._sampling
        late = time.monotonic() >= self._window_end()
        return not self.merge or everyone or rows >= self.max_rows or late

    def _window_end(self) -> float:
        # from the oldest's arrival, or from the end of the last call if later: the requests that call just
        # served need a moment to submit their next step; else two requests would take turns, never merging
        return max(self._waiting[0].since, self._last_done) + self.window_s

    def _take(self) -> list[_Waiting[Call, Result]]:
        # under the lock: the oldest evaluations that fit max_rows (always at least the oldest one)
        taken, rows = [self._waiting[0]], self._waiting[0].rows
        if self.merge:
            for w in self._waiting[1:]:
                if rows + w.rows > self.max_rows:
                    break
                taken.append(w)
                rows += w.rows
        del self._waiting[:len(taken)]
        return taken

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._closed and not (self._waiting and self._ready()):
                    timeout = None
                    if self._waiting:
                        timeout = max(self._window_end() - time.monotonic(), 1e-4)
                    self._lock.wait(timeout)
                if self._closed:
                    for w in self._waiting:
                        w.error = BatcherClosed("the replica is shutting down")
                        w.done.set()
                    self._waiting.clear()
                    return
                taken = self._take()
            self._run(taken)

    def _run(self, taken: list[_Waiting[Call, Result]]) -> None:
        try:
            results = self._execute([w.call for w in taken])
            if len(results) != len(taken):
                raise RuntimeError(f"the executor returned {len(results)} results for {len(taken)} calls")
            for w, r in zip(taken, results, strict=True):
                w.result = r
        except BaseException as e:  # every caller of this call gets the error; the worker serves on
            for w in taken:
                w.error = e
        with self._lock:
            self._last_done = time.monotonic()
            s = self._stats
            s.calls += 1
            s.evaluations += len(taken)
            rows = sum(w.rows for w in taken)
            s.rows += rows
            s.max_rows = max(s.max_rows, rows)
            s.max_requests = max(s.max_requests, len(taken))
            s.merged_calls += len(taken) > 1
        for w in taken:
            w.done.set()

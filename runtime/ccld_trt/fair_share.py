"""How much each client may use: requests in flight (the cluster's per-client limit, with the Retry-After it
answers) and requests per second (the open paths). The ingress (cluster/ingress.py) is their one user; clients
are named as access.py names them (a key id, or an address)."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

MAX_CLIENTS = 1024  # idle clients beyond this are forgotten (an address per client must not grow memory forever)


class RateLimiter:
    """At most ``rate`` requests a second per name, ``burst`` at once (a token bucket per name; idle names
    beyond MAX_CLIENTS are forgotten). Not thread-safe: the ingress's event loop is its one user."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.burst, self.clock = rate, burst, clock
        self._buckets: dict[str, tuple[float, float]] = {}  # name -> (tokens, when)

    def allow(self, name: str) -> bool:
        now = self.clock()
        tokens, then = self._buckets.pop(name, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - then) * self.rate)
        allowed = tokens >= 1.0
        self._buckets[name] = (tokens - allowed, now)  # re-inserted last: the dict stays in use order
        if len(self._buckets) > MAX_CLIENTS:
            del self._buckets[next(iter(self._buckets))]
        return allowed


@dataclass
class _Client:
    in_flight: int = 0
    accepted: int = 0
    refused: int = 0  # 429s
    finished: int = 0
    failed: int = 0  # finished with an error status
    mean_seconds: float = 0.0  # of its finished requests, exponentially weighted
    started: list[float] = field(default_factory=list)  # when each request in flight was admitted (monotonic)


class InFlightLimiter:
    """Counts each client's requests in flight and admits at most ``limit`` at once (None: no limit).
    Thread-safe; one instance must see every request of the deployment (the cluster's single ingress)."""

    def __init__(self, limit: int | None, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.clock = clock
        self._lock = threading.Lock()
        self._clients: dict[str, _Client] = {}

    def acquire(self, client: str) -> bool:
        """Admit one request of ``client`` (then ``release`` it exactly once), or count a refusal."""
        with self._lock:
            counts = self._clients.setdefault(client, _Client())
            if self.limit is not None and counts.in_flight >= self.limit:
                counts.refused += 1
                return False
            counts.in_flight += 1
            counts.accepted += 1
            counts.started.append(self.clock())
            return True

    def release(self, client: str, seconds: float, ok: bool) -> None:
        with self._lock:
            counts = self._clients[client]
            counts.in_flight -= 1
            if counts.started:  # the oldest ends first, as far as the estimate cares
                counts.started.pop(0)
            counts.finished += 1
            counts.failed += not ok
            counts.mean_seconds = seconds if counts.finished == 1 else 0.8 * counts.mean_seconds + 0.2 * seconds
            excess = len(self._clients) - MAX_CLIENTS
            if excess > 0:
                for name in [n for n, c in self._clients.items() if c.in_flight == 0][:excess]:
                    del self._clients[name]

    def retry_after(self, client: str) -> int:
        """Seconds a refused client should wait (Retry-After), 1 to 60: until its running request expected to
        end first does, a request expected to last its mean (the mean of every client's finished requests
        while it has none; while none finished anywhere, as long again as the oldest has run so far)."""
        with self._lock:
            counts = self._clients.get(client)
            if counts is None or not counts.started:
                return 1
            finished = [c.mean_seconds for c in self._clients.values() if c.finished]
            expected = (counts.mean_seconds if counts.finished else
                        sum(finished) / len(finished) if finished else None)
            now = self.clock()
            ages = [now - t for t in counts.started]
            remaining = min(expected - age for age in ages) if expected is not None else max(ages)
        return min(60, max(1, math.ceil(remaining)))

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """Per-client counts (for /v1/stats): in_flight, accepted, refused, finished, failed, mean_seconds."""
        with self._lock:
            return {name: {"in_flight": c.in_flight, "accepted": c.accepted, "refused": c.refused,
                           "finished": c.finished, "failed": c.failed, "mean_seconds": round(c.mean_seconds, 3)}
                    for name, c in self._clients.items()}

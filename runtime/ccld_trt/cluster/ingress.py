"""The cluster's HTTP front: keys, body size, a fair share per client, health and the access log, before any
model replica.

Every request passes through one ``Ingress`` (a Serve deployment of a single replica, the application's route).
Before anything reaches a model replica it checks, in this order: the route's own answer (``/v1/health`` is
answered here, from whether a model replica reported in the last ``REPLICA_STALE_S``: never queued behind
generation, and rate-limited per address so that a flood of it costs nothing), exactly one valid bearer key,
the declared body size (``Content-Length``), the client's requests in flight; only then is the body read, and
that read stops as soon as it passes ``MAX_BODY_BYTES`` (413), so an unauthenticated or oversized body is never
held in memory. Admitted requests go to the model replicas through a Serve handle (their queue limit is
applied there: 503 beyond it). Why one ingress replica: the per-client limit must count a client's requests
on every model replica. A single asyncio process sees them all, so the counts are plain numbers in memory: no
counter actor to call twice per request, and no count that leaks when a model replica dies mid-request (the
forwarding ``await`` raises, and ``finally`` gives the slot back). If the ingress dies, Serve starts another,
whose counts begin at zero along with its requests.

Client identity: the key's id when there are keys, else the peer address as Serve's proxy gives it (which
believes ``X-Forwarded-For`` only from ``--trusted-proxy`` addresses: cluster/local_ray.py). The access policy
(keys as digests, the limit) lives in a named actor that ``ccld-trt cluster`` updates when its key file
changes; the ingress reads it before its first answer and then at most every POLICY_POLL_S, and refuses
everything but health (503) while it has never read one. No Ray imports here otherwise: the handle is any
object whose ``run_request.remote(method, path, body)`` is awaitable (tests set the policy with ``reconfigure``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any

from ccld_trt.access import AccessPolicy, Refusal, access_line, authenticate, declared_length
from ccld_trt.fair_share import InFlightLimiter, RateLimiter
from ccld_trt.limits import MAX_BODY_BYTES

# Serve writes this logger's lines into the ingress replica's log file (logs/serve/ under Ray's session dir)
logger = logging.getLogger("ray.serve")

OPEN_PATHS = ("/v1/health",)  # answered without a key (load balancers' health checks), by the ingress itself
LIMITED_PATHS = ("/v1/generate",)  # count toward the per-client limit
MAX_ONGOING = 4096  # requests the ingress holds at once (waiting on replicas, or refused at once)
POLICY_POLL_S = 1.0  # a revoked key may still be accepted this long; health may lag a replica this long
OPEN_RATE_PER_S, OPEN_BURST = 5.0, 10  # open-path answers per address (a load balancer asks every few seconds)
# An open-path 429 is answered after this wait: a flooding client that waits for its answers (most do) then costs
# the HTTP proxy and this event loop a request per second per connection instead of hundreds, CPU the keyed
# clients' requests keep. At most HELD_REFUSALS wait at once; beyond that they are answered at once (the held
# requests count toward MAX_ONGOING, which keyed requests need).
REFUSAL_HOLD_S, HELD_REFUSALS = 2.0, 256

Body = Callable[[int], Awaitable[bytes | None]]  # reads the body, at most ``limit`` bytes: None when longer


async def read_limited(chunks: AsyncIterator[bytes], limit: int) -> bytes | None:
    """The body from its chunks, or None as soon as it passes ``limit`` bytes (nothing more is read)."""
    parts, size = [], 0
    async for chunk in chunks:
        size += len(chunk)
        if size > limit:
            return None
        parts.append(chunk)
    return b"".join(parts)


def _prompts(body: bytes) -> Any:
    try:
        value = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return value.get("prompts") if isinstance(value, dict) else None


def _back_pressure() -> type[Exception] | tuple[()]:
    try:
        from ray.serve.exceptions import BackPressureError
    except ImportError:  # tests without Ray
        return ()
    return BackPressureError


class Ingress:
    """The Serve ingress (decorated in ``app.application``): ``__call__`` takes Starlette requests; the work
    is in ``respond``, which tests drive without Ray."""

    def __init__(self, replicas: Any, board: tuple[str, str] | None = None,
                 stats_board: tuple[str, str, float] | None = None) -> None:
        """``board``: the (name, namespace) of the actor holding the policy; None: ``reconfigure`` sets it.
        ``stats_board``: (name, namespace, max age) of the actor the model replicas report to; None: health
        takes the replicas as ready."""
        self.replicas = replicas
        self.board = board
        self.stats_board = stats_board
        self.policy = AccessPolicy()
        self._read_at: float | None = None  # when the board's policy was last read
        self._tried_at: float | None = None  # when it was last tried
        self._reading = asyncio.Lock()
        self.ready: int | None = None if stats_board is None else 0  # model replicas that reported lately
        self.limiter = InFlightLimiter(None)
        self.open_limiter = RateLimiter(OPEN_RATE_PER_S, OPEN_BURST)
        self.held_refusals = 0  # open-path 429s waiting out REFUSAL_HOLD_S now
        self.unauthorized = 0

    def reconfigure(self, config: Mapping[str, Any]) -> None:
        """Take an AccessPolicy's config (keys change in place; counts are kept)."""
        self.policy = AccessPolicy.from_config(config)
        self.limiter.limit = self.policy.max_in_flight

    async def _refresh(self) -> bool:
        """Read the boards (policy, replicas ready) when the last try is POLICY_POLL_S old, one read at a time
        (requests arriving meanwhile wait for it: none is judged by a policy older than that); whether there
        is a policy to apply (fail closed)."""
        if self.board is None:
            return True
        if self._due():
            async with self._reading:
                if self._due():  # not read by the request this one waited for
                    await self._read_boards()
        return self._read_at is not None

    def _due(self) -> bool:
        return self._tried_at is None or time.monotonic() - self._tried_at >= POLICY_POLL_S

    async def _read_boards(self) -> None:
        assert self.board is not None
        now = time.monotonic()
        try:
            import ray

            board = ray.get_actor(self.board[0], namespace=self.board[1])
            self.reconfigure((await board.get.remote())["policy"])
            if self.stats_board is not None:
                name, namespace, max_age = self.stats_board
                stats = ray.get_actor(name, namespace=namespace)
                self.ready = len(await stats.get.remote(max_age))
            self._read_at = now
        except Exception as e:  # keep the last policy; without one, nothing is served
            logger.warning("cannot read the access policy: %s", f"{type(e).__name__}: {e}".splitlines()[0])
        finally:  # once done (requests waiting on this read must not start another); a failure: a poll later
            self._tried_at = time.monotonic()

    async def __call__(self, request: Any) -> Any:
        from starlette.responses import JSONResponse

        async def body(limit: int) -> bytes | None:
            return await read_limited(request.stream(), limit)

        headers = request.headers
        status, payload, answer = await self.respond(
            request.method, request.url.path, dict(request.query_params), headers.getlist("authorization"),
            request.client.host if request.client else "unknown", body,
            content_length=headers.getlist("content-length"))
        return JSONResponse(payload, status_code=status, headers=answer)

    async def respond(self, method: str, path: str, query: Mapping[str, str],
                      authorization: Sequence[str] | str | None, address: str, body: bytes | Body,
                      content_length: Sequence[str] = ()) -> tuple[int, dict[str, Any], dict[str, str]]:
        """One request -> (status, JSON body, headers); logs its access line. ``authorization``: every
        Authorization header sent; ``body``: the bytes, or how to read them (only once admitted)."""
        when, start = time.time(), time.perf_counter()
        path = "/" + path.strip("/")
        client, status, payload = address, 500, {"error": "internal error"}
        headers: dict[str, str] = {}
        prompts = None
        if isinstance(authorization, str) or authorization is None:
            authorization = () if authorization is None else (authorization,)
        if isinstance(body, bytes):
            content_length, body = (str(len(body)),), _given(body)
        try:
            if path in OPEN_PATHS:
                status, payload, headers = await self._open(method, address)
                return status, payload, headers
            if not await self._refresh():
                status, payload = 503, {"error": "the access policy cannot be read yet; retry"}
                return status, payload, headers
            who = authenticate(self.policy.keys, authorization, query, address)
            if isinstance(who, Refusal):
                self.unauthorized += who.status == 401
                status, payload, headers = who.status, {"error": who.error}, who.headers
                return status, payload, headers
            client = who
            length = declared_length(content_length, MAX_BODY_BYTES)
            if isinstance(length, Refusal):
                status, payload = length.status, {"error": length.error}
                return status, payload, headers
            limited = path in LIMITED_PATHS
            if limited and not self.limiter.acquire(client):
                wait = self.limiter.retry_after(client)
                status, headers = 429, {"Retry-After": str(wait)}
                payload = {"error": f"{client} has {self.policy.max_in_flight} request(s) in flight already, the "
                                    f"most one client may; retry in about {wait} s"}
                return status, payload, headers
            try:
                data = await body(MAX_BODY_BYTES)
                if data is None:
                    status, payload = 413, {"error": f"the body is over the limit of {MAX_BODY_BYTES // 2**20} MiB"}
                    return status, payload, headers
                if self.policy.log_prompts and path == "/v1/generate":
                    prompts = _prompts(data)
                status, payload = await self._forward(method, path, data)
                if path == "/v1/stats" and status == 200:
                    payload = {**payload, **self.stats()}
            finally:
                if limited:
                    self.limiter.release(client, time.perf_counter() - start, status == 200)
            return status, payload, headers
        finally:
            images = len(payload.get("images", ())) if status == 200 else 0
            logger.info(access_line(when, client, method, path, status, images, time.perf_counter() - start,
                                    prompts))

    async def _open(self, method: str, address: str) -> tuple[int, dict[str, Any], dict[str, str]]:
        """/v1/health, answered here: 200 while a model replica reported lately, else 503; 429 beyond the
        address's rate (held back a while: REFUSAL_HOLD_S)."""
        if not self.open_limiter.allow(address):
            if self.held_refusals < HELD_REFUSALS:
                self.held_refusals += 1
                try:
                    await asyncio.sleep(REFUSAL_HOLD_S)
                finally:
                    self.held_refusals -= 1
            return 429, {"error": f"too many requests from {address}; retry in a second"}, {"Retry-After": "1"}
        if method != "GET":
            return 405, {"error": f"/v1/health takes GET, not {method}"}, {}
        await self._refresh()
        if self.ready == 0:
            return 503, {"status": "unavailable", "error": "no model replica is ready"}, {}
        return 200, {"status": "ok", "replicas_ready": self.ready}, {}

    async def _forward(self, method: str, path: str, body: bytes) -> tuple[int, dict[str, Any]]:
        """The model replicas' answer; 503 when their queue is full or a replica died under the request."""
        try:
            status, payload = await self.replicas.run_request.remote(method, path, body)
        except _back_pressure():
            return 503, {"error": "the cluster's queue is full; retry later"}
        except Exception as e:
            logger.warning("a replica failed under a request: %s", f"{type(e).__name__}: {e}".splitlines()[0])
            return 503, {"error": f"a replica failed while running the request ({type(e).__name__}); retry"}
        return status, payload

    def stats(self) -> dict[str, Any]:
        """The ingress's part of /v1/stats: per-client counts (keys by their short ids), 401s, the limit."""
        return {"clients": self.limiter.snapshot(), "unauthorized": self.unauthorized,
                "max_in_flight_per_client": self.policy.max_in_flight}


def _given(data: bytes) -> Body:
    async def read(limit: int) -> bytes | None:
        return data if len(data) <= limit else None

    return read

"""The cluster's HTTP front: keys, a fair share per client, and the access log, before any model replica.

Every request passes through one ``Ingress`` (a Serve deployment of a single replica, the application's route),
which checks the key, counts the client's requests in flight, and forwards admitted ones to the model replicas
through a Serve handle (their queue limit is applied there: 503 beyond it). Why one ingress replica: the
per-client limit must count a client's requests on every model replica. A single asyncio process sees them all,
so the counts are plain numbers in memory: no counter actor to call twice per request, and no count that leaks
when a model replica dies mid-request (the forwarding ``await`` raises, and ``finally`` gives the slot back).
The ingress does no model work (no CPU reserved, thousands of requests at once), so it is not the bottleneck;
if it dies, Serve starts another, whose counts begin at zero along with its requests.

The access policy (keys as digests, the limit) lives in a named actor that ``ccld-trt cluster`` updates when
its key file changes; the ingress reads it before its first answer and then at most every POLICY_POLL_S, and
refuses everything (503) while it has never read one. No Ray imports here otherwise: the handle is any object
whose ``run_request.remote(method, path, body)`` is awaitable (tests set the policy with ``reconfigure``).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from typing import Any

from ccld_trt.access import AccessPolicy, InFlightLimiter, Refusal, access_line, authenticate

# Serve writes this logger's lines into the ingress replica's log file (logs/serve/ under Ray's session dir)
logger = logging.getLogger("ray.serve")

OPEN_PATHS = ("/v1/health",)  # answered without a key: load balancers' health checks
LIMITED_PATHS = ("/v1/generate",)  # count toward the per-client limit
MAX_ONGOING = 4096  # requests the ingress holds at once (waiting on replicas, or refused at once)
POLICY_POLL_S = 1.0  # a revoked key may still be accepted this long


def _back_pressure() -> type[Exception] | tuple[()]:
    try:
        from ray.serve.exceptions import BackPressureError
    except ImportError:  # tests without Ray
        return ()
    return BackPressureError


def _prompts(body: bytes) -> Any:
    try:
        value = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return value.get("prompts") if isinstance(value, dict) else None


class Ingress:
    """The Serve ingress (decorated in ``app.application``): ``__call__`` takes Starlette requests; the work
    is in ``respond``, which tests drive without Ray."""

    def __init__(self, replicas: Any, board: tuple[str, str] | None = None) -> None:
        """``board``: the (name, namespace) of the actor holding the policy; None: ``reconfigure`` sets it."""
        self.replicas = replicas
        self.board = board
        self.policy = AccessPolicy()
        self._read_at: float | None = None  # when the board's policy was last read
        self.limiter = InFlightLimiter(None)
        self.unauthorized = 0

    def reconfigure(self, config: Mapping[str, Any]) -> None:
        """Take an AccessPolicy's config (keys change in place; counts are kept)."""
        self.policy = AccessPolicy.from_config(config)
        self.limiter.limit = self.policy.max_in_flight

    async def _refresh(self) -> bool:
        """Read the board's policy if it is due; whether there is a policy to apply (fail closed)."""
        now = time.monotonic()
        if self.board is None or (self._read_at is not None and now - self._read_at < POLICY_POLL_S):
            return True
        try:
            import ray

            board = ray.get_actor(self.board[0], namespace=self.board[1])
            self.reconfigure((await board.get.remote())["policy"])
            self._read_at = now
        except Exception as e:  # keep the last policy; without one, nothing is served
            logger.warning("cannot read the access policy: %s", f"{type(e).__name__}: {e}".splitlines()[0])
        return self._read_at is not None

    async def __call__(self, request: Any) -> Any:
        from starlette.responses import JSONResponse

        status, payload, headers = await self.respond(
            request.method, request.url.path, dict(request.query_params), request.headers.get("authorization"),
            request.client.host if request.client else "unknown", await request.body())
        return JSONResponse(payload, status_code=status, headers=headers)

    async def respond(self, method: str, path: str, query: Mapping[str, str], authorization: str | None,
                      address: str, body: bytes) -> tuple[int, dict[str, Any], dict[str, str]]:
        """One request -> (status, JSON body, headers); logs its access line."""
        when, start = time.time(), time.perf_counter()
        path = "/" + path.strip("/")
        client, status, payload = address, 500, {"error": "internal error"}
        headers: dict[str, str] = {}
        prompts = None
        try:
            if path in OPEN_PATHS:
                status, payload = await self._forward(method, path, b"")
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
            if self.policy.log_prompts and path == "/v1/generate":
                prompts = _prompts(body)
            if path not in LIMITED_PATHS:
                status, payload = await self._forward(method, path, body)
                if path == "/v1/stats" and status == 200:
                    payload = {**payload, **self.stats()}
                return status, payload, headers
            if not self.limiter.acquire(client):
                wait = self.limiter.retry_after(client)
                status, headers = 429, {"Retry-After": str(wait)}
                payload = {"error": f"{client} has {self.policy.max_in_flight} request(s) in flight already, the "
                                    f"most one client may; retry in about {wait} s"}
                return status, payload, headers
            try:
                status, payload = await self._forward(method, path, body)
            finally:
                self.limiter.release(client, time.perf_counter() - start, status == 200)
            return status, payload, headers
        finally:
            images = len(payload.get("images", ())) if status == 200 else 0
            logger.info(access_line(when, client, method, path, status, images, time.perf_counter() - start,
                                    prompts))

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

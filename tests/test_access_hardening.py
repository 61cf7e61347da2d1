"""Issue 31 items 2-5 without Ray: one Authorization header, key-file lines, Retry-After, escaped log fields,
the ingress's order (health and the key before the body, the size before reading), the open-path rate limit,
the private local Ray's settings. The same on a real local Ray: tests/test_cluster_exposure.py."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import shlex
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from ccld_trt import access
from ccld_trt.access import (
    AccessPolicy,
    KeyFileWatcher,
    Keys,
    Refusal,
    access_line,
    authenticate,
    declared_length,
    key_file_warning,
    key_id,
    load_keys,
)
from ccld_trt.cluster import ingress as ingress_module
from ccld_trt.cluster.ingress import Ingress, read_limited
from ccld_trt.cluster.local_ray import check_auth_mode, forget_env_key, is_loopback_address, trusted_proxies
from ccld_trt.export.errors import UserError
from ccld_trt.fair_share import InFlightLimiter, RateLimiter
from ccld_trt.limits import MAX_BODY_BYTES

KEY_A = "a" * 24 + "0123456789abcdef"
KEY_B = "b" * 24 + "fedcba9876543210"
BODY = b'{"prompts": ["a cat:3"], "steps": 2}'


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _keys_file(tmp_path: Path, data: bytes, mode: int = 0o600) -> Path:
    path = tmp_path / "keys"
    path.write_bytes(data)
    path.chmod(mode)
    return path


def test_two_authorization_headers_are_400_whatever_their_order() -> None:
    keys = Keys.of([KEY_A])
    for headers in ((f"Bearer {KEY_A}", "Bearer wrong-key-of-enough-length"),
                    ("Bearer wrong-key-of-enough-length", f"Bearer {KEY_A}"), (f"Bearer {KEY_A}",) * 2):
        refusal = authenticate(keys, headers, {}, "10.0.0.1")
        assert isinstance(refusal, Refusal) and refusal.status == 400 and "one Authorization" in refusal.error
    refusal = authenticate(Keys(), ("Bearer x", "Bearer y"), {}, "10.0.0.1")  # without keys too
    assert isinstance(refusal, Refusal) and refusal.status == 400
    assert authenticate(keys, (f"Bearer {KEY_A}",), {}, "10.0.0.1") == key_id(KEY_A)


def test_a_byte_order_mark_is_dropped_and_the_key_matches(tmp_path: Path) -> None:
    keys = load_keys(_keys_file(tmp_path, b"\xef\xbb\xbf" + KEY_A.encode() + b"\r\n" + KEY_B.encode() + b"\n"),
                     environ={})
    assert keys.identify(KEY_A) == key_id(KEY_A) and keys.identify(KEY_B) == key_id(KEY_B)


@pytest.mark.parametrize(("hidden", "code"), [("\u200b", "U+200B"), ("\ufeff", "U+FEFF"), ("\x07", "U+0007"),
                                              ("\u2060", "U+2060"), ("\x00", "U+0000")])
def test_invisible_characters_in_a_key_line_are_refused(tmp_path: Path, hidden: str, code: str) -> None:
    text = f"# clients\n{KEY_A}\n{KEY_B[:5]}{hidden}{KEY_B[5:]}\n"
    words = f"line 3: holds an invisible or non-printable character ({code})"
    with pytest.raises(UserError, match=re.escape(words)) as e:
        load_keys(_keys_file(tmp_path, text.encode()), environ={})
    assert "\n" not in str(e.value) and KEY_B[:5] not in str(e.value)


def test_a_reload_with_an_invisible_character_keeps_the_old_keys(tmp_path: Path) -> None:
    path = _keys_file(tmp_path, f"{KEY_A}\n".encode())
    watcher = KeyFileWatcher(path)
    path.write_text(f"{KEY_A}\u200b\n")
    os.utime(path, ns=(1, 1))
    with pytest.raises(UserError, match="U\\+200B"):  # run_cluster says so and keeps the keys it has
        watcher.poll()


def test_a_key_file_others_may_read_is_loaded_with_a_warning(tmp_path: Path) -> None:
    warned: list[str] = []
    keys = load_keys(_keys_file(tmp_path, f"{KEY_A}\n".encode(), 0o644), environ={}, warn=warned.append)
    assert keys.identify(KEY_A) and len(warned) == 1
    assert "readable by other users (mode 644)" in warned[0] and "chmod 600" in warned[0]
    assert KEY_A not in warned[0]
    for mode in (0o640, 0o604):
        assert key_file_warning(_keys_file(tmp_path, f"{KEY_A}\n".encode(), mode)) is not None
    warned.clear()
    load_keys(_keys_file(tmp_path, f"{KEY_A}\n".encode(), 0o600), environ={}, warn=warned.append)
    assert warned == []


def test_retry_after_follows_the_running_requests() -> None:
    clock = Clock()
    limiter = InFlightLimiter(2, clock=clock)
    assert limiter.acquire("a") and limiter.acquire("a") and not limiter.acquire("a")
    clock.now += 6.5  # none finished anywhere: as long again as the oldest has run
    assert limiter.retry_after("a") == 7
    limiter.release("a", 6.5, ok=True)  # one took 6.5 s; the other started at the same time
    assert limiter.acquire("a")  # started now: expected to end in 6.5 s; the older one is due now
    assert limiter.retry_after("a") == 1
    clock.now += 0.5
    limiter.release("a", 7.0, ok=True)  # the older one, after 7 s: the mean is 0.8 x 6.5 + 0.2 x 7 = 6.6
    assert limiter.acquire("a") and not limiter.acquire("a")
    assert limiter.retry_after("a") == 7  # both running ones expected in 6.1 and 6.6 s
    clock.now += 3.0
    assert limiter.retry_after("a") == 4
    assert limiter.acquire("b") and limiter.retry_after("b") == 7  # no history: every client's mean


def test_log_fields_cannot_forge_fields_or_lines() -> None:
    line = access_line(0, "evil status=200 images=99", "POST", "/v1/generate\nfake line", 401, 0, 0.5)
    assert "\n" not in line
    assert 'client="evil status=200 images=99"' in line and '"/v1/generate\\nfake line"' in line
    fields = shlex.split(line)  # quoted fields stay one field each
    assert fields[1:] == ["client=evil status=200 images=99", "POST", "/v1/generate\\nfake line", "status=401",
                          "images=0", "seconds=0.500"]
    assert "client=10.0.0.1 " in access_line(0, "10.0.0.1", "GET", "/v1/stats", 200, 0, 0)
    assert "client=key-3f2a9c1b " in access_line(0, "key-3f2a9c1b", "GET", "/v1/stats", 200, 0, 0)
    assert 'client="" ' in access_line(0, "", "GET", "/", 200, 0, 0)


def test_declared_length() -> None:
    assert declared_length((), 10) is None and declared_length(("10",), 10) == 10
    for values, status in ((("11",), 413), ((str(512 * 2**20),), 413), (("-1",), 400), (("1e3",), 400),
                           (("3", "4"), 400), (("\u0661",), 400)):
        refusal = declared_length(values, 10)
        assert isinstance(refusal, Refusal) and refusal.status == status, values


def test_rate_limiter() -> None:
    clock = Clock()
    limiter = RateLimiter(rate=2.0, burst=3, clock=clock)
    assert [limiter.allow("x") for _ in range(5)] == [True, True, True, False, False]
    assert limiter.allow("y")  # another name has its own bucket
    clock.now += 1.0
    assert [limiter.allow("x") for _ in range(3)] == [True, True, False]


class Replicas:
    """The model deployment as the ingress sees it; anything but /v1/generate and /v1/stats reaching it fails."""

    def __init__(self, hold: float = 0.0) -> None:
        self.paths: list[str] = []
        self.hold = hold
        self.run_request = self

    async def remote(self, method: str, path: str, body: bytes) -> tuple[int, dict[str, Any]]:
        self.paths.append(path)
        assert path in ("/v1/generate", "/v1/stats"), path
        await asyncio.sleep(self.hold)
        return 200, {"images": ["png"]} if path == "/v1/generate" else {}


class Reader:
    """A request body of ``size`` bytes in 64 KiB chunks, counting what was read."""

    def __init__(self, size: int) -> None:
        self.size, self.read = size, 0

    async def chunks(self) -> AsyncIterator[bytes]:
        while self.read < self.size:
            chunk = min(65536, self.size - self.read)
            self.read += chunk
            yield b"x" * chunk

    async def __call__(self, limit: int) -> bytes | None:
        return await read_limited(self.chunks(), limit)


def _ingress(replicas: Replicas, **policy: Any) -> Ingress:
    ingress = Ingress(replicas)
    ingress.reconfigure(AccessPolicy(**policy).config())
    return ingress


def test_no_body_is_read_before_the_key_size_and_limit_checks() -> None:
    replicas = Replicas()
    ingress = _ingress(replicas, keys=Keys.of([KEY_A]), max_in_flight=1)
    big = 512 * 2**20

    async def main() -> None:
        reader = Reader(big)
        status, _, _ = await ingress.respond("POST", "/v1/generate", {}, (), "10.0.0.1", reader, (str(big),))
        assert status == 401 and reader.read == 0
        reader = Reader(big)  # no Content-Length (chunked): no key, still nothing read
        assert (await ingress.respond("POST", "/v1/generate", {}, (), "10.0.0.1", reader))[0] == 401
        assert reader.read == 0
        reader = Reader(big)
        auth = (f"Bearer {KEY_A}",)
        status, payload, _ = await ingress.respond("POST", "/v1/generate", {}, auth, "10.0.0.1", reader, (str(big),))
        assert status == 413 and reader.read == 0 and "512 MiB" in payload["error"]
        reader = Reader(big)  # with a key, streamed: read up to the limit, then refused
        status, _, _ = await ingress.respond("POST", "/v1/generate", {}, auth, "10.0.0.1", reader)
        assert status == 413 and MAX_BODY_BYTES < reader.read <= MAX_BODY_BYTES + 65536
        assert ingress.limiter.snapshot()[key_id(KEY_A)]["in_flight"] == 0  # the slot came back
        replicas.hold = 0.2
        first = asyncio.create_task(ingress.respond("POST", "/v1/generate", {}, auth, "10.0.0.1", BODY))
        await asyncio.sleep(0.05)
        reader = Reader(len(BODY))
        assert (await ingress.respond("POST", "/v1/generate", {}, auth, "10.0.0.1", reader))[0] == 429
        assert reader.read == 0 and (await first)[0] == 200

    asyncio.run(main())
    assert replicas.paths == ["/v1/generate"]


def test_health_is_answered_by_the_ingress_and_a_flood_costs_keyed_clients_nothing(
        caplog: pytest.LogCaptureFixture) -> None:
    replicas = Replicas(hold=0.05)
    ingress = _ingress(replicas, keys=Keys.of([KEY_A]), max_in_flight=2)

    async def main() -> tuple[list[int], list[int]]:
        flood = [asyncio.create_task(ingress.respond("GET", "/v1/health", {}, (), "10.0.0.66", b""))
                 for _ in range(64 * 4)]
        keyed = [await ingress.respond("POST", "/v1/generate", {}, (f"Bearer {KEY_A}",), "10.0.0.1", BODY)
                 for _ in range(4)]
        return [s for s, _, _ in await asyncio.gather(*flood)], [s for s, _, _ in keyed]

    with caplog.at_level(logging.INFO, logger="ray.serve"):
        health, keyed = asyncio.run(main())
    assert keyed == [200] * 4
    assert replicas.paths == ["/v1/generate"] * 4  # no health check reached a model replica
    assert health.count(200) == ingress_module.OPEN_BURST and set(health) == {200, 429}
    other = asyncio.run(ingress.respond("GET", "/v1/health", {}, (), "10.0.0.2", b""))
    assert other[0] == 200 and other[1]["status"] == "ok"  # the flooding address is limited, not others


def test_an_open_path_429_is_held_back_and_only_so_many_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A flooding address waits REFUSAL_HOLD_S for each 429 (a waiting client sends nothing meanwhile), at most
    HELD_REFUSALS at once; other addresses are answered at once all the while."""
    monkeypatch.setattr(ingress_module, "REFUSAL_HOLD_S", 0.5)
    monkeypatch.setattr(ingress_module, "HELD_REFUSALS", 8)
    ingress = _ingress(Replicas(), keys=Keys.of([KEY_A]), max_in_flight=2)

    async def timed(address: str) -> tuple[int, float]:
        start = time.perf_counter()
        status = (await ingress.respond("GET", "/v1/health", {}, (), address, b""))[0]
        return status, time.perf_counter() - start

    async def main() -> tuple[list[tuple[int, float]], tuple[int, float], int]:
        for _ in range(ingress_module.OPEN_BURST):  # the address's burst, spent
            assert (await timed("10.0.0.66"))[0] == 200
        flood = [asyncio.create_task(timed("10.0.0.66")) for _ in range(12)]
        await asyncio.sleep(0.05)
        held = ingress.held_refusals
        other = await timed("10.0.0.2")
        return list(await asyncio.gather(*flood)), other, held

    flood, other, held = asyncio.run(main())
    assert held == 8 and other[0] == 200 and other[1] < 0.25
    assert [s for s, _ in flood] == [429] * 12
    assert sorted(t >= 0.45 for _, t in flood) == [False] * 4 + [True] * 8  # 8 held, 4 answered at once
    assert ingress.held_refusals == 0


class Board:
    """The access and stats actors as the ingress reads them."""

    def __init__(self, values: dict[str, Any]) -> None:
        self.values = values
        self.get = self

    async def remote(self, max_age: float | None = None) -> dict[str, Any]:
        return self.values


def test_health_follows_the_replicas_that_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    ray = pytest.importorskip("ray")
    policy = Board({"policy": AccessPolicy().config()})
    stats = Board({})
    monkeypatch.setattr(ray, "get_actor", lambda name, namespace: policy if name == "access" else stats)
    monkeypatch.setattr(ingress_module, "POLICY_POLL_S", 0.0)
    ingress = Ingress(Replicas(), ("access", "ns"), ("stats", "ns", 10.0))

    def health() -> tuple[int, dict[str, Any]]:
        status, payload, _ = asyncio.run(ingress.respond("GET", "/v1/health", {}, (), "10.0.0.1", b""))
        return status, payload

    assert health() == (503, {"status": "unavailable", "error": "no model replica is ready"})
    stats.values = {"replica-1": {}, "replica-2": {}}
    assert health() == (200, {"status": "ok", "replicas_ready": 2})
    assert asyncio.run(ingress.respond("POST", "/v1/health", {}, (), "10.0.0.1", b""))[0] == 405


def test_requests_arriving_during_a_policy_read_wait_for_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """The keys are dropped on the board; 4 requests arrive at once when a read is due: every one is judged by
    the new policy (none by the old one while the read is on its way)."""
    ray = pytest.importorskip("ray")
    board = Board({"policy": AccessPolicy(Keys.of([KEY_A])).config()})
    reads = []

    async def slow_read(max_age: float | None = None) -> dict[str, Any]:
        reads.append(1)
        await asyncio.sleep(0.05)
        return board.values

    board.remote = slow_read  # type: ignore[method-assign]
    monkeypatch.setattr(ray, "get_actor", lambda name, namespace: board)
    monkeypatch.setattr(ingress_module, "POLICY_POLL_S", 0.2)
    ingress = Ingress(Replicas(), ("access", "ns"))

    async def main() -> list[int]:
        assert (await ingress.respond("POST", "/v1/generate", {}, (), "10.0.0.1", BODY))[0] == 401
        board.values = {"policy": AccessPolicy().config()}  # no keys any more
        await asyncio.sleep(0.25)
        answers = await asyncio.gather(*(ingress.respond("POST", "/v1/generate", {}, (), "10.0.0.1", BODY)
                                         for _ in range(4)))
        return [status for status, _, _ in answers]

    assert asyncio.run(main()) == [200] * 4 and len(reads) == 2  # one read for the four


def test_stats_board_drops_a_silent_replica(monkeypatch: pytest.MonkeyPatch) -> None:
    from ccld_trt.cluster import app

    clock = Clock()
    monkeypatch.setattr(app.time, "monotonic", clock)
    board = app.StatsBoard()
    board.put("a", {"requests_in_flight": 3})
    clock.now += app.REPLICA_STALE_S / 2
    board.put("b", {"requests_in_flight": 1})
    assert set(board.get(app.REPLICA_STALE_S)) == {"a", "b"}
    clock.now += app.REPLICA_STALE_S / 2 + 0.1
    assert set(board.get(app.REPLICA_STALE_S)) == {"b"} and set(board.get()) == {"a", "b"}


def test_local_ray_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(UserError, match="RAY_AUTH_MODE=disabled turns off Ray's token auth"):
        check_auth_mode({"RAY_AUTH_MODE": "Disabled"}, insecure=False)
    warning = check_auth_mode({"RAY_AUTH_MODE": "disabled"}, insecure=True)
    assert warning is not None and warning.startswith("warning: --insecure")
    assert check_auth_mode({}, insecure=False) is None and check_auth_mode({"RAY_AUTH_MODE": "token"}, False) is None
    assert trusted_proxies(["10.0.0.5", " 10.1.0.0/16", "::1"]) == ("10.0.0.5/32", "10.1.0.0/16", "::1/128")
    with pytest.raises(UserError, match=r"--trusted-proxy 'proxy\.example' is not an IP"):
        trusted_proxies(["proxy.example"])
    for host, loopback in (("127.0.0.1", True), ("::1", True), ("::ffff:127.0.0.1", True), ("0.0.0.0", False),
                           ("::", False), ("192.0.2.2", False), ("*", False)):
        assert is_loopback_address(host) is loopback, host
    environ = {access.KEY_ENV: KEY_A, "HOME": "/root"}
    forget_env_key(environ)
    assert environ == {"HOME": "/root"}


def test_cluster_cli_refuses_ray_auth_disabled_before_starting_anything(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from ccld_trt.cli import run
    from ccld_trt.cluster import app

    started: list[Any] = []
    monkeypatch.setattr(app, "run_cluster", lambda *a, **k: started.append(k))
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert run(["cluster", "--models", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "RAY_AUTH_MODE=disabled" in err and err.count("\n") == 1 and started == []
    assert run(["cluster", "--models", str(tmp_path), "--insecure", "--trusted-proxy", "10.0.0.0/8",
                "--keep-ray-logs"]) == 0
    assert "warning: --insecure" in capsys.readouterr().err
    assert started[0]["trusted"] == ("10.0.0.0/8",) and started[0]["keep_ray_logs"] is True
    monkeypatch.delenv("RAY_AUTH_MODE")
    assert run(["cluster", "--models", str(tmp_path), "--trusted-proxy", "nginx"]) == 1
    assert "--trusted-proxy 'nginx'" in capsys.readouterr().err


def test_json_body_log_prompts_still_work(caplog: pytest.LogCaptureFixture) -> None:
    ingress = _ingress(Replicas(), log_prompts=True)
    with caplog.at_level(logging.INFO, logger="ray.serve"):
        asyncio.run(ingress.respond("POST", "/v1/generate", {}, (), "127.0.0.1", Reader(0)))
        asyncio.run(ingress.respond("POST", "/v1/generate", {}, (), "127.0.0.1", BODY))
    assert caplog.records[-1].getMessage().endswith(f" prompts={json.dumps(['a cat:3'])}")

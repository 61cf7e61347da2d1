"""Keys, the host rule, the per-client limit and the cluster's ingress, without Ray or models (fast).

The ingress is driven through ``Ingress.respond`` with a fake model deployment that counts what runs and holds
requests until released, so admission and fairness are checked exactly; tests/test_access_cluster.py checks the
same on a real Ray cluster with images against solo runs.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
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
    check_exposure,
    default_client_limit,
    key_id,
    load_keys,
    page_login,
)
from ccld_trt.cli import run
from ccld_trt.cluster.ingress import Ingress
from ccld_trt.export.errors import UserError
from ccld_trt.fair_share import InFlightLimiter

KEY_A = "a" * 24 + "0123456789abcdef"
KEY_B = "b" * 24 + "fedcba9876543210"


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    path.chmod(0o600)  # as docs/security.md says (a file others may read is loaded with a warning)
    return path


def test_key_file_lines_comments_and_ids(tmp_path: Path) -> None:
    path = _write(tmp_path / "keys", f"# clients\n\n  {KEY_A}  \n# {KEY_B} revoked\n{KEY_B}\n{KEY_A}\n")
    keys = load_keys(path, environ={access.KEY_ENV: "ignored-when-a-file-is-given"})
    assert keys.ids == (key_id(KEY_A), key_id(KEY_B))  # the duplicate line counts once
    assert keys.identify(KEY_A) == key_id(KEY_A) and keys.identify(KEY_B) == key_id(KEY_B)
    for name in keys.ids:
        assert name.startswith("key-") and len(name) == 12
    stored = repr(keys) + str(AccessPolicy(keys).config())
    assert KEY_A not in stored and KEY_B not in stored and KEY_A[-8:] not in stored


@pytest.mark.parametrize(("text", "words"), [
    ("", "holds no key"),
    ("# only a comment\n\n   \n", "holds no key"),
    ("short-key\n", "line 1: a key must have at least 16 characters"),
    (f"{KEY_A}\n{KEY_A[:10]} {KEY_A[10:]}\n", "line 2: a key must be one word"),
])
def test_bad_key_files_are_one_line_without_the_key(tmp_path: Path, text: str, words: str) -> None:
    path = _write(tmp_path / "keys", text)
    with pytest.raises(UserError, match=words) as info:
        load_keys(path, environ={})
    message = str(info.value)
    assert "\n" not in message and KEY_A[:10] not in message and "short-key" not in message


def test_unreadable_key_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"--api-key-file .*missing: cannot read it \(No such file"):
        load_keys(tmp_path / "missing", environ={})
    with pytest.raises(UserError, match="cannot read it"):
        load_keys(tmp_path, environ={})  # a directory


def test_key_file_watcher_sees_a_revoked_line(tmp_path: Path) -> None:
    import os

    path = _write(tmp_path / "keys", f"{KEY_A}\n{KEY_B}\n")
    watcher = KeyFileWatcher(path)
    assert watcher.poll() is None  # unchanged
    _write(path, f"{KEY_A}\n# {KEY_B} revoked\n")
    os.utime(path, ns=(1, 1))  # a different time even where the clock's resolution is coarse
    keys = watcher.poll()
    assert keys is not None and keys.ids == (key_id(KEY_A),) and keys.identify(KEY_B) is None
    assert watcher.poll() is None
    _write(path, "# nobody\n")
    with pytest.raises(UserError, match="holds no key"):
        watcher.poll()
    path.unlink()
    with pytest.raises(UserError, match="cannot read it"):
        watcher.poll()


def test_key_from_the_environment() -> None:
    assert load_keys(None, environ={access.KEY_ENV: f" {KEY_B}\n"}).identify(KEY_B) == key_id(KEY_B)
    assert not load_keys(None, environ={})
    assert not load_keys(None, environ={access.KEY_ENV: "  "})
    with pytest.raises(UserError, match=r"\$CCLD_TRT_API_KEY: a key must have at least 16"):
        load_keys(None, environ={access.KEY_ENV: "tiny"})


def test_identify_compares_every_key_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    keys = Keys.of([KEY_A, KEY_B])
    last_byte = KEY_A[:-1] + chr(ord(KEY_A[-1]) + 1)
    for wrong in ("", KEY_A[:-1], last_byte, KEY_A + "0", KEY_A.upper(), " " + KEY_A):
        assert keys.identify(wrong) is None, wrong
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(access.hmac, "compare_digest", counting)
    assert keys.identify(KEY_A) == key_id(KEY_A)  # found first, yet the second key is compared too
    assert len(calls) == 2 and all(len(a) == len(b) == 32 for a, b in calls)


def test_page_login_takes_any_user_name_and_a_key() -> None:
    check = page_login(Keys.of([KEY_A]))
    assert check("anyone", KEY_A) and check("", KEY_A)
    assert not check("admin", KEY_A[:-1] + "x") and not check(KEY_A, "") and not check("admin", KEY_B)


def test_authenticate() -> None:
    keys = Keys.of([KEY_A, KEY_B])
    assert authenticate(Keys(), (), {}, "10.0.0.7") == "10.0.0.7"  # no keys: clients are addresses
    assert authenticate(keys, (f"Bearer {KEY_B}",), {}, "10.0.0.7") == key_id(KEY_B)
    assert authenticate(keys, (f"bearer  {KEY_A} ",), {}, "10.0.0.7") == key_id(KEY_A)
    for header in (None, "", "Bearer", KEY_A, f"Basic {KEY_A}", f"Bearer {KEY_A[:-1]}",
                   f"Bearer {KEY_A[:-1]}{chr(ord(KEY_A[-1]) ^ 1)}"):
        refusal = authenticate(keys, () if header is None else (header,), {}, "10.0.0.7")
        assert isinstance(refusal, Refusal) and refusal.status == 401, header
        assert refusal.headers["WWW-Authenticate"].startswith("Bearer") and "\n" not in refusal.error
    in_url = authenticate(keys, (), {"api_key": KEY_A}, "10.0.0.7")
    assert isinstance(in_url, Refusal) and in_url.status == 401 and "URL is refused" in in_url.error
    assert KEY_A not in in_url.error
    both = authenticate(keys, f"Bearer {KEY_A}", {"token": KEY_A}, "10.0.0.7")
    assert isinstance(both, Refusal) and both.status == 400


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_loopback_needs_neither_listen_nor_key(host: str) -> None:
    assert check_exposure(host, False, Keys(), False) is None
    assert check_exposure(host, True, Keys(), False) is None


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.5", "example.org"])
def test_other_hosts_need_listen_and_a_key_or_insecure(host: str) -> None:
    for keys in (Keys(), Keys.of([KEY_A])):
        with pytest.raises(UserError, match="add --listen"):
            check_exposure(host, False, keys, insecure=True)
    with pytest.raises(UserError, match=r"needs a key: --api-key-file FILE or \$CCLD_TRT_API_KEY"):
        check_exposure(host, True, Keys(), insecure=False)
    assert check_exposure(host, True, Keys.of([KEY_A]), insecure=False) is None
    warning = check_exposure(host, True, Keys(), insecure=True)
    assert warning is not None and warning.startswith("warning: --insecure") and "\n" not in warning


def _no_ray(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make starting anything fail the test: returns the list of what tried."""
    started: list[str] = []
    import ccld_trt.cluster.app as app
    import ccld_trt.serve as serve

    monkeypatch.setattr(app, "start_ray", lambda *a, **k: started.append("ray"))
    monkeypatch.setattr(app, "deploy", lambda *a, **k: started.append("deploy"))
    monkeypatch.setattr(serve, "ModelLoader", lambda *a, **k: started.append("models"))
    return started


@pytest.mark.parametrize("command", ["serve", "cluster"])
@pytest.mark.parametrize(("flags", "env", "words"), [
    (["--host", "0.0.0.0"], {}, "add --listen"),
    (["--host", "10.1.2.3", "--listen"], {}, "needs a key"),
    (["--host", "0.0.0.0", "--api-key-file", "KEYS"], {}, "add --listen"),
    (["--host", "0.0.0.0", "--listen", "--api-key-file", "MISSING"], {}, "cannot read it"),
    (["--host", "0.0.0.0", "--listen", "--api-key-file", "EMPTY"], {}, "holds no key"),
])
def test_cli_host_rule_refuses_in_one_line_and_starts_nothing(
        command: str, flags: list[str], env: dict[str, str], words: str, tmp_path: Path,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    started = _no_ray(monkeypatch)
    monkeypatch.delenv(access.KEY_ENV, raising=False)
    files = {"KEYS": _write(tmp_path / "keys", KEY_A), "EMPTY": _write(tmp_path / "empty", "#\n"),
             "MISSING": tmp_path / "missing"}
    argv = [command, *(str(files.get(f, f)) for f in flags), "--models", str(tmp_path)]
    assert run(argv) == 1
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1, err
    assert not started


@pytest.mark.parametrize("command", ["serve", "cluster"])
def test_cli_insecure_warns_and_a_key_passes_the_host_rule(command: str, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(access.KEY_ENV, raising=False)
    # past the host rule, the next check fails: no model files in tmp_path (nothing loads)
    started = _no_ray(monkeypatch)
    assert run([command, "--host", "0.0.0.0", "--listen", "--insecure", "--models", str(tmp_path)]) == 1
    out = capsys.readouterr()
    assert "warning: --insecure" in out.out + out.err and "missing model file(s)" in out.err
    monkeypatch.setenv(access.KEY_ENV, KEY_B)
    assert run([command, "--host", "0.0.0.0", "--listen", "--models", str(tmp_path)]) == 1
    out = capsys.readouterr()
    assert "missing model file(s)" in out.err and "warning" not in out.out + out.err
    assert not started


def test_no_key_on_the_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        run(["cluster", "--api-key", KEY_A])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "a key on the command line is visible" in err and KEY_A not in err and err.count("\n") == 1


def test_limiter_counts_per_client() -> None:
    limiter = InFlightLimiter(2)
    assert [limiter.acquire("a") for _ in range(3)] == [True, True, False]
    assert limiter.acquire("b")
    assert limiter.retry_after("a") == 1  # nothing finished yet: the shortest wait
    limiter.release("a", 7.2, ok=True)
    assert limiter.acquire("a") and not limiter.acquire("a")
    assert limiter.retry_after("a") == 8
    limiter.release("b", 1.0, ok=False)
    assert limiter.snapshot() == {
        "a": {"in_flight": 2, "accepted": 3, "refused": 2, "finished": 1, "failed": 0, "mean_seconds": 7.2},
        "b": {"in_flight": 0, "accepted": 1, "refused": 0, "finished": 1, "failed": 1, "mean_seconds": 1.0}}
    assert InFlightLimiter(None).acquire("c")
    assert default_client_limit(2 * 8) == 8 and default_client_limit(1) == 1


def test_access_line() -> None:
    line = access_line(1700000000.25, "key-12345678", "POST", "/v1/generate", 200, 2, 3.14159)
    assert line == ("2023-11-14T22:13:20.250Z client=key-12345678 POST /v1/generate status=200 images=2 "
                    "seconds=3.142")
    assert access_line(0, "c", "POST", "/", 200, 0, 0, ["a cat:2"]).endswith(' prompts=["a cat:2"]')


class FakeReplicas:
    """The model deployment as the ingress sees it: each /v1/generate waits for ``release`` (an Event)."""

    def __init__(self) -> None:
        self.generated: list[bytes] = []
        self.release = asyncio.Event()
        self.run_request = self  # handle.run_request.remote(...)

    async def remote(self, method: str, path: str, body: bytes) -> tuple[int, dict[str, Any]]:
        if path == "/v1/health":
            return 200, {"status": "ok"}
        if path == "/v1/stats":
            return 200, {"total": {"requests_done": len(self.generated)}}
        self.generated.append(body)
        await self.release.wait()
        return 200, {"images": ["png"] * 2}


def _ingress(**policy: Any) -> tuple[Ingress, FakeReplicas]:
    replicas = FakeReplicas()
    ingress = Ingress(replicas)
    ingress.reconfigure(AccessPolicy(**policy).config())
    return ingress, replicas


BODY = b'{"prompts": ["a secret prompt:3"], "steps": 2}'


def test_ingress_refuses_without_the_right_key_and_nothing_runs(caplog: pytest.LogCaptureFixture) -> None:
    ingress, replicas = _ingress(keys=Keys.of([KEY_A]))
    replicas.release.set()

    async def main() -> None:
        for header, query in ((None, {}), ("Bearer wrong-key-of-enough-length", {}),
                              (f"Bearer {KEY_A[:-1]}x", {}), (None, {"api_key": KEY_A}), (None, {"key": KEY_A})):
            status, payload, headers = await ingress.respond("POST", "/v1/generate", query, header, "10.0.0.9", BODY)
            assert status == 401 and list(payload) == ["error"] and "WWW-Authenticate" in headers
            assert (await ingress.respond("GET", "/v1/stats", query, header, "10.0.0.9", b""))[0] == 401
        assert (await ingress.respond("GET", "/v1/health", {}, None, "10.0.0.9", b""))[0] == 200
        status, payload, _ = await ingress.respond("POST", "/v1/generate", {}, f"Bearer {KEY_A}", "10.0.0.9", BODY)
        assert status == 200 and payload["images"] == ["png", "png"]

    with caplog.at_level(logging.INFO, logger="ray.serve"):
        asyncio.run(main())
    assert replicas.generated == [BODY]  # only the request with the right key ran
    assert ingress.stats()["unauthorized"] == 10
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 12 and all("status=401 images=0" in line and "client=10.0.0.9" in line
                                    for line in lines[:10])
    assert f"client={key_id(KEY_A)} POST /v1/generate status=200 images=2" in lines[-1]
    assert not any("secret" in line or KEY_A in line for line in lines)  # no prompt text, no key


def test_ingress_logs_prompts_only_when_asked(caplog: pytest.LogCaptureFixture) -> None:
    ingress, replicas = _ingress(log_prompts=True)
    replicas.release.set()
    with caplog.at_level(logging.INFO, logger="ray.serve"):
        asyncio.run(ingress.respond("POST", "/v1/generate", {}, None, "127.0.0.1", BODY))
    assert caplog.records[-1].getMessage().endswith('prompts=["a secret prompt:3"]')


def test_ingress_fair_share_holds_across_replicas() -> None:
    """A sends 12 at once with a limit of 4: 4 run (on whichever replicas), 8 get 429 with Retry-After; B, later,
    is admitted at once and runs while A's are still running."""
    ingress, replicas = _ingress(keys=Keys.of([KEY_A, KEY_B]), max_in_flight=4)

    async def main() -> None:
        a = [asyncio.create_task(ingress.respond("POST", "/v1/generate", {}, f"Bearer {KEY_A}", "10.0.0.1", BODY))
             for _ in range(12)]
        await asyncio.sleep(0.05)
        refused = [t.result() for t in a if t.done()]
        assert len(refused) == 8 and all(s == 429 and int(h["Retry-After"]) >= 1 for s, _, h in refused)
        assert "4 request(s) in flight" in refused[0][1]["error"]
        b = asyncio.create_task(ingress.respond("POST", "/v1/generate", {}, f"Bearer {KEY_B}", "10.0.0.1", BODY))
        await asyncio.sleep(0.05)
        assert len(replicas.generated) == 5 and not b.done()  # B is running beside A's four
        status, stats, _ = await ingress.respond("GET", "/v1/stats", {}, f"Bearer {KEY_B}", "10.0.0.1", b"")
        assert status == 200 and stats["total"] == {"requests_done": 5} and stats["max_in_flight_per_client"] == 4
        assert stats["clients"][key_id(KEY_A)] | {"mean_seconds": 0} == {
            "in_flight": 4, "accepted": 4, "refused": 8, "finished": 0, "failed": 0, "mean_seconds": 0}
        assert stats["clients"][key_id(KEY_B)]["in_flight"] == 1 and KEY_A not in str(stats)
        replicas.release.set()
        assert (await b)[0] == 200 and [(await t)[0] for t in a].count(200) == 4
        assert ingress.limiter.snapshot()[key_id(KEY_A)]["in_flight"] == 0

    asyncio.run(main())


def test_ingress_gives_the_slot_back_when_a_replica_fails() -> None:
    ingress, replicas = _ingress(max_in_flight=1)

    async def broken(method: str, path: str, body: bytes) -> Any:
        raise RuntimeError("The actor died unexpectedly before finishing this task.\nmore")

    replicas.remote = broken  # type: ignore[method-assign]
    for _ in range(2):
        status, payload, _ = asyncio.run(ingress.respond("POST", "/v1/generate", {}, None, "127.0.0.1", BODY))
        assert status == 503 and "RuntimeError" in payload["error"]  # not 429: the first one's slot came back
    assert ingress.limiter.snapshot()["127.0.0.1"]["failed"] == 2


class FakeBoard:
    """The access actor as the ingress reads it (``ray.get_actor(...).get.remote()``)."""

    def __init__(self, policy: AccessPolicy) -> None:
        self.config = {"policy": policy.config()}
        self.get = self

    async def remote(self) -> dict[str, Any]:
        return self.config


def test_ingress_follows_the_policy_board(monkeypatch: pytest.MonkeyPatch) -> None:
    """A key deleted from the board is refused at the next read; without a readable board nothing is served."""
    ray = pytest.importorskip("ray")
    import ccld_trt.cluster.ingress as ingress_module

    board = FakeBoard(AccessPolicy(Keys.of([KEY_A, KEY_B])))
    monkeypatch.setattr(ray, "get_actor", lambda name, namespace: board)
    monkeypatch.setattr(ingress_module, "POLICY_POLL_S", 0.0)
    replicas = FakeReplicas()
    replicas.release.set()
    ingress = Ingress(replicas, ("ccld-trt-access", "ccld-trt"))

    def status(key: str) -> int:
        return asyncio.run(ingress.respond("POST", "/v1/generate", {}, f"Bearer {key}", "10.0.0.1", BODY))[0]

    assert status(KEY_B) == 200
    board.config = {"policy": AccessPolicy(Keys.of([KEY_A])).config()}  # B's line deleted
    assert status(KEY_B) == 401 and status(KEY_A) == 200

    def unreadable(name: str, namespace: str) -> Any:
        raise ValueError(f"Failed to look up actor with name '{name}'")

    monkeypatch.setattr(ray, "get_actor", unreadable)
    assert status(KEY_A) == 200 and status(KEY_B) == 401  # the last policy read stays
    fresh = Ingress(replicas, ("ccld-trt-access", "ccld-trt"))
    before = len(replicas.generated)
    assert asyncio.run(fresh.respond("POST", "/v1/generate", {}, f"Bearer {KEY_A}", "10.0.0.1", BODY))[0] == 503
    assert asyncio.run(fresh.respond("GET", "/v1/health", {}, None, "10.0.0.1", b""))[0] == 200
    assert len(replicas.generated) == before  # fail closed: nothing ran

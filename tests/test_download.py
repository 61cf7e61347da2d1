"""`ccld-trt download` through the real huggingface_hub and pooch, against local servers laid out like the hub.

The hub answers ``/{repo}/resolve/{revision}/{file}`` as huggingface.co does: an LFS file (the checkpoints) with a
302 to a storage host carrying ``X-Linked-Etag`` (its SHA-256) and ``X-Linked-Size``; a plain file (the YAML)
with 200 and its git blob id as ETag. A second server plays the storage host and the CLOOB host, with byte
ranges. Nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from ccld_trt.download import HF_FILES, download_models
from ccld_trt.export.errors import UserError
from ccld_trt.export.file_digests import safetensors_source, sha256_file

COMMIT = "3f1c0ffee0ddba11cafe0123456789abcdef0123"


@dataclass
class Route:
    """What one path answers: a body (ranges honoured) or a redirect, with extra headers."""

    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    location: str | None = None
    break_once: bool = False  # the first GET sends half the body, then closes the connection


class FakeServer(ThreadingHTTPServer):
    """A ThreadingHTTPServer on 127.0.0.1 (free port) that serves ``routes`` and logs every request."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.routes: dict[str, Route] = {}
        self.log: list[tuple[str, str, str | None]] = []  # (method, path, Range header)
        self.lock = threading.Lock()
        self.url = f"http://127.0.0.1:{self.server_address[1]}"

    def requests(self, method: str | None = None) -> list[tuple[str, str, str | None]]:
        with self.lock:
            return [r for r in self.log if method is None or r[0] == method]


class _Handler(BaseHTTPRequestHandler):
    server: FakeServer
    timeout = 10  # a stuck client cannot hold a handler thread for ever

    def do_HEAD(self) -> None:
        self._answer(send_body=False)

    def do_GET(self) -> None:
        self._answer(send_body=True)

    def log_message(self, format: str, *args: object) -> None:
        pass  # quiet: the requests are kept in server.log

    def _answer(self, send_body: bool) -> None:
        path = urlsplit(self.path).path
        with self.server.lock:
            self.server.log.append((self.command, path, self.headers.get("Range")))
            route = self.server.routes.get(path)
        if route is None:
            self.send_response(404)
            self.send_header("X-Error-Code", "EntryNotFound")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if route.location is not None:
            self.send_response(302)
            self.send_header("Location", route.location)
            self.send_header("Content-Length", "0")
            self._extra_headers(route)
            self.end_headers()
            return
        start = int(self.headers["Range"].removeprefix("bytes=").split("-")[0]) if "Range" in self.headers else 0
        data = route.body[start:]
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(route.body) - 1}/{len(route.body)}")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Accept-Ranges", "bytes")
        self._extra_headers(route)
        self.end_headers()
        if not send_body:
            return
        if route.break_once:
            route.break_once = False
            self.wfile.write(data[:len(data) // 2])
            self.wfile.flush()
            self.close_connection = True  # the client sees the body end early
            return
        self.wfile.write(data)

    def _extra_headers(self, route: Route) -> None:
        for key, value in route.headers.items():
            self.send_header(key, value)


@dataclass
class Site:
    """The hub and the storage/CLOOB host, serving ``source`` (demo weights); ``config`` points at the CLOOB URL."""

    hub: FakeServer
    cdn: FakeServer
    source: Path
    config: Path
    cloob_name: str

    def cdn_path(self, name: str) -> str:
        return f"/blobs/{sha256(self.source / name)}"

    def cloob_route(self) -> Route:
        return self.cdn.routes[f"/cloob/{self.cloob_name}"]


@functools.cache
def read(path: Path) -> bytes:
    """The bytes of a (source) file, read once per test session."""
    return path.read_bytes()


def sha256(path: Path) -> str:
    return hashlib.sha256(read(path)).hexdigest()


def resolve_path(repo: str, name: str) -> str:
    return f"/{repo}/resolve/main/{name}"


def _serve(server: FakeServer) -> threading.Thread:
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    return thread


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from ccld_trt.export.demo_weights import write_demo_weights

    directory = tmp_path_factory.mktemp("source")
    write_demo_weights(directory, "small", seed=3)
    return directory


@contextmanager
def running_site(source: Path, workdir: Path) -> Iterator[Site]:
    """Both servers running in threads, serving ``source``; shut down (threads joined) on exit."""
    hub, cdn = FakeServer(), FakeServer()
    threads = [_serve(hub), _serve(cdn)]
    try:
        for repo, name in HF_FILES:
            body = read(source / name)
            common = {"X-Repo-Commit": COMMIT}
            if name.endswith(".ckpt"):  # LFS: the hub redirects to storage and names the content by SHA-256
                digest = hashlib.sha256(body).hexdigest()
                hub.routes[resolve_path(repo, name)] = Route(
                    location=f"{cdn.url}/blobs/{digest}",
                    headers={**common, "X-Linked-Etag": f'"{digest}"', "X-Linked-Size": str(len(body)),
                             "ETag": f'"{hashlib.sha1(body).hexdigest()}"'})
                cdn.routes[f"/blobs/{digest}"] = Route(body=body, headers={"ETag": f'"{digest}"'})
            else:  # a plain git file: served by the hub itself, ETag = git blob id
                blob_id = hashlib.sha1(b"blob %d\0" % len(body) + body).hexdigest()
                hub.routes[resolve_path(repo, name)] = Route(body=body, headers={**common, "ETag": f'"{blob_id}"'})
        cloob = read(source / "cloob.pkl")
        cloob_name = f"cloob_small-{hashlib.sha256(cloob).hexdigest()}.pkl"
        cdn.routes[f"/cloob/{cloob_name}"] = Route(body=cloob)
        config = workdir / "cloob_config.json"
        config.write_text(json.dumps({**json.loads((source / "cloob_config.json").read_text()),
                                      "url": f"{cdn.url}/cloob/{cloob_name}"}))
        yield Site(hub, cdn, source, config, cloob_name)
    finally:
        for server in (hub, cdn):
            server.shutdown()
            server.server_close()
        for thread in threads:
            thread.join(timeout=5)


@pytest.fixture
def site(source: Path, tmp_path: Path) -> Iterator[Site]:
    with running_site(source, tmp_path) as s:
        yield s


@dataclass
class FirstDownload:
    """One download into an empty directory, and the requests it made."""

    models: Path
    paths: list[Path]
    hub_log: list[tuple[str, str, str | None]]
    cdn_log: list[tuple[str, str, str | None]]
    site: Site


@pytest.fixture(scope="module")
def first(source: Path, tmp_path_factory: pytest.TempPathFactory) -> FirstDownload:
    workdir = tmp_path_factory.mktemp("first")
    with running_site(source, workdir) as s:
        paths = download_models(workdir / "models", str(s.config), endpoint=s.hub.url)
        return FirstDownload(workdir / "models", paths, s.hub.requests(), s.cdn.requests(), s)


def prefilled(first: FirstDownload, models: Path, *missing: str) -> Path:
    """``models`` holding what ``first`` downloaded, with huggingface_hub's records of it, except ``missing``."""
    for src in first.models.rglob("*"):
        if src.is_file() and not src.name.startswith(missing):  # also drops "<missing>.metadata" records
            dst = models / src.relative_to(first.models)
            dst.parent.mkdir(parents=True, exist_ok=True)
            if src.stat().st_size > 1 << 20:
                os.link(src, dst)  # cheap; the downloaders replace files, never write into them
            else:  # small records huggingface_hub rewrites in place: a copy, so that ``first`` stays as it was
                shutil.copy2(src, dst)
    return models


@pytest.fixture
def closed_url() -> str:
    """An address on 127.0.0.1 where nothing listens (connections are refused at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def expected_names(site: Site) -> list[str]:
    return [name for _, name in HF_FILES] + [site.cloob_name]


def assert_identical(site: Site, paths: list[Path], models: Path) -> None:
    assert paths == [models / name for name in expected_names(site)]
    sources = [site.source / name for _, name in HF_FILES] + [site.source / "cloob.pkl"]
    for path, src in zip(paths, sources, strict=True):
        assert path.read_bytes() == read(src), path.name


def assert_downloaded_then_converted(site: Site, stdout: str, models: Path) -> None:
    """``ccld-trt download`` prints the four files, then the safetensors copies it made of the two checkpoints."""
    paths = [Path(line) for line in stdout.splitlines()]
    assert_identical(site, paths[:4], models)
    assert paths[4:] == [models / "model_student.safetensors", models / "ae_model.safetensors"]
    for copy in paths[4:]:
        assert safetensors_source(copy)["source_sha256"] == sha256_file(copy.with_suffix(".ckpt"))


def cli_download(models: Path, config: Path, endpoint: str, **env: str) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "ccld_trt", "download", "--models", str(models), "--cloob-config", str(config)],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "HF_ENDPOINT": endpoint, "HF_HOME": str(models.parent / "hf_home"),
             "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", **env})
    return result, time.monotonic() - start


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 1, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def test_downloads_hub_layout_byte_identical(first: FirstDownload) -> None:
    assert_identical(first.site, first.paths, first.models)
    # every hub file was looked up (HEAD /resolve) and its body fetched once, from storage for the LFS files
    heads = [path for method, path, _ in first.hub_log if method == "HEAD"]
    assert set(heads) == {resolve_path(repo, name) for repo, name in HF_FILES}
    fetched = sorted(path for method, path, _ in first.hub_log + first.cdn_log if method == "GET")
    assert fetched == sorted([first.site.cdn_path("model_student.ckpt"), first.site.cdn_path("ae_model.ckpt"),
                              resolve_path("huggan/ccld_wa", "ae_model.yaml"), f"/cloob/{first.site.cloob_name}"])
    assert not any(rng for *_, rng in first.cdn_log)


def test_files_present_are_kept(first: FirstDownload, site: Site, tmp_path: Path) -> None:
    models = prefilled(first, tmp_path / "models")
    mtimes = [(models / name).stat().st_mtime_ns for name in expected_names(site)]
    assert_identical(site, download_models(models, str(site.config), endpoint=site.hub.url), models)
    assert not site.cdn.requests() and {m for m, *_ in site.hub.requests()} == {"HEAD"}  # looked up, not fetched
    assert [(models / name).stat().st_mtime_ns for name in expected_names(site)] == mtimes


def test_files_present_are_kept_offline_at_once(first: FirstDownload, site: Site, closed_url: str,
                                                tmp_path: Path) -> None:
    models = prefilled(first, tmp_path / "models")
    start = time.monotonic()
    assert_identical(site, download_models(models, str(site.config), endpoint=closed_url), models)
    assert time.monotonic() - start < 2.0


def test_corrupted_cloob_file_is_rejected_by_its_sha256(first: FirstDownload, site: Site, tmp_path: Path) -> None:
    route = site.cloob_route()
    route.body = route.body[:100] + bytes([route.body[100] ^ 1]) + route.body[101:]
    models = prefilled(first, tmp_path / "models", site.cloob_name)
    with pytest.raises(UserError, match="failed its SHA-256 check") as info:
        download_models(models, str(site.config), endpoint=site.hub.url)
    assert "\n" not in str(info.value)
    assert len(site.cdn.requests("GET")) == 1  # downloaded once, then rejected
    # nothing is left of it: no file under its name, no temporary file
    assert sorted(p.name for p in models.iterdir() if not p.name.startswith(".")) == sorted(
        name for _, name in HF_FILES)


def test_hub_download_broken_mid_body_resumes_with_a_range(first: FirstDownload, site: Site,
                                                           tmp_path: Path) -> None:
    path = site.cdn_path("model_student.ckpt")
    site.cdn.routes[path].break_once = True
    size = len(site.cdn.routes[path].body)
    models = prefilled(first, tmp_path / "models", "model_student.ckpt")
    assert_identical(site, download_models(models, str(site.config), endpoint=site.hub.url), models)
    ranges = [rng for _, p, rng in site.cdn.requests("GET") if p == path]
    assert len(ranges) == 2 and ranges[0] is None and ranges[1] is not None
    # the second request asks only for what is missing (from the last whole chunk written, within the half sent)
    resumed_at = int(ranges[1].removeprefix("bytes=").removesuffix("-"))
    assert 0 < resumed_at <= size // 2


def test_cloob_download_broken_mid_body_starts_again(first: FirstDownload, site: Site, tmp_path: Path) -> None:
    site.cloob_route().break_once = True
    models = prefilled(first, tmp_path / "models", site.cloob_name)
    assert_identical(site, download_models(models, str(site.config), endpoint=site.hub.url), models)
    assert [rng for _, p, rng in site.cdn.requests("GET")] == [None, None]  # the whole file, twice


def test_partial_cloob_file_from_before_is_replaced(first: FirstDownload, site: Site, tmp_path: Path) -> None:
    models = prefilled(first, tmp_path / "models", site.cloob_name)
    full = site.cloob_route().body
    (models / site.cloob_name).write_bytes(full[:len(full) // 3])
    assert_identical(site, download_models(models, str(site.config), endpoint=site.hub.url), models)
    assert [p for _, p, _ in site.cdn.requests("GET")] == [f"/cloob/{site.cloob_name}"]


@pytest.mark.parametrize("down", ["hub", "cloob host"])
def test_unreachable_server_fails_at_once(first: FirstDownload, site: Site, closed_url: str, tmp_path: Path,
                                          down: str) -> None:
    config = json.loads(site.config.read_text())
    if down == "cloob host":
        config["url"] = f"{closed_url}/cloob/{site.cloob_name}"
    site.config.write_text(json.dumps(config))
    models = prefilled(first, tmp_path / "models", site.cloob_name) if down == "cloob host" else tmp_path / "models"
    start = time.monotonic()
    with pytest.raises(UserError) as info:
        download_models(models, str(site.config), endpoint=closed_url if down == "hub" else site.hub.url)
    # huggingface_hub's back-off alone would take 1 + 2 + 4 + 8 + 8 s; pooch's retries 1 s and more
    assert time.monotonic() - start < 2.0
    message = str(info.value)
    assert "\n" not in message
    for needle in ("offline?", "model_student.ckpt", config["url"], str(models)):
        assert needle in message
    if down == "hub":
        assert not site.hub.requests() and not site.cdn.requests()


def test_missing_hub_file_says_what_the_hub_said(site: Site, tmp_path: Path) -> None:
    del site.hub.routes[resolve_path(*HF_FILES[0])]
    with pytest.raises(UserError, match="download failed: ") as info:
        download_models(tmp_path / "models", str(site.config), endpoint=site.hub.url)
    assert "offline?" not in str(info.value) and "\n" not in str(info.value)


def test_cli_downloads_from_hf_endpoint(first: FirstDownload, site: Site, tmp_path: Path) -> None:
    # $HF_ENDPOINT is read when huggingface_hub is imported, hence a fresh process; the big files are present
    # already (to keep this quick), so the YAML is what comes over
    models = prefilled(first, tmp_path / "models", "ae_model.yaml")
    result, _ = cli_download(models, site.config, site.hub.url)
    assert result.returncode == 0, result.stderr
    assert_downloaded_then_converted(site, result.stdout, models)
    assert [p for m, p, _ in site.hub.requests() if m == "GET"] == [resolve_path("huggan/ccld_wa", "ae_model.yaml")]


def test_cli_offline_is_one_line_at_once(site: Site, closed_url: str, tmp_path: Path) -> None:
    models = tmp_path / "models"
    result, elapsed = cli_download(models, site.config, closed_url)
    line = one_line_error(result)
    assert line.startswith("ccld-trt: error: download failed (") and "offline?" in line and str(models) in line
    assert elapsed < 15.0  # interpreter and torch start-up included; hub back-off would add 23 s


def test_cli_hf_hub_offline_makes_no_request(first: FirstDownload, site: Site, tmp_path: Path) -> None:
    models = tmp_path / "models"
    line = one_line_error(cli_download(models, site.config, site.hub.url, HF_HUB_OFFLINE="1")[0])
    assert "HF_HUB_OFFLINE is set" in line and "model_student.ckpt" in line and str(models) in line
    # with the files present they are kept, still without a request
    models = prefilled(first, tmp_path / "kept")
    result, _ = cli_download(models, site.config, site.hub.url, HF_HUB_OFFLINE="1")
    assert result.returncode == 0, result.stderr
    assert_downloaded_then_converted(site, result.stdout, models)
    assert not site.hub.requests() and not site.cdn.requests()

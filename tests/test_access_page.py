"""The page with a key: Gradio's login takes any user name and a key as the password; without the login,
neither the page's config nor its API answers. An in-process server on 127.0.0.1 whose models "failed to load"
(so a request that gets through is answered at once by the handler, without loading anything)."""

from __future__ import annotations

import json
import shutil
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError

from ccld_trt.access import Keys, page_login
from ccld_trt.benchmarks.cold_start_servers import free_port
from ccld_trt.export.errors import UserError
from ccld_trt.serve import ModelLoader, build_app

KEY = "page-key-" + "5" * 23
OTHER = "page-key-" + "6" * 23
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")



@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    def load() -> Any:
        raise UserError("no models in this test")

    loader = ModelLoader(load, "torch on cpu")
    loader.start()
    app = build_app(loader, demo_weights=False, work_dir=tmp_path_factory.mktemp("page"))
    port = free_port()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, ssr_mode=False,
               auth=page_login(Keys.of([KEY, OTHER])))
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        app.close()


def _status(url: str, data: bytes | None = None) -> int:
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return int(response.status)
    except urllib.error.HTTPError as e:
        return e.code


def _generate(client: Client) -> Any:
    return client.predict("a lighthouse", None, 3.0, 2, "ddim", 0, 1, 2.55, api_name="/generate")


def test_without_login_nothing_answers(page: str) -> None:
    assert _status(page + "config") == 401
    body = json.dumps({"data": ["a lighthouse", None, 3.0, 2, "ddim", 0, 1, 2.55]}).encode()
    assert _status(page + "gradio_api/call/generate", body) == 401
    assert _status(page + "gradio_api/queue/join", body) == 401
    with pytest.raises(Exception, match=r"(?i)login|auth|401"):
        Client(page, verbose=False)


@pytest.mark.parametrize("password", ["", KEY[:-1], KEY[:-1] + "6", KEY + "5", "page-key"])
def test_a_wrong_key_does_not_log_in(page: str, password: str) -> None:
    with pytest.raises(Exception, match=r"(?i)login|auth|incorrect|401"):
        Client(page, auth=("anyone", password), verbose=False)


@pytest.mark.parametrize(("user", "key"), [("alice", KEY), ("bob", OTHER), ("x", KEY)])
def test_a_key_logs_in_with_any_user_name(page: str, user: str, key: str, tmp_path: Path) -> None:
    client = Client(page, auth=(user, key), verbose=False, download_files=str(tmp_path))
    with pytest.raises(AppError, match=r"failed to load.*no models in this test"):  # the handler answered
        _generate(client)


def test_serve_passes_the_login_to_gradio(seed3_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``serve`` with keys launches the page with the key check as ``auth`` (stopped at launch: no models load)."""
    import gradio as gr

    from ccld_trt.export.models import ModelFiles
    from ccld_trt.runner import BackendOptions, ModelSource
    from ccld_trt.serve import serve

    launched: dict[str, Any] = {}

    class Stop(Exception):
        pass

    def launch(self: Any, **kwargs: Any) -> None:
        launched.update(kwargs)
        raise Stop

    monkeypatch.setattr(gr.Blocks, "launch", launch)
    with pytest.raises(Stop):
        serve(BackendOptions(), ModelSource(ModelFiles.resolve(seed3_dir)), keys=Keys.of([KEY]))
    check = launched["auth"]
    assert check("anyone", KEY) and not check("anyone", KEY[:-1] + "6") and not check(KEY, "")
    launched.clear()
    with pytest.raises(Stop):
        serve(BackendOptions(), ModelSource(ModelFiles.resolve(seed3_dir)))
    assert launched["auth"] is None  # loopback without keys: no login, as before


def test_browser_logs_in(page: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Debian's Chromium: the login form, a wrong key refused, the right key shows the page."""
    if CHROMIUM is None:
        pytest.skip("no chromium on PATH (Debian: apt-get install -y chromium)")
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-login")), executable_path=CHROMIUM, headless=True,
            args=["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"])
        try:
            browser_page = context.new_page()
            browser_page.goto(page)
            password = browser_page.locator("input[type=password]")
            expect(password).to_be_visible(timeout=30_000)
            expect(browser_page.locator("#model-status")).to_have_count(0)
            user = browser_page.get_by_role("textbox", name="username")
            login = browser_page.get_by_role("button", name="Login")
            user.fill("someone")
            password.fill(KEY[:-1] + "6")
            login.click()
            expect(browser_page.get_by_text("Incorrect", exact=False)).to_be_visible(timeout=30_000)
            user.fill("someone")  # the form clears it after a failed login
            password.fill(KEY)
            login.click()
            expect(browser_page.locator("#model-status")).to_contain_text("failed to load", timeout=30_000)
        finally:
            context.close()

"""``ccld-trt serve``: the page in headless Chromium, the API through gradio_client, and bad input.

One server (a ``python -m ccld_trt serve`` subprocess on small demo weights) serves the whole module. Jobs use
ddim with two or three steps: a U-Net evaluation per step keeps each generation to a few seconds on a CPU.

The browser test saves a screenshot of the finished page; set CCLD_TRT_SERVE_SCREENSHOT=docs/serve.png to
refresh the one the README shows (CI leaves the committed file alone).
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from ccld_trt.cli import run
from ccld_trt.export.errors import UserError
from ccld_trt.serve import MAX_UPLOAD_PIXELS, ModelLoader, build_app, check_host, generate_for_page, parse_job
from serve_process import JOB_S, STOP_S, Server, free_port, start_long_job, start_server, wait_for

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The module's server, stopped at the end by SIGINT with a long job running, as a user's Ctrl-C would
    (its signal dispositions are this process's: SIGINT may be inherited as ignored, in a background job)."""
    from ccld_trt.export.demo_weights import write_demo_weights

    root = tmp_path_factory.mktemp("serve")
    models = root / "models"
    write_demo_weights(models, "small", seed=0)
    server = start_server(models, root)
    try:
        yield server
        start_long_job(server)  # stopping must not wait for it
    finally:
        status, stopped_s = server.stop(signal.SIGINT)
    assert status == 0, f"the server did not stop cleanly on SIGINT (status {status})\n{server.log()}"
    assert stopped_s < STOP_S, f"stopping took {stopped_s:.1f} s"
    assert server.work_dirs() == [], f"the work directory was left behind\n{server.log()}"


@pytest.fixture(scope="module")
def huge_png(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """5000x5000 (25 megapixels): over the upload limit, though only some kilobytes on disk."""
    path = tmp_path_factory.mktemp("uploads") / "huge.png"
    Image.new("L", (5000, 5000)).save(path)
    assert MAX_UPLOAD_PIXELS < 5000 * 5000
    return path


@pytest.fixture
def client(server: Server, tmp_path: Path) -> Client:
    return Client(server.url, verbose=False, download_files=str(tmp_path))


def generate(client: Client, prompts: str = "a lighthouse at dusk", image: Any = None, image_weight: Any = 3.0,
             steps: Any = 2, method: Any = "ddim", seed: Any = 0, n: Any = 1, scale: Any = 2.55) -> tuple:
    return client.predict(prompts, image, image_weight, steps, method, seed, n, scale, api_name="/generate")


def test_api_generates_images_and_latencies(client: Client, tmp_path: Path) -> None:
    prompt_image = tmp_path / "prompt.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (80, 120, 3), dtype=np.uint8)).save(prompt_image)
    gallery, files, summary = generate(client, "a red house:3\nblue sky:1\n\n", handle_file(str(prompt_image)),
                                       image_weight=2.0, steps=2, seed=7, n=2)
    assert len(gallery) == 2 and len(files) == 2
    for item in gallery:
        with Image.open(item["image"]) as image:
            assert image.format == "PNG" and image.mode == "RGB" and image.size == (256, 256)
            assert np.asarray(image).std() > 0  # not a blank image
    assert [Path(f).name for f in files] == ["out_00000.png", "out_00001.png"]
    for stage in ("conditioning", "sampling", "decoding"):
        assert f"{stage} " in summary
    assert "2 U-Net evaluations" in summary and "seed 7" in summary and "demo weights" in summary


BAD_INPUTS: dict[str, tuple[dict[str, Any], str]] = {
    "empty prompt": ({"prompts": ""}, "enter a prompt or upload an image prompt"),
    "blank lines": ({"prompts": "  \n\n"}, "enter a prompt or upload an image prompt"),
    "weight without text": ({"prompts": ":3"}, "prompt line 1 has no text"),
    "non-numeric weight": ({"prompts": "style: oil"}, "is not a number"),
    "steps 0": ({"steps": 0}, "steps must be >= 1, got 0"),
    "steps 1001": ({"steps": 1001}, "steps must be from 1 to 1000"),
    "fractional steps": ({"steps": 2.5}, "steps must be a whole number"),
    "n 0": ({"n": 0}, "the number of images must be >= 1, got 0"),
    "n 17": ({"n": 17}, "number of images must be from 1 to 16"),
    "negative seed": ({"seed": -1}, r"the seed must be in \[0, 2\*\*63\), got -1"),
    "unknown sampler": ({"method": "euler"}, "the sampler 'euler' is unknown"),
    "zero scale": ({"scale": 0}, "autoencoder scale must be positive"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_api_bad_input_gets_a_message(server: Server, client: Client, case: str) -> None:
    kwargs, message = BAD_INPUTS[case]
    with pytest.raises(AppError, match=message):
        generate(client, **kwargs)
    server.check_alive()


def test_api_bad_uploads_get_a_message(server: Server, client: Client, huge_png: Path, tmp_path: Path) -> None:
    with pytest.raises(AppError, match=r"5000x5000 \(25\.0 megapixels\); the limit is 20 megapixels"):
        generate(client, image=handle_file(str(huge_png)))
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("not pixels")
    with pytest.raises(AppError, match="not an image in a supported format"):
        generate(client, prompts="", image=handle_file(str(not_an_image)))
    truncated = tmp_path / "truncated.png"
    Image.new("RGB", (64, 64), "red").save(tmp_path / "whole.png")
    truncated.write_bytes((tmp_path / "whole.png").read_bytes()[:60])
    with pytest.raises(AppError, match=r"truncated\.png: not a readable image"):
        generate(client, image=handle_file(str(truncated)))
    server.check_alive()
    gallery, _, _ = generate(client, steps=1)  # and it still generates
    assert len(gallery) == 1


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Debian's Chromium, headless, with a fresh profile (never a downloaded browser)."""
    if CHROMIUM is None:
        pytest.skip("no chromium on PATH (Debian: apt-get install -y chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), executable_path=CHROMIUM, headless=True,
            args=CHROMIUM_FLAGS, viewport={"width": 1280, "height": 1000})
        yield context
        context.close()


def open_page(browser: Any, server: Server, requested: list[str]) -> Any:
    from playwright.sync_api import expect

    page = browser.new_page()
    page.on("request", lambda request: requested.append(request.url))
    page.goto(server.url)
    expect(page.locator("#model-status")).to_contain_text("Models ready", timeout=30_000)
    return page


def assert_only_local_requests(requested: list[str], server: Server) -> None:
    host = urlparse(server.url).netloc
    remote = [url for url in requested if not url.startswith(("data:", "blob:")) and urlparse(url).netloc != host]
    assert not remote, f"the page requested other hosts: {remote}"


def test_page_generates_an_image(server: Server, browser: Any, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    requested: list[str] = []
    page = open_page(browser, server, requested)
    expect(page.locator("#demo-warning")).to_contain_text("RANDOM DEMO WEIGHTS")
    page.locator("#prompts textarea").fill("a watercolor painting of a lighthouse at dusk:3")
    steps = page.locator("#steps input[type=number]")
    steps.fill("3")
    steps.blur()
    page.locator("#sampler input").click()
    page.get_by_role("option", name="ddim", exact=True).click()
    # Progress lines come and go while the job runs: record every one the page shows.
    page.evaluate("""() => {
        window.progressSeen = new Set();
        new MutationObserver(() => {
            for (const el of document.querySelectorAll('.progress-text, .progress-level'))
                window.progressSeen.add(el.innerText);
        }).observe(document.body, {subtree: true, childList: true, characterData: true});
    }""")
    page.locator("#generate").click()
    page.wait_for_function("""() => {
        const img = document.querySelector('#gallery img');
        return img !== null && img.complete && img.naturalWidth > 0;
    }""", timeout=JOB_S * 1000)
    size = page.evaluate("() => { const img = document.querySelector('#gallery img'); "
                         "return [img.naturalWidth, img.naturalHeight]; }")
    assert size == [256, 256]
    timings = page.locator("#timings")
    expect(timings).to_contain_text("Latency")
    for stage in ("conditioning", "sampling", "decoding"):
        expect(timings).to_contain_text(f"{stage} ")
    expect(timings).to_contain_text("3 U-Net evaluations")
    expect(page.locator("#files")).to_contain_text("out_00000")
    progress = " | ".join(page.evaluate("() => [...window.progressSeen]"))
    assert "/3 U-Net evaluations" in progress, f"no per-evaluation progress shown: {progress}"
    screenshot = Path(os.environ.get("CCLD_TRT_SERVE_SCREENSHOT") or tmp_path / "serve.png")
    page.screenshot(path=str(screenshot), full_page=True)
    with Image.open(screenshot) as image:
        assert image.width >= 1000
    assert_only_local_requests(requested, server)
    page.close()


def test_preset_buttons_set_their_presets(server: Server, browser: Any) -> None:
    from playwright.sync_api import expect

    from ccld_trt.sampler_names import PRESETS

    page = open_page(browser, server, [])
    steps = page.locator("#steps input[type=number]")
    expect(steps).to_have_value("50")
    for name in ("fast", "balanced", "fast"):
        page.locator(f"#{name}").click()
        method, k = PRESETS[name]
        expect(steps).to_have_value(str(k))
        expect(page.locator("#sampler input")).to_have_value(method)
    page.close()


def test_page_shows_bad_input_messages(server: Server, browser: Any, huge_png: Path) -> None:
    from playwright.sync_api import expect

    requested: list[str] = []
    page = open_page(browser, server, requested)
    page.locator("#generate").click()  # no prompt, no image
    expect(page.get_by_text("enter a prompt or upload an image prompt")).to_be_visible(timeout=30_000)
    page.locator("#prompts textarea").fill("a lighthouse")
    page.locator("#image-prompt input[type=file]").set_input_files(str(huge_png))
    expect(page.locator("#image-prompt img")).to_be_visible(timeout=30_000)  # the upload has landed
    page.locator("#generate").click()
    expect(page.get_by_text("25.0 megapixels")).to_be_visible(timeout=30_000)
    server.check_alive()
    assert_only_local_requests(requested, server)
    page.close()


def test_request_while_loading_gets_a_message(tmp_path: Path) -> None:
    release = threading.Event()

    def load() -> Any:
        release.wait(60)
        raise UserError("model_student.ckpt is corrupt")

    loader = ModelLoader(load, "torch on cpu")
    app = build_app(loader, demo_weights=False, work_dir=tmp_path)
    loader.start()
    port = free_port()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, ssr_mode=False)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False, download_files=str(tmp_path))
        with pytest.raises(AppError, match=r"still loading \(torch on cpu\)"):
            generate(client)
        release.set()
        wait_for(lambda: loader.finished, 30, "the loader to finish")
        with pytest.raises(AppError, match=r"failed to load.*model_student\.ckpt is corrupt"):
            generate(client)
        assert "failed to load" in loader.status_markdown()
    finally:
        release.set()
        app.close()


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_loopback_hosts_need_no_flag(host: str) -> None:
    check_host(host, allow_remote=False)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.5", "example.org"])
def test_other_hosts_need_listen(host: str) -> None:
    with pytest.raises(UserError, match="--listen"):
        check_host(host, allow_remote=False)
    check_host(host, allow_remote=True)


def test_cli_refuses_remote_host_without_listen(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert run(["serve", "--host", "0.0.0.0", "--models", str(tmp_path)]) == 1
    assert "add --listen" in capsys.readouterr().err


def test_parse_job_reads_the_page_values() -> None:
    job = parse_job("a red house:2\n\n blue sky \n", None, 3.0, 10.0, "plms", "12", 2.0, 1.5, image_size=32)
    request = job.request
    assert request.prompts == [("a red house", 2.0), ("blue sky", 3.0)]
    assert (request.steps, request.seed, request.n, request.method) == (10, 12, 2, "plms")
    assert request.image_prompts == [] and job.autoencoder_scale == 1.5


def test_page_handler_runs_without_gradio(seed3_dir: Path, tmp_path: Path) -> None:
    """The Generate button's work, called directly: its PNGs equal a solo run of the pipeline on the same job,
    and progress is reported per U-Net evaluation and per stage."""
    from ccld_trt.export.models import ModelFiles
    from ccld_trt.pipeline import generate as pipeline_generate
    from ccld_trt.runner import BackendOptions, ModelSource, open_session

    loader = ModelLoader(lambda: open_session(BackendOptions(), ModelSource(ModelFiles.resolve(seed3_dir))),
                         "torch on cpu")
    with pytest.raises(UserError, match="still loading"):
        generate_for_page(loader, tmp_path, "a red house", None, 3.0, 3, "prk", 5, 2, 2.55)
    loader.start()
    wait_for(lambda: loader.finished, 120, "the models to load")
    calls: list[tuple[Any, dict[str, Any]]] = []

    class Tracker:  # falsy, as gr.Progress is (it has a __len__ of 0 outside a tracked iterable)
        def __len__(self) -> int:
            return 0

        def __call__(self, value: Any, **kw: Any) -> None:
            calls.append((value, kw))

    gallery, files, summary = generate_for_page(loader, tmp_path, "a red house\n", None, 3.0, 3, "prk", 5, 2, 2.55,
                                                progress=Tracker())
    assert gallery == files and len(files) == 2
    job = parse_job("a red house", None, 3.0, 3, "prk", 5, 2, 2.55, image_size=loader.session().image_size)
    solo = pipeline_generate(loader.session().backend, job.request, [], 2.55)
    for path, pixels in zip(files, solo.pixels, strict=True):
        assert np.array_equal(np.asarray(Image.open(path)), pixels)
    evaluations = [value for value, kw in calls if kw.get("unit") == "U-Net evaluations"]
    assert evaluations == [(i, job.request.evaluations) for i in range(1, job.request.evaluations + 1)]
    assert [kw["desc"] for _, kw in calls if "unit" not in kw] == ["conditioning", "sampling", "decoding"]
    assert "2 image(s), seed 5, 3 steps of prk, torch on cpu" in summary and "demo weights" in summary
    with pytest.raises(UserError, match="steps must be >= 1, got 0"):
        generate_for_page(loader, tmp_path, "a red house", None, 3.0, 0, "prk", 5, 2, 2.55)

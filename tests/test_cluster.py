"""``ccld-trt cluster`` end to end on a local Ray (127.0.0.1, short temp dir): two onnxruntime replicas on the
small demo weights, concurrent requests each equal to its solo ``ccld-trt sample`` run, merged U-Net calls in
/v1/stats, 400s, a deadline, and a replica killed under load. One Ray cluster serves the whole module."""

from __future__ import annotations

import base64
import concurrent.futures
import io
import json
import os
import signal
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ray_in_process import IN_PROCESS_SHUTDOWN_S

pytest.importorskip("ray.serve")

from ccld_trt.benchmarks.cold_start_servers import free_port, process_alive
from ccld_trt.cli import run as cli_run
from ccld_trt.cluster.api import decode_png, latents_from_json
from ccld_trt.cluster.app import ClusterSpec, Deployed, deploy, shutdown, start_ray
from ccld_trt.cluster.replica import ReplicaSettings
from ccld_trt.export.models import ModelFiles
from ccld_trt.runner import BackendOptions, ModelSource


def _png_base64(size: tuple[int, int], color: tuple[int, int, int]) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


# Different prompts, seeds, steps and samplers (n and eta too); each is also run solo through the CLI.
REQUESTS: list[dict[str, Any]] = [
    {"prompts": ["a red house:3"], "seed": 1, "steps": 8, "method": "plms"},
    {"prompts": ["a blue sea:2", "storm:1"], "seed": 2, "steps": 6, "method": "ddim"},
    {"prompts": ["mountains"], "seed": 3, "steps": 5, "method": "ddpm"},
    {"prompts": ["a cat:4"], "seed": 4, "steps": 3, "method": "prk"},
    {"prompts": ["forest at night"], "seed": 5, "steps": 4, "method": "pie"},
    {"prompts": ["city:2", "rain:2", "neon:1"], "seed": 6, "steps": 7, "method": "plms2"},
    {"prompts": ["a portrait"], "seed": 7, "steps": 6, "method": "ddim", "eta": 0.5},
    {"prompts": ["flowers:3"], "seed": 8, "steps": 8, "method": "plms", "n": 2},
    # issue 26: text and image prompts with weights other than 3 (one negative), n > 1 in batches
    {"prompts": ["a red square:3", "fog:-1"], "seed": 24, "steps": 4, "method": "plms", "n": 2, "batch_size": 1,
     "image_prompts": [{"image": _png_base64((64, 64), (200, 30, 30)), "weight": 2},
                       {"image": _png_base64((80, 48), (20, 130, 230)), "weight": -0.5}]},
]



def post(url: str, body: Any, timeout: float = 120) -> tuple[int, dict[str, Any]]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        text = e.read().decode(errors="replace")
        try:
            return e.code, json.loads(text)
        except json.JSONDecodeError:
            return e.code, {"error": text}


def get(url: str) -> tuple[int, dict[str, Any]]:
    with urllib.request.urlopen(url, timeout=60) as response:
        return response.status, json.loads(response.read())


@pytest.fixture(scope="module")
def models(seed3_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[BackendOptions, ModelSource]:
    onnx_dir = tmp_path_factory.mktemp("cluster-onnx")
    return BackendOptions("onnxruntime", onnx_dir=onnx_dir), ModelSource(ModelFiles.resolve(seed3_dir))


@pytest.fixture(scope="module")
def cluster(models: tuple[BackendOptions, ModelSource]) -> Any:
    options, source = models
    temp = tempfile.mkdtemp(prefix="ccr-", dir="/tmp")
    start_ray(temp_dir=temp, num_cpus=4)
    try:
        spec = ClusterSpec(replicas=2, max_queue=32, settings=ReplicaSettings(max_batch=32, max_ongoing=8))
        yield deploy(options, source, spec, port=free_port())
    finally:
        shutdown(budget_s=IN_PROCESS_SHUTDOWN_S)


@pytest.fixture(scope="module")
def solo(models: tuple[BackendOptions, ModelSource], seed3_dir: Path,
         tmp_path_factory: pytest.TempPathFactory) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each of REQUESTS through ``ccld-trt sample`` alone: (latents, pixels [n, H, W, 3])."""
    from PIL import Image

    options, _ = models
    out = []
    for k, body in enumerate(REQUESTS):
        directory = tmp_path_factory.mktemp(f"solo{k}")
        argv = ["sample", *body["prompts"], "--seed", str(body["seed"]), "--steps", str(body["steps"]),
                "--method", body["method"], "--eta", str(body.get("eta", 0.0)), "-n", str(body.get("n", 1)),
                "--models", str(seed3_dir), "--backend", "onnxruntime", "--onnx-dir", str(options.onnx_dir),
                "--output-dir", str(directory / "png"), "--save-latents", str(directory / "latents.npy")]
        if "batch_size" in body:
            argv += ["--batch-size", str(body["batch_size"])]
        images = []
        for i, prompt in enumerate(body.get("image_prompts", [])):
            path = directory / f"image{i}.png"
            path.write_bytes(base64.b64decode(prompt["image"]))
            images.append(f"{path}:{prompt['weight']}")
        if images:  # one --images flag: a second one would replace the first
            argv += ["--images", *images]
        assert cli_run(argv) == 0
        pixels = np.stack([np.asarray(Image.open(p).convert("RGB"))
                           for p in sorted((directory / "png").glob("out_*.png"))])
        out.append((np.load(directory / "latents.npy"), pixels))
    return out


def _check_equal_to_solo(response: dict[str, Any], solo: tuple[np.ndarray, np.ndarray]) -> None:
    latents, pixels = solo
    got = latents_from_json(response["latents"])
    assert got.shape == latents.shape
    rel = float(np.linalg.norm(got - latents) / np.linalg.norm(latents))
    assert rel <= 1e-3, rel
    images = np.stack([decode_png(image) for image in response["images"]])
    assert images.shape == pixels.shape
    assert int(np.abs(images.astype(int) - pixels.astype(int)).max()) <= 2


def _generate_all(url: str, bodies: list[dict[str, Any]]) -> list[tuple[int, dict[str, Any]]]:
    with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(lambda b: post(f"{url}/v1/generate", {**b, "return_latents": True}), bodies))


def test_concurrent_requests_equal_their_solo_runs_and_merge(cluster: Deployed, solo: list[Any]) -> None:
    assert get(f"{cluster.url}/v1/health")[0] == 200
    answers = _generate_all(cluster.url, REQUESTS)
    for (status, body), expected, request in zip(answers, solo, REQUESTS, strict=True):
        assert status == 200, body
        assert body["seed"] == request["seed"] and body["backend"] == "onnxruntime"
        _check_equal_to_solo(body, expected)
    status, stats = get(f"{cluster.url}/v1/stats")
    total = stats["total"]
    assert status == 200 and total["requests_done"] >= len(REQUESTS)
    # iteration-level batching happened: calls that served several requests' rows at once
    assert total["merged_calls"] >= 1 and total["requests_per_call_max"] >= 2
    assert total["rows_per_call_max"] > max(min(r.get("batch_size") or r.get("n", 1), r.get("n", 1))
                                            * (1 + len(r["prompts"]) + len(r.get("image_prompts", [])))
                                            for r in REQUESTS)
    assert total["unet_calls"] < total["evaluations"]
    assert {"queue_depth", "rows_per_call_mean", "requests_per_call_mean"} <= set(total)


@pytest.mark.parametrize(("body", "words"), [
    (b"{not json", "not valid JSON"),
    ({"prompts": ["x"], "steps": 0}, "steps must be >= 1"),
    ({"prompts": ["x"], "method": "euler"}, "method 'euler' is unknown"),
    ({"prompts": ["x"], "stepz": 3}, "unknown field(s) stepz"),
    ({"prompts": ["style: oil"]}, "is not a number"),
    ({"prompts": []}, "give a text or an image prompt"),
    ({"prompts": ["x"], "image_prompts": [{"image": "%%%", "weight": 1}]}, "not valid base64"),
    # issue 21 over real HTTP: refused before any work (tests/test_bad_inputs_cluster.py has the load test)
    ({"prompts": ["a" * 100_000]}, "100000 characters"),
    ({"prompts": ["a:3e38", "b:3e38"]}, "weight must be from -100 to 100"),
    ({"prompts": ["x"], "n": 100_000}, "n must be from 1 to 16"),
    (b"[" * 100_000, "not valid JSON"),
])
def test_bad_input_gets_400_and_the_cluster_serves_on(cluster: Deployed, body: Any, words: str) -> None:
    status, answer = post(f"{cluster.url}/v1/generate", body)
    assert status == 400
    assert words in answer["error"] and "\n" not in answer["error"]


def test_request_past_its_deadline_gets_504(cluster: Deployed) -> None:
    status, answer = post(f"{cluster.url}/v1/generate", {"prompts": ["x"], "steps": 50, "timeout_s": 1e-6})
    assert status == 504 and "timeout_s" in answer["error"]
    assert post(f"{cluster.url}/v1/generate", {"prompts": ["x"], "steps": 1})[0] == 200


def test_killed_replica_is_replaced_and_no_answer_is_wrong(cluster: Deployed, solo: list[Any]) -> None:
    from ray import serve
    from ray.serve.schema import ReplicaState

    _, stats = get(f"{cluster.url}/v1/stats")
    pids = {s["replica"] for s in stats["replicas"].values()}
    live = sorted(pid for pid in pids if process_alive(pid))
    assert live
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        answers = pool.submit(_generate_all, cluster.url, REQUESTS)
        time.sleep(1.0)  # the requests are sampling on both replicas
        os.kill(live[0], signal.SIGKILL)
        results = answers.result(timeout=240)
    failed = 0
    for (status, body), expected in zip(results, solo, strict=True):
        if status == 200:  # an answer is always whole and right
            _check_equal_to_solo(body, expected)
        else:
            assert 500 <= status < 600, (status, body)
            failed += 1
    assert failed < len(REQUESTS)  # requests on the other replica were not lost
    # Serve starts a replacement; the deployment serves two healthy replicas again
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        app = serve.status().applications.get("ccld-trt")
        running = app and app.deployments["generate"].replica_states.get(ReplicaState.RUNNING, 0)
        if app and app.status == "RUNNING" and running == 2:
            break
        time.sleep(1)
    else:
        pytest.fail(f"the killed replica was not replaced: {serve.status()}")
    status, body = post(f"{cluster.url}/v1/generate", {**REQUESTS[0], "return_latents": True})
    assert status == 200
    _check_equal_to_solo(body, solo[0])

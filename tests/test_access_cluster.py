"""Keys and the fair share on a real local Ray cluster (127.0.0.1, small demo weights, onnxruntime on the CPU):
two model replicas behind the ingress, two keys, at most 3 requests in flight per client. One cluster serves
the whole module; the logic itself is tested without Ray in tests/test_access.py."""

from __future__ import annotations

import concurrent.futures
import json
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ray_in_process import IN_PROCESS_SHUTDOWN_S

pytest.importorskip("ray.serve")

from ccld_trt.access import AccessPolicy, Keys, key_id, load_keys
from ccld_trt.benchmarks.cold_start_servers import free_port
from ccld_trt.cli import run as cli_run
from ccld_trt.cluster.api import decode_png, latents_from_json
from ccld_trt.cluster.app import ClusterSpec, Deployed, deploy, shutdown, start_ray, update_access
from ccld_trt.cluster.replica import ReplicaSettings
from ccld_trt.export.models import ModelFiles
from ccld_trt.runner import BackendOptions, ModelSource

KEY_A = "client-a-" + "3" * 23
KEY_B = "client-b-" + "7" * 23
LIMIT = 3
A_STEPS, B_STEPS = 30, 2



def call(url: str, body: Any = None, key: str | None = None,
         timeout: float = 300) -> tuple[int, dict[str, Any], dict[str, str]]:
    """(status, JSON body, headers with lowercase names) of a POST (``body`` given) or GET."""
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read()), {k.lower(): v for k, v in response.headers.items()}
    except urllib.error.HTTPError as e:
        text = e.read().decode(errors="replace")
        assert text.count("\n") <= 1, text  # one JSON line
        return e.code, json.loads(text), {k.lower(): v for k, v in e.headers.items()}


@pytest.fixture(scope="module")
def models(seed3_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[BackendOptions, ModelSource]:
    onnx_dir = tmp_path_factory.mktemp("access-onnx")
    return BackendOptions("onnxruntime", onnx_dir=onnx_dir), ModelSource(ModelFiles.resolve(seed3_dir))


@pytest.fixture(scope="module")
def ray_dir() -> str:
    return tempfile.mkdtemp(prefix="cca-", dir="/tmp")


@pytest.fixture(scope="module")
def cluster(models: tuple[BackendOptions, ModelSource], ray_dir: str,
            tmp_path_factory: pytest.TempPathFactory) -> Any:
    options, source = models
    key_file = tmp_path_factory.mktemp("keys") / "keys"
    key_file.write_text(f"# one key per client\n{KEY_A}\n\n{KEY_B}\n")
    key_file.chmod(0o600)
    start_ray(temp_dir=ray_dir, num_cpus=4)
    try:
        access = AccessPolicy(load_keys(key_file), max_in_flight=LIMIT)
        spec = ClusterSpec(replicas=2, max_queue=32, settings=ReplicaSettings(max_batch=32, max_ongoing=4),
                           access=access)
        yield deploy(options, source, spec, port=free_port())
    finally:
        shutdown(budget_s=IN_PROCESS_SHUTDOWN_S)


def solo(models: tuple[BackendOptions, ModelSource], body: dict[str, Any], directory: Path) -> np.ndarray:
    """``ccld-trt sample`` of ``body`` alone: its latents, float32 [n, 4, 32, 32]."""
    options, source = models
    directory.mkdir(parents=True, exist_ok=True)
    argv = ["sample", *body["prompts"], "--seed", str(body["seed"]), "--steps", str(body["steps"]),
            "--method", body["method"], "--models", str(source.files.unet.parent), "--backend", "onnxruntime",
            "--onnx-dir", str(options.onnx_dir), "--output-dir", str(directory / "png"),
            "--save-latents", str(directory / "latents.npy")]
    assert cli_run(argv) == 0
    return np.load(directory / "latents.npy")


def check_solo(answer: dict[str, Any], latents: np.ndarray, directory: Path) -> None:
    from PIL import Image

    got = latents_from_json(answer["latents"])
    assert got.shape == latents.shape
    assert float(np.linalg.norm(got - latents) / np.linalg.norm(latents)) <= 1e-3  # merged calls: fp32 sums
    pixels = np.asarray(Image.open(directory / "png" / "out_00000.png").convert("RGB"))
    assert int(np.abs(decode_png(answer["images"][0]).astype(int) - pixels.astype(int)).max()) <= 2


def _stats(cluster: Deployed) -> dict[str, Any]:
    status, stats, _ = call(f"{cluster.url}/v1/stats", key=KEY_B)
    assert status == 200
    return stats


def access_log(ray_dir: str) -> list[str]:
    """The ingress's access lines so far (Serve's log file of the ingress replica)."""
    return [line for path in Path(ray_dir).glob("r/session_*/logs/serve/replica_ccld-trt_ingress_*.log")
            for line in path.read_text(errors="replace").splitlines() if " client=" in line]


def test_only_the_right_bearer_key_runs(cluster: Deployed, models: Any, ray_dir: str, tmp_path: Path) -> None:
    url = f"{cluster.url}/v1/generate"
    body = {"prompts": ["a red house:3"], "seed": 11, "steps": 4, "method": "plms", "return_latents": True}
    status, health, _ = call(f"{cluster.url}/v1/health")  # open to load balancers
    assert status == 200 and health["status"] == "ok"
    before = _stats(cluster)["total"]
    last_byte = KEY_A[:-1] + chr(ord(KEY_A[-1]) + 1)
    for key, suffix in ((None, ""), ("not-a-key-of-this-cluster-at-all", ""), (last_byte, ""), (KEY_A[:-1], ""),
                        (None, f"?api_key={KEY_A}"), (None, f"?token={KEY_A}")):
        status, answer, headers = call(url + suffix, body, key)
        assert status == 401 and list(answer) == ["error"], (key, suffix, answer)
        assert headers["www-authenticate"].startswith("Bearer")
        assert call(f"{cluster.url}/v1/stats" + suffix, key=key)[0] == 401
    status, answer, _ = call(url + f"?api_key={KEY_A}", body, KEY_A)  # the header is right: still not in a URL
    assert status == 400 and "no query parameters" in answer["error"]
    after = _stats(cluster)
    assert after["total"]["evaluations"] == before["evaluations"]  # nothing ran
    assert after["total"]["requests_done"] == before["requests_done"] and after["unauthorized"] >= 12
    status, answer, _ = call(url, body, KEY_A)
    assert status == 200
    check_solo(answer, solo(models, body, tmp_path), tmp_path)
    clients = _stats(cluster)["clients"]
    assert clients[key_id(KEY_A)]["finished"] >= 1 and KEY_A not in json.dumps(clients)
    lines = access_log(ray_dir)  # refused clients by the address the ingress saw through Serve's proxy
    assert sum("client=127.0.0.1 POST /v1/generate status=401 images=0" in line for line in lines) >= 6


def test_a_flooding_client_cannot_starve_another(cluster: Deployed, models: Any, ray_dir: str,
                                                  tmp_path: Path) -> None:
    """A sends 12 at once: 3 run (over both replicas), 9 get 429 at once; then B sends one, which runs beside
    A's three (the replicas had room for 8) and, being shorter, finishes before every one of them."""
    url = f"{cluster.url}/v1/generate"
    a_bodies = [{"prompts": ["a flood:3"], "seed": 100 + i, "steps": A_STEPS, "method": "ddim",
                 "return_latents": True} for i in range(12)]
    b_body = {"prompts": ["b's turn:2"], "seed": 7, "steps": B_STEPS, "method": "ddim", "return_latents": True}
    ended: dict[int, float] = {}
    lock = threading.Lock()

    def send(index: int, body: dict[str, Any], key: str) -> tuple[int, dict[str, Any], dict[str, str]]:
        answer = call(url, body, key)
        with lock:
            ended[index] = time.monotonic()
        return answer

    with concurrent.futures.ThreadPoolExecutor(13) as pool:
        a = [pool.submit(send, i, body, KEY_A) for i, body in enumerate(a_bodies)]
        deadline = time.monotonic() + 60
        while sum(f.done() for f in a) < 12 - LIMIT and time.monotonic() < deadline:
            time.sleep(0.01)
        refused = [f.result() for f in a if f.done()]
        b_sent = time.monotonic()
        b = pool.submit(send, 12, b_body, KEY_B)
        a_answers, b_answer = [f.result() for f in a], b.result()
    assert len(refused) == 12 - LIMIT and all(status == 429 for status, _, _ in refused), refused
    assert all(1 <= int(headers["retry-after"]) <= 60 for _, _, headers in refused)
    admitted = [i for i, (status, _, _) in enumerate(a_answers) if status == 200]
    assert len(admitted) == LIMIT and [s for s, _, _ in a_answers].count(429) == 12 - LIMIT
    assert b_answer[0] == 200, b_answer
    running_then = [ended[i] for i in admitted]
    assert min(running_then) > b_sent  # A's three were still running when B arrived
    assert ended[12] <= min(running_then)  # B did not wait behind A
    stats = _stats(cluster)
    a_counts = stats["clients"][key_id(KEY_A)]
    assert a_counts["refused"] >= 12 - LIMIT and a_counts["in_flight"] == 0
    assert stats["max_in_flight_per_client"] == LIMIT
    for i in (*admitted, 12):
        body = b_body if i == 12 else a_bodies[i]
        answer = b_answer[1] if i == 12 else a_answers[i][1]
        check_solo(answer, solo(models, body, tmp_path / str(i)), tmp_path / str(i))
    # the access log: a line per request, the client by key id, no prompt text
    lines = access_log(ray_dir)
    assert sum(f"client={key_id(KEY_A)} POST /v1/generate status=429 images=0" in line for line in lines) >= 9
    assert any(f"client={key_id(KEY_B)} POST /v1/generate status=200 images=1" in line for line in lines)
    assert not any("flood" in line or KEY_A in line for line in lines)


def test_a_revoked_key_is_refused_without_restarting_anything(cluster: Deployed) -> None:
    """What ``ccld-trt cluster`` does when a line leaves the key file: the ingress takes the new keys in place."""
    url = f"{cluster.url}/v1/generate"
    body = {"prompts": ["x"], "steps": 1, "method": "ddim"}
    before = _stats(cluster)
    accepted = before["clients"].get(key_id(KEY_A), {}).get("accepted", 0)
    try:
        update_access(cluster, AccessPolicy(Keys.of([KEY_A]), max_in_flight=LIMIT))
        time.sleep(1.5)  # the ingress reads the policy at most every second
        assert call(url, body, KEY_B)[0] == 401
        assert call(url, body, KEY_A)[0] == 200
        status, stats, _ = call(f"{cluster.url}/v1/stats", key=KEY_A)
        assert status == 200 and set(stats["replicas"]) == set(before["replicas"])  # the same model replicas
        assert stats["clients"][key_id(KEY_A)]["accepted"] == accepted + 1  # the same ingress: counts kept
    finally:
        update_access(cluster, cluster.spec.access)
    time.sleep(1.5)
    assert call(url, body, KEY_B)[0] == 200

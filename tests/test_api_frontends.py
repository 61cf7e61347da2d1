"""Issue 26: every front end gives a request with text and image prompts the images of its solo CLI run.

The cluster replica (driven through ``Replica.handle``, without Ray) and the web page's handler each get requests
with text + image prompts, several images, several texts + several images, negative weights and n > 1 with a
batch size, alone and all at once (the replica merges their U-Net calls), on torch, onnxruntime and openvino
(fp32); each answer must equal ``ccld-trt sample`` run alone on the same input (latents rel <= 1e-3, pixels <= 2).
Before the fix of 99f8312 the cluster ran every image prompt at weight 3, so each case with another weight failed
here.
"""

from __future__ import annotations

import base64
import concurrent.futures
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from ccld_trt.cli import run as cli_run
from ccld_trt.cluster.api import decode_png, latents_from_json
from ccld_trt.cluster.replica import Replica, ReplicaSettings
from ccld_trt.export.models import ModelFiles
from ccld_trt.runner import BackendOptions, ModelSource

# name -> (size, RGB): small solid images; "stripes" is not square (the crop matters)
IMAGES = {"red": ((64, 64), (200, 30, 30)), "blue": ((80, 48), (20, 130, 230)), "green": ((40, 56), (30, 190, 60))}

# (text prompts, [(image, weight)], settings); each also runs solo through the CLI
CASES: dict[str, tuple[list[str], list[tuple[str, float]], dict[str, Any]]] = {
    "text + image (the issue's)": (["a red square:3"], [("red", 2.0)], {"seed": 24, "steps": 4, "method": "plms"}),
    "several images": ([], [("red", 2.0), ("blue", 1.5)], {"seed": 3, "steps": 3, "method": "ddim"}),
    "texts + images": (["a cat:2", "storm:1"], [("blue", 1.0), ("green", 4.0)],
                       {"seed": 5, "steps": 3, "method": "plms"}),
    "negative weights": (["sea:4", "fog:-1"], [("green", -2.0), ("red", 0.5)],
                         {"seed": 6, "steps": 3, "method": "prk"}),
    "n > 1 in batches": (["a portrait:2"], [("red", 1.0), ("blue", -0.5)],
                         {"seed": 7, "steps": 3, "method": "ddim", "eta": 0.5, "n": 3, "batch_size": 2}),
}


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("image-prompts")
    paths = {}
    for name, (size, color) in IMAGES.items():
        paths[name] = directory / f"{name}.png"
        Image.new("RGB", size, color).save(paths[name])
    return paths


Case = tuple[list[str], list[tuple[str, float]], dict[str, Any]]


def load_pngs(directory: Path) -> np.ndarray:
    return np.stack([np.asarray(Image.open(p).convert("RGB")) for p in sorted(directory.glob("out_*.png"))])


def cli_solo(case: Case, options: BackendOptions, models: Path, images: dict[str, Path],
             directory: Path) -> tuple[np.ndarray, np.ndarray]:
    """``ccld-trt sample`` alone on one case: (latents, pixels [n, H, W, 3])."""
    texts, image_prompts, settings = case
    argv = ["sample", *texts, "--models", str(models), "--backend", options.backend,
            "--output-dir", str(directory / "png"), "--save-latents", str(directory / "latents.npy")]
    if image_prompts:
        argv += ["--images", *(f"{images[name]}:{weight}" for name, weight in image_prompts)]
    for key, value in settings.items():
        argv += ["-n" if key == "n" else f"--{key.replace('_', '-')}", str(value)]
    if options.onnx_dir is not None:
        argv += ["--onnx-dir", str(options.onnx_dir)]
    if options.precision is not None:
        argv += ["--precision", options.precision]
    assert cli_run(argv) == 0
    return np.load(directory / "latents.npy"), load_pngs(directory / "png")


def check_equal(latents: np.ndarray, pixels: np.ndarray, solo: tuple[np.ndarray, np.ndarray]) -> None:
    want_latents, want_pixels = solo
    assert latents.shape == want_latents.shape
    rel = float(np.linalg.norm(latents - want_latents) / np.linalg.norm(want_latents))
    assert rel <= 1e-3, rel
    assert pixels.shape == want_pixels.shape
    assert int(np.abs(pixels.astype(int) - want_pixels.astype(int)).max()) <= 2


def body(case: str, images: dict[str, Path]) -> bytes:
    texts, image_prompts, settings = CASES[case]
    prompts = [{"image": base64.b64encode(images[name].read_bytes()).decode(), "weight": weight}
               for name, weight in image_prompts]
    return json.dumps({"prompts": texts, "image_prompts": prompts, **settings, "return_latents": True}).encode()


@dataclass
class Setup:
    options: BackendOptions
    models: Path
    replica: Replica
    solo: dict[str, tuple[np.ndarray, np.ndarray]]  # per case, the CLI's (latents, pixels)


@pytest.fixture(scope="module", params=["torch", "onnxruntime", "openvino"])
def setup(request: pytest.FixtureRequest, seed3_dir: Path, images: dict[str, Path],
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    if request.param == "openvino":
        pytest.importorskip("openvino")
    onnx_dir = tmp_path_factory.mktemp("onnx") if request.param != "torch" else None
    # openvino at fp32: its merged rows run the per-row U-Net graph, the CLI the fused one (bf16 would round
    # the two differently)
    options = BackendOptions(request.param, onnx_dir=onnx_dir,
                             precision="fp32" if request.param == "openvino" else None)
    solo = {name: cli_solo(case, options, seed3_dir, images, tmp_path_factory.mktemp("solo"))
            for name, case in CASES.items()}
    replica = Replica(options, ModelSource(ModelFiles.resolve(seed3_dir)), ReplicaSettings(max_batch=64))
    try:
        yield Setup(options, seed3_dir, replica, solo)
    finally:
        replica.close()


def check_answer(status: int, answer: dict[str, Any], solo: tuple[np.ndarray, np.ndarray]) -> None:
    assert status == 200, answer
    pixels = np.stack([decode_png(image) for image in answer["images"]])
    check_equal(latents_from_json(answer["latents"]), pixels, solo)


@pytest.mark.parametrize("case", CASES)
def test_cluster_request_alone_equals_its_cli_run(setup: Setup, images: dict[str, Path], case: str) -> None:
    check_answer(*setup.replica.handle("POST", "/v1/generate", body(case, images)), setup.solo[case])


def test_cluster_requests_merged_equal_their_cli_runs(setup: Setup, images: dict[str, Path]) -> None:
    replica = setup.replica
    before = replica.stats()["merged_calls"]
    with concurrent.futures.ThreadPoolExecutor(len(CASES)) as pool:
        answers = list(pool.map(lambda case: replica.handle("POST", "/v1/generate", body(case, images)), CASES))
    for case, answer in zip(CASES, answers, strict=True):
        check_answer(*answer, setup.solo[case])
    assert replica.stats()["merged_calls"] > before  # the requests did share U-Net calls


def page_variant(case: Case) -> Case:
    """What the page can express of a case: its first image prompt, no batch size or eta."""
    texts, image_prompts, settings = case
    return texts, image_prompts[:1], {k: v for k, v in settings.items() if k not in ("batch_size", "eta")}


def test_page_equals_the_cli(setup: Setup, images: dict[str, Path], tmp_path: Path) -> None:
    """The page's Generate handler against the CLI on each case as the page can express it, the image prompt
    with its own weight (not the default 3) and the text one prompt per line, blank lines between."""
    from ccld_trt.serve import ModelLoader, generate_for_page

    loader = ModelLoader(lambda: setup.replica.session, setup.options.describe())
    loader.start()
    for _ in range(600):  # the session is already open: loading is over at once
        if loader.finished:
            break
        time.sleep(0.05)
    (tmp_path / "page").mkdir()
    for k, (case_name, case) in enumerate(CASES.items()):
        texts, [(name, weight)], settings = page_variant(case)
        if page_variant(case) == case:  # the page expresses the whole case: its CLI run is done already
            want = setup.solo[case_name][1]
        else:
            _, want = cli_solo((texts, [(name, weight)], settings), setup.options, setup.models, images,
                               tmp_path / f"solo{k}")
        gallery, _, _ = generate_for_page(
            loader, tmp_path / "page", "\n\n".join(texts) + "\n", {"path": str(images[name])}, weight,
            settings["steps"], settings["method"], settings["seed"], settings.get("n", 1), 2.55)
        pixels = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in gallery])
        assert pixels.shape == want.shape
        assert int(np.abs(pixels.astype(int) - want.astype(int)).max()) <= 2, (k, texts)

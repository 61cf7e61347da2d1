"""The Python API (``from ccld_trt import Pipeline``) and the shared request assembly (``jobs.assemble``): the
same images as the CLI, image prompts as paths, bytes or PIL images, a callback per U-Net evaluation, one-line
errors, the README's example, and a package ``__init__`` that keeps the other source roots importable."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ccld_trt.cli import run as cli_run
from ccld_trt.export.errors import UserError
from ccld_trt.jobs import ImageSource, RequestFields, assemble
from ccld_trt.pipeline import InvalidRequest, Request

ROOT = Path(__file__).resolve().parents[1]
SOURCE_ROOTS = os.pathsep.join(str(ROOT / d) for d in ("export", "engines", "runtime", "benchmarks"))


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("api-images")
    paths = {"red": directory / "red.png", "blue": directory / "blue.jpg"}
    Image.new("RGB", (64, 64), (200, 30, 30)).save(paths["red"])
    Image.new("RGB", (90, 40), (20, 130, 230)).save(paths["blue"])
    return paths


@pytest.fixture(scope="module")
def pipe(seed3_dir: Path):  # type: ignore[no-untyped-def]
    from ccld_trt import Pipeline

    with Pipeline.load(seed3_dir) as pipeline:
        yield pipeline


def test_each_weight_stays_with_its_image(images: dict[str, Path]) -> None:
    """The cause of issue 26 cannot come back: the Request's weights and the pixels' weights are one list."""
    job = assemble(["a cat:2", ("storm", -1.5)], [(images["red"], 2.0), images["blue"], (images["red"], -0.5)],
                   image_size=32, steps=3)
    assert job.request.prompts == [("a cat", 2.0), ("storm", -1.5)]
    assert [w for _, w in job.request.image_prompts] == [2.0, 3.0, -0.5]
    assert [w for _, w in job.image_pixels] == [2.0, 3.0, -0.5]
    assert np.array_equal(job.image_pixels[0][0], job.image_pixels[2][0])


def test_image_prompt_as_path_bytes_or_pil_image_gives_the_same_pixels(images: dict[str, Path]) -> None:
    path = images["blue"]
    with Image.open(path) as opened:
        pil = opened.copy()
    sources: list[ImageSource] = [path, str(path), path.read_bytes(), pil, pil.convert("RGBA")]
    pixels = [assemble([], [(s, 1.0)], image_size=32).image_pixels[0][0] for s in sources]
    assert pixels[0].shape == (1, 3, 32, 32)
    for other in pixels[1:]:
        assert np.array_equal(other, pixels[0])


@pytest.mark.parametrize(("kwargs", "message"), [
    ({}, "prompts are missing"),
    ({"prompts": ["a cat"], "steps": 0}, "steps must be >= 1, got 0"),
    ({"prompts": ["a cat"], "method": "euler"}, "method 'euler' is unknown"),
    ({"prompts": ["a cat:heavy"]}, "is not a number"),
    ({"prompts": [":3"]}, "prompts[0] has no text"),
    ({"prompts": [("a cat", float("nan"))]}, "prompts[0].weight must be a finite number"),
    ({"image_prompts": [("x.png", "2")]}, "image_prompts[0].weight must be a finite number"),
    ({"image_prompts": ["missing.png"]}, "missing.png"),
    ({"image_prompts": [b"not an image"]}, "image_prompts[0]"),
    ({"prompts": ["a cat"], "autoencoder_scale": 0.0}, "autoencoder_scale must be positive"),
])
def test_bad_input_is_one_line(kwargs: dict, message: str) -> None:
    with pytest.raises(UserError) as info:
        assemble(image_size=32, **kwargs)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_unknown_field_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="stepz"):
        assemble(["a cat"], image_size=32, stepz=3)


def test_request_fields_are_the_requests_settings() -> None:
    """A Request setting is passed through by every front end once it is in RequestFields."""
    assembled = {"prompts", "image_prompts", "latent_size", "init"}  # set by assemble itself
    settings = {f.name for f in dataclasses.fields(Request)} - assembled
    assert set(RequestFields.__annotations__) == settings


def test_pipeline_equals_the_cli(pipe, seed3_dir: Path, images: dict[str, Path], tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    argv = ["sample", "a red square:3", "--images", f"{images['red']}:2", f"{images['blue']}:-1", "-n", "3",
            "--batch-size", "2", "--seed", "24", "--steps", "3", "--method", "ddim", "--eta", "0.5",
            "--models", str(seed3_dir), "--output-dir", str(tmp_path / "png"),
            "--save-latents", str(tmp_path / "latents.npy")]
    assert cli_run(argv) == 0
    want_latents = np.load(tmp_path / "latents.npy")
    want_pixels = np.stack([np.asarray(Image.open(p)) for p in sorted((tmp_path / "png").glob("*.png"))])
    calls: list[tuple[int, int]] = []
    with Image.open(images["blue"]) as blue:
        result = pipe(["a red square:3"], [(images["red"], 2), (blue.copy(), -1)], n=3, batch_size=2, seed=24,
                      steps=3, method="ddim", eta=0.5, callback=lambda done, total: calls.append((done, total)))
    assert np.array_equal(result.latents.numpy(), want_latents)  # the same backend: the same floats
    assert np.array_equal(result.pixels, want_pixels)
    assert all(np.array_equal(np.asarray(image), p) for image, p in zip(result.images, result.pixels, strict=True))
    total = result.request.evaluations
    assert calls == [(i, total) for i in range(1, total + 1)] and total == 2 * 3
    assert result.backend == "torch fp32 on cpu"
    assert set(result.seconds) == {"conditioning", "sampling", "decoding", "total"}
    assert [p.name for p in result.save(tmp_path / "saved")] == ["out_00000.png", "out_00001.png", "out_00002.png"]


def test_fast_is_the_cli_fast_preset(pipe, seed3_dir: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from ccld_trt.sampler_names import FAST_METHOD, FAST_STEPS

    assert cli_run(["sample", "a cat", "--fast", "--seed", "5", "--models", str(seed3_dir), "--output-dir",
                    str(tmp_path / "png"), "--save-latents", str(tmp_path / "latents.npy")]) == 0
    result = pipe("a cat", fast=True, seed=5, steps=50, method="plms")  # the preset wins, as --fast does
    assert (result.request.method, result.request.steps) == (FAST_METHOD, FAST_STEPS)
    assert np.array_equal(result.latents.numpy(), np.load(tmp_path / "latents.npy"))


def test_a_preset_is_the_cli_preset_and_conflicts_are_refused(pipe, seed3_dir: Path,  # type: ignore[no-untyped-def]
                                                              tmp_path: Path) -> None:
    from ccld_trt.sampler_names import PRESETS

    assert cli_run(["sample", "a cat", "--preset", "balanced", "--seed", "5", "--models", str(seed3_dir),
                    "--output-dir", str(tmp_path / "png"), "--save-latents", str(tmp_path / "latents.npy")]) == 0
    result = pipe("a cat", preset="balanced", seed=5, steps=50, method="plms")  # the preset wins
    assert (result.request.method, result.request.steps) == PRESETS["balanced"] == ("dpmpp-3m", 15)
    assert np.array_equal(result.latents.numpy(), np.load(tmp_path / "latents.npy"))
    with pytest.raises(UserError, match="preset must be one of fast, balanced, got 'slow'"):
        pipe("a cat", preset="slow")
    with pytest.raises(UserError, match="fast is the preset 'fast', and preset is 'balanced'"):
        pipe("a cat", fast=True, preset="balanced")


def test_pipeline_errors_and_checkpoint_scale(pipe) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidRequest, match="n must be >= 1, got 0"):
        pipe("a cat", n=0)
    a = pipe("a cat", steps=1, autoencoder_scale="checkpoint")  # the demo checkpoints store 2.55
    b = pipe("a cat", steps=1)
    assert np.array_equal(a.pixels, b.pixels)


def test_closed_pipeline_says_so(seed3_dir: Path) -> None:
    from ccld_trt import Pipeline

    with Pipeline.load(seed3_dir) as pipeline:
        pass
    with pytest.raises(UserError, match="closed"):
        pipeline("a cat", steps=1)


def readme_example() -> str:
    """The first python block of the README's "Python API" section."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Python API"):]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match is not None
    return match.group(1)


def test_readme_example_runs(seed3_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "models").symlink_to(seed3_dir)
    env = {**os.environ, "PYTHONPATH": SOURCE_ROOTS}
    code = readme_example()
    assert "steps=50" in code
    code = code.replace("steps=50", "steps=2")  # the same code, quicker: the test is about the API, not quality
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr
    saved = sorted(tmp_path.glob("lighthouse-*.png"))
    assert len(saved) == 4 and Image.open(saved[0]).size == (256, 256)
    assert "torch fp32 on cpu" in result.stdout


def test_package_init_keeps_the_source_roots_and_imports_lazily() -> None:
    """`ccld_trt/__init__.py` (for `from ccld_trt import Pipeline`) must not hide the other source roots'
    subpackages, nor import the API (torch) for `import ccld_trt.export...`."""
    code = ("import sys, ccld_trt.export.models, ccld_trt.engines.flavor, ccld_trt.benchmarks.cli\n"
            "assert 'ccld_trt.api' not in sys.modules\n"
            "from ccld_trt import Pipeline, Result\n"
            "assert Pipeline.__module__ == 'ccld_trt.api'\n"
            "try:\n    from ccld_trt import Nothing\nexcept ImportError:\n    print('ok')\n")
    env = {**os.environ, "PYTHONPATH": SOURCE_ROOTS}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


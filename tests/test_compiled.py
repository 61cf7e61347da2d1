"""``--backend torch --compile`` on the CPU: torch.compile (Inductor) of the backend's networks against the goldens,
one compilation per input shape up to a cap, and one-line refusals where it cannot run."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from ccld_trt.backends.compiled import CompiledCall, compile_calls, compile_problem
from ccld_trt.backends.torch_backend import TorchBackend
from ccld_trt.export.errors import UserError
from ccld_trt.export.models import ModelFiles, load_networks
from ccld_trt.image_prompt import parse_prompt
from ccld_trt.pipeline import DEFAULT_AUTOENCODER_SCALE, Request, generate, load_image_prompts
from ccld_trt.runner import BackendOptions

needs_compiler = pytest.mark.skipif(compile_problem("cpu") is not None, reason="Inductor has no C++ compiler here")


def one_line_error(*args: str) -> str:
    """Run the CLI, expect a failure with one line and no traceback on stderr; returns that line."""
    result = subprocess.run([sys.executable, "-m", "ccld_trt", *args], capture_output=True, text=True, timeout=300)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode != 0 and "Traceback" not in result.stderr and len(lines) == 1, result.stderr
    return lines[0]


@needs_compiler
@pytest.mark.slow
def test_compiled_unet_meets_the_goldens_and_compiles_each_shape_once(seed3_dir, e2e_cases, golden):
    """The golden DDIM case with the guided U-Net compiled (the decoder and encoders stay eager here: compiling
    them too would take CI minutes more; the GPU check compiles them all). Run twice: the second run must not
    compile again."""
    case = e2e_cases["e2e_ddim"]
    networks = load_networks(ModelFiles.resolve(seed3_dir))
    backend = TorchBackend(networks)
    backend.compilation = compile_calls(backend, "cpu", only={"unet_cfg"})
    request = Request(prompts=[parse_prompt(p) for p in case["prompt_list"]], image_prompts=[], n=case["n"],
                      seed=case["seed"], steps=case["steps_n"], method=case["method"])
    for run in range(2):
        result = generate(backend, request, load_image_prompts(request, networks.image_size),
                          DEFAULT_AUTOENCODER_SCALE)
        latents, want = result.latents.numpy(), golden["e2e_ddim_latents"]
        assert np.linalg.norm(latents - want) / np.linalg.norm(want) <= 1e-3
        assert np.abs(result.pixels.astype(int) - golden["e2e_ddim_pixels"].astype(int)).max() <= 2
        unet = backend.compilation.calls["unet_cfg"]
        # one shape (1 image x 2 conditions) for all steps and both runs: compiled once, never again
        assert (unet.compilations, len(unet.shapes), unet.eager_calls) == (1, 1, 0), run
    assert list(backend.compilation.calls) == ["unet_cfg"]
    assert unet.compile_seconds > 0


@needs_compiler
def test_shapes_beyond_the_cap_run_eager_without_compiling():
    call = CompiledCall("affine", lambda x: x * 2 + 1, max_shapes=1)
    a, b = torch.arange(6.0).reshape(2, 3), torch.arange(8.0).reshape(2, 4)
    assert torch.equal(call(a), a * 2 + 1) and torch.equal(call(a), a * 2 + 1)
    assert torch.equal(call(b), b * 2 + 1)  # a second shape: over the cap of 1
    assert (call.compilations, len(call.shapes), call.eager_calls) == (1, 1, 1)


def test_compile_with_another_backend_is_one_line(seed3_dir, tmp_path):
    line = one_line_error("sample", "a cat", "--models", str(seed3_dir), "--backend", "onnxruntime", "--compile",
                          "--onnx-dir", str(tmp_path / "onnx"))
    assert "--compile is for the torch backend" in line
    assert not (tmp_path / "onnx").exists()  # refused before any export
    with pytest.raises(UserError, match="not openvino"):
        BackendOptions(backend="openvino", compiled=True).resolved()


def test_compile_without_a_cpp_compiler_is_one_line(seed3_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("CXX", "no-such-c++-compiler")  # Inductor's compiler search reads $CXX at import
    line = one_line_error("sample", "a cat", "--models", str(seed3_dir), "--compile", "--output-dir", str(tmp_path))
    assert "--compile on the CPU needs a C++ compiler" in line
    assert not list(tmp_path.iterdir())


def test_compile_on_cuda_without_triton_names_triton(monkeypatch):
    import torch.utils._triton as triton_utils

    monkeypatch.setattr(triton_utils, "has_triton_package", lambda: False)
    assert "needs Triton" in (compile_problem("cuda") or "")


def test_options_describe_the_compiled_mode():
    options = BackendOptions(compiled=True).resolved() if compile_problem("cpu") is None else None
    if options is not None:
        assert options.describe() == "torch fp32 compiled on cpu"
    assert BackendOptions(precision="fp32").describe() == "torch fp32 on cpu"


def test_compile_flag_parses_into_backend_options():
    from ccld_trt.cli import build_parser
    from ccld_trt.cli_args import backend_options

    parser = build_parser()
    assert backend_options(parser.parse_args(["sample", "a cat", "--compile"])).compiled
    assert not backend_options(parser.parse_args(["sample", "a cat"])).compiled
    assert not backend_options(parser.parse_args(["bench"])).compiled  # bench names its variants itself


def test_doctor_says_whether_compile_runs_here():
    from ccld_trt.doctor import doctor_report

    checks = {c.name: c for c in doctor_report()}
    cpu, cuda = checks["backend torch --compile on cpu"], checks["backend torch --compile on cuda"]
    assert cpu.ok == (compile_problem("cpu") is None)
    assert "C++ compiler" in cpu.detail
    if not torch.cuda.is_available():
        assert not cuda.ok and cuda.detail.startswith("no GPU")


def test_a_compile_failure_is_a_user_error(monkeypatch):
    """An Inductor failure inside the first call (a broken compiler, say) becomes one UserError naming the call."""
    call = CompiledCall("decoder", lambda x: x + 1)

    def broken(*args: object) -> None:
        raise torch._inductor.exc.InductorError(RuntimeError("g++ crashed\nmore"), None)

    monkeypatch.setattr(call, "_compiled", broken)
    with pytest.raises(UserError, match=r"^torch.compile of the decoder failed: .*g\+\+ crashed"):
        call(torch.ones(2))

"""Backend selection and the doctor report, on a machine without TensorRT (and, where faked, without CUDA)."""

from __future__ import annotations

import importlib.util
import sys

import onnxruntime
import pytest
import torch

from ccld_trt import backend_select, doctor
from ccld_trt.backend_select import resolve_backend
from ccld_trt.doctor import Check, doctor_report, format_report
from ccld_trt.export.errors import UserError
from cpu_fakes import SAPPHIRE_RAPIDS, ZEN3, fake_cpu


@pytest.fixture
def no_tensorrt(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises ImportError
    monkeypatch.setitem(sys.modules, "tensorrt_rtx", None)


@pytest.fixture
def no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def one_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)


def test_cpu_backends_resolve() -> None:
    assert resolve_backend("torch", "cpu") == ("torch", "cpu")
    assert resolve_backend(" ONNXRuntime ", "CPU") == ("onnxruntime", "cpu")


@pytest.mark.parametrize(("name", "device", "message"), [
    ("tensorflow", "cpu", "unknown backend 'tensorflow': choose one of torch, onnxruntime, openvino, tensorrt"),
    ("torch", "gpu", "unknown device 'gpu': use cpu, cuda or cuda:N"),
    ("torch", "mps", "unknown device 'mps'"),
    ("tensorrt", "cpu", "the tensorrt backend runs on NVIDIA GPUs only"),
    ("openvino", "cuda", "the openvino backend runs on the CPU only: use the cpu device"),
])
def test_selection_errors(name: str, device: str, message: str) -> None:
    with pytest.raises(UserError, match=message):
        resolve_backend(name, device)


@pytest.mark.usefixtures("no_tensorrt", "one_gpu")
def test_tensorrt_needs_tensorrt_installed() -> None:
    with pytest.raises(UserError, match=r"TensorRT is not installed: .*pip install 'ccld-trt\[tensorrt\]'"):
        resolve_backend("tensorrt", "cuda")


@pytest.mark.usefixtures("no_cuda")
@pytest.mark.parametrize("name", ["torch", "onnxruntime"])
def test_cuda_needs_a_gpu(name: str) -> None:
    with pytest.raises(UserError, match=r"device cuda is not usable: torch .* (CPU-only build|finds no NVIDIA GPU)"):
        resolve_backend(name, "cuda")


@pytest.mark.usefixtures("one_gpu")
def test_cuda_device_index_and_tensorrt_with_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(UserError, match="device cuda:3 does not exist: torch sees 1 CUDA device"):
        resolve_backend("torch", "cuda:3")
    monkeypatch.setattr(backend_select, "require_tensorrt", lambda: "10.13.0.35")
    assert resolve_backend("TensorRT", "cuda:0") == ("tensorrt", "cuda:0")


@pytest.mark.usefixtures("one_gpu")
def test_onnxruntime_on_cuda_needs_the_cuda_provider(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(UserError, match=r"no CUDA provider .*pip install 'ccld-trt\[gpu\]'"):
        resolve_backend("onnxruntime", "cuda")
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CUDAExecutionProvider"])
    assert resolve_backend("onnxruntime", "cuda") == ("onnxruntime", "cuda")


@pytest.mark.usefixtures("no_tensorrt", "no_cuda")
def test_doctor_says_tensorrt_is_missing() -> None:
    checks = {c.name: c for c in doctor_report()}
    assert checks["python"].ok and checks["torch"].ok and checks["onnxruntime"].ok
    assert not checks["cuda"].ok
    assert not checks["tensorrt"].ok and checks["tensorrt"].detail.startswith("TensorRT is not installed")
    assert checks["backend torch on cpu"].ok and checks["backend onnxruntime on cpu"].ok
    assert not checks["backend tensorrt on cuda"].ok and not checks["backend torch on cuda"].ok
    assert not checks["tensorrt-rtx"].ok
    assert checks["tensorrt-rtx"].detail.startswith("TensorRT-RTX is not installed")
    assert "pip install 'ccld-trt[tensorrt-rtx]'" in checks["tensorrt-rtx"].detail
    report = format_report(list(checks.values()))
    assert checks["openvino"].ok == checks["backend openvino on cpu"].ok  # installed or not, said alike
    assert len(report.splitlines()) == len(checks) and "cpu" in checks  # one line per check
    assert any(line.startswith("--  tensorrt ") and "TensorRT is not installed" in line for line in report.splitlines())


@pytest.mark.skipif(importlib.util.find_spec("tensorrt_rtx") is None, reason="needs tensorrt-rtx")
def test_doctor_reports_tensorrt_rtx() -> None:
    (rtx,) = [c for c in doctor_report() if c.name == "tensorrt-rtx"]
    assert rtx.ok and rtx.detail.startswith(tensorrt_rtx_version()) and "8.0, 8.6, 8.9" in rtx.detail


def tensorrt_rtx_version() -> str:
    import tensorrt_rtx

    return str(tensorrt_rtx.__version__)


def test_doctor_turns_a_crashing_probe_into_a_line(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken() -> Check:
        raise RuntimeError("CUDA driver initialization failed")

    monkeypatch.setattr(doctor, "_cuda", broken)
    (cuda,) = [c for c in doctor_report() if c.name == "cuda"]
    assert cuda == Check("cuda", False, "check failed: RuntimeError: CUDA driver initialization failed")


def test_doctor_says_what_this_cpu_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_cpu(monkeypatch, ZEN3)
    checks = {c.name: c for c in doctor_report()}
    assert checks["cpu"] == Check("cpu", True, "runs fp32 natively; no bf16 (needs avx512_bf16 or amx_bf16), no int8 "
                                  "(needs avx512_vnni or avx_vnni or amx_int8): torch and openvino refuse those "
                                  "precisions, the bench skips their rows and GEMM peaks (flags faked by "
                                  "$CCLD_TRT_CPU_FLAGS)")
    if checks["openvino"].ok:
        assert checks["openvino"].detail.endswith("; this CPU runs fp32 (default fp32)")
    fake_cpu(monkeypatch, SAPPHIRE_RAPIDS)
    checks = {c.name: c for c in doctor_report()}
    assert checks["cpu"].detail.startswith("runs fp32, bf16 (amx_bf16/avx512_bf16), int8 "
                                           "(amx_int8/avx512_vnni/avx_vnni) natively (flags faked")
    if checks["openvino"].ok:
        assert checks["openvino"].detail.endswith("; this CPU runs fp32, bf16, int8 (default bf16)")


def test_format_report() -> None:
    text = format_report([Check("python", True, "3.11.7"), Check("tensorrt", False, "not installed")])
    assert text == "ok  python    3.11.7\n--  tensorrt  not installed"

"""``doctor``: what this machine has (Python, torch and CUDA, ONNX Runtime, both TensorRT flavours,
cuda-python) and which backend can run on which device, and why not. Never fails: a missing GPU or library is a
line of the report."""

from __future__ import annotations

import functools
import importlib.metadata
import platform
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ccld_trt import cpu_features
from ccld_trt.backend_select import cuda_unavailable_reason, require_openvino, resolve_backend
from ccld_trt.engines.flavor import RTX_WHERE, require_flavor, rtx_capabilities
from ccld_trt.export.errors import UserError
from ccld_trt.export.quiet_imports import import_onnxruntime

BACKEND_DEVICES = (("torch", "cpu"), ("torch", "cuda"), ("onnxruntime", "cpu"), ("onnxruntime", "cuda"),
                   ("openvino", "cpu"), ("tensorrt", "cuda"))


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


def _python() -> Check:
    return Check("python", sys.version_info >= (3, 10), f"{platform.python_version()} ({sys.executable})")


def _torch() -> Check:
    build = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "CPU-only build"
    return Check("torch", True, f"{torch.__version__}, {build}")


def _nvidia_driver() -> str:
    """The NVIDIA driver version from nvidia-smi, or "unknown"."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return "unknown (no nvidia-smi)"
    try:
        out = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=10, check=True).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return "unknown (nvidia-smi failed)"
    return out[0] if out else "unknown"


def _cuda() -> Check:
    if not torch.cuda.is_available():
        return Check("cuda", False, f"not available: {cuda_unavailable_reason()}")
    major, minor = torch.cuda.get_device_capability(0)
    return Check("cuda", True, f"{torch.cuda.device_count()} GPU(s), cuda:0 = {torch.cuda.get_device_name(0)} "
                               f"(compute {major}.{minor}); CUDA {torch.version.cuda}; driver {_nvidia_driver()}")


def _onnxruntime() -> Check:
    try:
        ort = import_onnxruntime()
    except ImportError as e:
        return Check("onnxruntime", False, f"not installed ({e})")
    return Check("onnxruntime", True, f"{ort.__version__}, providers: {', '.join(ort.get_available_providers())}")


def _cpu() -> Check:
    """Which precisions this CPU runs natively (cpu_features), and what is refused or skipped for the others."""
    flags = cpu_features.cpu_flags()
    source = f" (flags faked by ${cpu_features.FLAGS_ENV})" if cpu_features.faked() else ""
    if flags is None:
        return Check("cpu", True, "flags unknown (no /proc/cpuinfo): no precision is refused, libraries decide")
    runs = cpu_features.native_precisions(flags)
    lacks = [f"{p} (needs {' or '.join(cpu_features.missing_instructions(p, flags))})"
             for p in cpu_features.CPU_PRECISIONS if p not in runs]
    named = []  # each precision with the flags that run it: "int8 (amx_int8/avx512_vnni)"
    for p in runs:
        has = sorted(flags & set(cpu_features.PRECISION_ISA.get(p, ())))
        named.append(f"{p} ({'/'.join(has)})" if has else p)
    detail = f"runs {', '.join(named)} natively"
    if lacks:
        detail += (f"; no {', no '.join(lacks)}: torch and openvino refuse those precisions, the bench skips "
                   "their rows and GEMM peaks")
    return Check("cpu", True, detail + source)


def _openvino() -> Check:
    try:
        ov = require_openvino()
    except UserError as e:
        return Check("openvino", False, str(e))
    runs = cpu_features.native_precisions()
    return Check("openvino", True, f"{ov.__version__}; this CPU runs {', '.join(runs)} "
                                   f"(default {cpu_features.default_cpu_precision()})")


def _tensorrt() -> Check:
    try:
        return Check("tensorrt", True, f"{require_flavor('tensorrt')}: builds and runs engines on this machine's "
                                       "GPU (datacenter GPUs need it)")
    except UserError as e:
        return Check("tensorrt", False, str(e))


def _tensorrt_rtx() -> Check:
    try:
        version = require_flavor("tensorrt-rtx")
    except UserError as e:
        return Check("tensorrt-rtx", False, str(e))
    return Check("tensorrt-rtx", True, f"{version}: builds engines ahead of time, GPU or not (this version "
                                       f"targets {', '.join(rtx_capabilities())}); {RTX_WHERE}")


def _cuda_python() -> Check:
    try:
        return Check("cuda-python", True, importlib.metadata.version("cuda-python"))
    except importlib.metadata.PackageNotFoundError:
        return Check("cuda-python", False, "not installed (optional: pip install 'ccld-trt[gpu]')")


def _backend(name: str, device: str) -> Check:
    try:
        resolve_backend(name, device)
    except UserError as e:
        return Check(f"backend {name} on {device}", False, str(e))
    return Check(f"backend {name} on {device}", True, "can run")


def _compile(device: str) -> Check:
    """Whether ``--backend torch --compile`` runs on ``device``: Inductor needs a C++ compiler on the CPU, Triton
    on CUDA."""
    from ccld_trt.backends.compiled import compile_problem, compile_toolchain, inductor_cache_dir

    name = f"backend torch --compile on {device}"
    if device == "cuda" and not torch.cuda.is_available():
        return Check(name, False, f"no GPU: {cuda_unavailable_reason()}")
    problem = compile_problem(device)
    if problem is not None:
        return Check(name, False, problem)
    return Check(name, True, f"can run ({compile_toolchain(device)}; compiled kernels cached in "
                             f"{inductor_cache_dir()})")


def _guarded(name: str, probe: Callable[[], Check]) -> Check:
    try:
        return probe()
    except Exception as e:  # a broken driver or library must become a line of the report, not a traceback
        return Check(name, False, f"check failed: {type(e).__name__}: {e}")


def doctor_report() -> list[Check]:
    """One Check per component, then one per (backend, device) pair."""
    probes: list[tuple[str, Callable[[], Check]]] = [
        ("python", _python), ("torch", _torch), ("cpu", _cpu), ("cuda", _cuda), ("onnxruntime", _onnxruntime),
        ("openvino", _openvino), ("tensorrt", _tensorrt), ("tensorrt-rtx", _tensorrt_rtx),
        ("cuda-python", _cuda_python)]
    probes += [(f"backend {b} on {d}", functools.partial(_backend, b, d)) for b, d in BACKEND_DEVICES]
    probes += [(f"backend torch --compile on {d}", functools.partial(_compile, d)) for d in ("cpu", "cuda")]
    return [_guarded(name, probe) for name, probe in probes]


def format_report(checks: list[Check]) -> str:
    """One line per check: ``ok`` or ``--``, the name, the detail."""
    width = max((len(c.name) for c in checks), default=0)
    return "\n".join(f"{'ok' if c.ok else '--'}  {c.name:<{width}}  {c.detail}" for c in checks)

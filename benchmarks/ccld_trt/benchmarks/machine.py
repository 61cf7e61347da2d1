"""What machine a benchmark ran on, the slug its results are filed under, and its measured GEMM peak."""

from __future__ import annotations

import datetime
import os
import platform
import re
import time
from pathlib import Path
from typing import Any

import torch

from ccld_trt.cpu_features import cpu_flags

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo, else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown-cpu"


# The flags (as /proc/cpuinfo names them) that say which precisions a CPU runs fast; the report lists the
# ones present.
ISA_FEATURES = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_tile", "amx_bf16",
                "amx_int8")


def cpu_identity() -> dict[str, Any]:
    """CPU vendor, family, model and stepping from /proc/cpuinfo, and the ISA_FEATURES it has (None where the
    file cannot be read)."""
    fields: dict[str, Any] = {"vendor": None, "family": None, "model": None, "stepping": None}
    names = {"vendor_id": "vendor", "cpu family": "family", "model": "model", "stepping": "stepping"}
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            key, _, value = (part.strip() for part in line.partition(":"))
            if key in names and fields[names[key]] is None:
                fields[names[key]] = int(value) if value.isdigit() else value
            if not line.strip():
                break  # the first processor's block is enough
    except OSError:
        pass
    flags = cpu_flags()
    fields["isa"] = None if flags is None else [f for f in ISA_FEATURES if f in flags]
    return fields


def usable_cores() -> int:
    """Logical cores this process may run on (the affinity mask, which containers narrow), not the host's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _ram_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:  # a broken install is as good as none for this report
        return None


def machine_info(device: str) -> dict[str, Any]:
    """CPU, cores, RAM, GPU (when ``device`` is CUDA), library versions and the date (UTC, ISO 8601)."""
    dev = torch.device(device)
    ram = _ram_bytes()
    gpu = None
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        gpu = {"name": props.name, "memory_gb": round(props.total_memory / 2**30, 1),
               "compute_capability": f"{props.major}.{props.minor}", "cuda": torch.version.cuda}
    return {
        "cpu_model": cpu_model(),
        "cpu": cpu_identity(),
        "cores": usable_cores(),
        "torch_threads": torch.get_num_threads(),
        "ram_gb": round(ram / 2**30, 1) if ram else None,
        "gpu": gpu,
        "device": str(dev),
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": _version("onnxruntime"),
        "openvino": _version("openvino"),
        "tensorrt": _version("tensorrt"),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def slugify(text: str) -> str:
    """Lower-case words joined by '-': "NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3"."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def machine_slug(info: dict[str, Any]) -> str:
    """Directory name for results: the GPU's name on CUDA runs, else the CPU model and core count."""
    if info.get("gpu"):
        return slugify(info["gpu"]["name"])
    return slugify(f"{info['cpu_model']} {info['cores']}c")


def gemm_peak_gflops(device: str, precision: str = "fp32", size: int | None = None,
                     min_seconds: float = 1.0) -> float:
    """Best GFLOP/s of a square ``size`` matmul in ``precision``, repeated for at least ``min_seconds``.

    The machine's practical compute ceiling, which achieved FLOP/s of the stages are compared with. Sizes
    default to 2048 on the CPU and 8192 on CUDA, large enough to reach the steady-state rate.
    """
    dev = torch.device(device)
    n = size or (8192 if dev.type == "cuda" else 2048)
    gen = torch.Generator(device=dev).manual_seed(0)
    a = torch.randn(n, n, device=dev, generator=gen).to(DTYPES[precision])
    b = torch.randn(n, n, device=dev, generator=gen).to(DTYPES[precision])
    flops = 2 * n**3
    torch.matmul(a, b)  # first call: library initialisation, kernel selection
    best_s = float("inf")
    deadline = time.perf_counter() + min_seconds
    repeats = 0
    while repeats < 3 or time.perf_counter() < deadline:
        if dev.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            torch.matmul(a, b)
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            torch.matmul(a, b)
            seconds = time.perf_counter() - t0
        best_s = min(best_s, seconds)
        repeats += 1
    return flops / best_s / 1e9

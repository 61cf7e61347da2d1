"""The machine's compute peak per precision, from the GEMM kernels that reach it, and the CPU features that
decide which precisions have one.

One library's GEMM is not the machine's peak: on some CPUs torch's fp32 matmul reaches half of what ONNX
Runtime's (MLAS) or OpenVINO's (oneDNN) do on the same core, and a stage of the U-Net then runs "above the
peak". So each precision is measured with every kernel installed that runs it (a square n x n x n product, the
weight matrix a constant as in a network), and the best counts: fp32 with torch, ONNX Runtime and OpenVINO;
bf16 with torch and OpenVINO; int8 (u8 x s8 products into int32 sums, the form VNNI runs) with ONNX Runtime's
MatMulInteger and OpenVINO's quantised MatMul. On CUDA the torch matmul per precision stays (cuBLAS is the peak).
int8 rates are integer operations per second, reported in the same GFLOP/s column.

A precision the CPU has no instructions for (cpu_features: bf16 dot products, VNNI) gets no peak: emulated it is
no figure of the machine (torch's emulated bf16 matmul takes a minute a call on an AVX2-only CPU, and ONNX
Runtime's int8 product without VNNI sums byte pairs in saturating 16 bits, wrong for full-range operands).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ccld_trt.benchmarks.machine import gemm_peak_gflops
from ccld_trt.cpu_features import physical_cores, precision_problem
from ccld_trt.export.quiet_imports import import_onnxruntime, import_openvino

CPU_PRECISIONS = ("fp32", "bf16", "int8")
CUDA_PRECISIONS = ("fp32", "fp16", "bf16")
CPU_SIZE = 2048


def _best_gflops(run: Callable[[], object], ops: float, min_seconds: float) -> float:
    """Best rate of ``run`` (``ops`` operations per call) over repeats for at least ``min_seconds``."""
    run()  # first call: library initialisation, kernel selection, weight packing
    best = float("inf")
    repeats = 0
    deadline = time.perf_counter() + min_seconds
    while repeats < 3 or time.perf_counter() < deadline:
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
        repeats += 1
    return ops / best / 1e9


def _onnxruntime_matmul(n: int, int8: bool) -> Callable[[], object]:
    """An ONNX Runtime CPU session of one n x n MatMul (fp32) or MatMulInteger (u8 x s8 -> int32), the right
    operand a constant; returns a call on a fixed random left operand."""
    import onnx
    ort = import_onnxruntime()
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    a: np.ndarray
    if int8:
        a = rng.integers(0, 255, (n, n), dtype=np.uint8)
        b = numpy_helper.from_array(rng.integers(-127, 127, (n, n), dtype=np.int8), "b")
        node = helper.make_node("MatMulInteger", ["a", "b"], ["y"])
        a_type, y_type = TensorProto.UINT8, TensorProto.INT32
    else:
        a = rng.standard_normal((n, n), dtype=np.float32)
        b = numpy_helper.from_array(rng.standard_normal((n, n), dtype=np.float32), "b")
        node = helper.make_node("MatMul", ["a", "b"], ["y"])
        a_type = y_type = TensorProto.FLOAT
    graph = helper.make_graph([node], "gemm", [helper.make_tensor_value_info("a", a_type, [n, n])],
                              [helper.make_tensor_value_info("y", y_type, [n, n])], [b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(onnx.shape_inference.infer_shapes(model).SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    return lambda: session.run(None, {"a": a})


def _openvino_matmul(n: int, precision: str) -> Callable[[], object]:
    """An OpenVINO CPU model of one n x n MatMul, the right operand a constant: fp32 or bf16 (the inference
    precision hint), or int8 (both operands through 256-level FakeQuantize, which OpenVINO runs as an int8
    GEMM); returns a call on a fixed random left operand."""
    ov = import_openvino()
    import openvino.opset13 as ops

    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    param = ops.parameter([n, n], ov.Type.f32, name="a")
    left: Any = param
    right: Any = ops.constant(rng.standard_normal((n, n), dtype=np.float32))
    if precision == "int8":
        def fake_quantize(x: Any, low: float, high: float, levels: int) -> Any:
            lo, hi = ops.constant(np.float32(low)), ops.constant(np.float32(high))
            return ops.fake_quantize(x, lo, hi, lo, hi, levels)

        left = fake_quantize(left, 0.0, 4.0, 256)  # unsigned activations, as after a ReLU
        right = fake_quantize(right, -4.0, 4.0, 255)  # symmetric signed weights
    model = ov.Model([ops.matmul(left, right, False, False)], [param], "gemm")
    hint = "bf16" if precision == "bf16" else "f32"
    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": hint, "NUM_STREAMS": 1,
                                                      "INFERENCE_NUM_THREADS": physical_cores()})
    request = compiled.create_infer_request()
    return lambda: request.infer({0: a}, share_inputs=True, share_outputs=True)


def cpu_kernels(n: int = CPU_SIZE) -> dict[str, dict[str, Callable[[], Callable[[], object]]]]:
    """{precision: {kernel name: factory of its timed call}} of the CPU GEMMs (factories, so that a library
    that is not installed only fails its own entry)."""
    return {
        "fp32": {"torch": lambda: _torch_matmul(n, torch.float32), "onnxruntime": lambda: _onnxruntime_matmul(n, False),
                 "openvino": lambda: _openvino_matmul(n, "fp32")},
        "bf16": {"torch": lambda: _torch_matmul(n, torch.bfloat16), "openvino": lambda: _openvino_matmul(n, "bf16")},
        "int8": {"onnxruntime": lambda: _onnxruntime_matmul(n, True), "openvino": lambda: _openvino_matmul(n, "int8")},
    }


def _torch_matmul(n: int, dtype: torch.dtype) -> Callable[[], object]:
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(dtype)
    b = torch.randn(n, n, generator=gen).to(dtype)
    return lambda: torch.matmul(a, b)


def skipped_peaks(device: str) -> dict[str, str]:
    """{precision: why} of the GEMM peaks not measured on ``device`` because the CPU lacks the precision's
    instructions (one line each); none on CUDA."""
    if torch.device(device).type == "cuda":
        return {}
    problems = {p: precision_problem(f"the {p} GEMM peak", p) for p in CPU_PRECISIONS}
    return {p: why for p, why in problems.items() if why}


def cpu_peaks(min_seconds: float = 0.5, n: int = CPU_SIZE,
              precisions: tuple[str, ...] = CPU_PRECISIONS) -> dict[str, dict[str, float]]:
    """{precision: {kernel: GFLOP/s (GOP/s for int8)}} of every CPU kernel that runs here; precisions the CPU
    has no instructions for (skipped_peaks) and kernels whose library is missing or refuses are left out."""
    rates: dict[str, dict[str, float]] = {}
    skipped = skipped_peaks("cpu")
    for precision in (p for p in precisions if p not in skipped):
        for kernel, factory in cpu_kernels(n)[precision].items():
            try:
                call = factory()
            except Exception:  # not installed, or this CPU/library cannot run it: no entry
                continue
            rates.setdefault(precision, {})[kernel] = _best_gflops(call, 2.0 * n**3, min_seconds)
            del call
    return rates


def measure_peaks(device: str, min_seconds: float = 0.5) -> dict[str, dict[str, float]]:
    """{precision: {kernel: GFLOP/s}}: the CPU kernels of ``cpu_peaks``, or torch's matmul per precision on
    CUDA."""
    if torch.device(device).type == "cuda":
        return {p: {"torch": gemm_peak_gflops(device, p, min_seconds=min_seconds)} for p in CUDA_PRECISIONS}
    return cpu_peaks(min_seconds)


def best_peaks(rates: dict[str, dict[str, float]]) -> dict[str, float]:
    """The peak per precision: the best kernel's rate."""
    return {p: max(kernels.values()) for p, kernels in rates.items() if kernels}


def peak_fraction(achieved_gflops: float | None, precision: str, peaks: dict[str, float],
                  device_type: str) -> tuple[float | None, str | None]:
    """(achieved / the peak of ``precision``, None) -- or (None, why) when there is no such peak, or when the
    share exceeds 1: a stage cannot outrun the machine, so that is a measurement error (a peak measured in a
    slow spell, or a FLOP count above what the backend computes), not a result. On the CPU, fp16 graphs run
    their arithmetic in fp32 (ONNX Runtime's CPU kernels), so their share is of the fp32 peak."""
    if achieved_gflops is None:
        return None, None
    key = "fp32" if precision == "fp16" and device_type == "cpu" else precision
    peak = peaks.get(key)
    if not peak:
        return None, None
    share = achieved_gflops / peak
    if share > 1.0:
        return None, (f"{100 * share:.0f} % of the measured {key} peak ({peak:,.0f} GFLOP/s): a measurement "
                      "error, not reported")
    return share, None

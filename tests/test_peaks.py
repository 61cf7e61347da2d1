"""The benchmark's compute peaks per precision (benchmarks/peaks.py): each kernel computes its product, the best
kernel counts, a share above 100 % is a measurement error, and the report names the CPU and its ISA."""

from __future__ import annotations

import numpy as np
import pytest

from ccld_trt.benchmarks.machine import ISA_FEATURES, cpu_identity
from ccld_trt.benchmarks.peaks import _onnxruntime_matmul, best_peaks, cpu_peaks, peak_fraction, skipped_peaks
from ccld_trt.cpu_features import runs_natively
from cpu_fakes import ALDER_LAKE, ZEN3, fake_cpu


def test_best_kernel_is_the_peak() -> None:
    rates = {"fp32": {"torch": 200.0, "onnxruntime": 412.0}, "bf16": {"openvino": 644.0}, "int8": {}}
    assert best_peaks(rates) == {"fp32": 412.0, "bf16": 644.0}


def test_peak_fraction_uses_the_rows_precision_and_refuses_above_100_percent() -> None:
    peaks = {"fp32": 400.0, "bf16": 800.0, "int8": 1600.0}
    assert peak_fraction(200.0, "bf16", peaks, "cpu") == (0.25, None)
    assert peak_fraction(200.0, "fp32", peaks, "cpu") == (0.5, None)
    assert peak_fraction(200.0, "fp16", peaks, "cpu") == (0.5, None)  # CPU fp16 graphs compute in fp32
    assert peak_fraction(200.0, "fp16", peaks, "cuda") == (None, None)  # no fp16 peak measured
    assert peak_fraction(None, "fp32", peaks, "cpu") == (None, None)
    share, error = peak_fraction(500.0, "fp32", peaks, "cpu")
    assert share is None and error is not None and "125 %" in error and "measurement error" in error


# Without VNNI, MLAS sums u8 x s8 byte products in saturating 16-bit pairs (vpmaddubsw): full-range operands
# come out wrong there, by the library's design. The bench skips that peak on such CPUs, and so does this test.
@pytest.mark.skipif(not runs_natively("int8"), reason="this CPU has no VNNI: int8 products saturate in 16 bits")
def test_onnxruntime_int8_kernel_computes_the_integer_product() -> None:
    call = _onnxruntime_matmul(32, int8=True)
    (out,) = call()
    rng = np.random.default_rng(0)  # the kernel's own operands, drawn in the same order
    a = rng.integers(0, 255, (32, 32), dtype=np.uint8).astype(np.int64)
    b = rng.integers(-127, 127, (32, 32), dtype=np.int8).astype(np.int64)
    np.testing.assert_array_equal(out, a @ b)


def test_openvino_int8_kernel_computes_the_quantised_product() -> None:
    pytest.importorskip("openvino")
    from ccld_trt.benchmarks.peaks import _openvino_matmul

    (out,) = _openvino_matmul(64, "int8")().values()
    rng = np.random.default_rng(0)
    a = rng.standard_normal((64, 64), dtype=np.float32)
    b = rng.standard_normal((64, 64), dtype=np.float32)
    qa = np.round(np.clip(a, 0, 4) / (4 / 255)) * (4 / 255)
    qb = np.round(np.clip(b, -4, 4) / (8 / 254)) * (8 / 254)
    expected = qa @ qb
    assert np.linalg.norm(np.asarray(out) - expected) / np.linalg.norm(expected) < 1e-2


def test_cpu_peaks_measure_every_precision_this_cpu_runs() -> None:
    rates = cpu_peaks(min_seconds=0.01, n=64)
    assert "torch" in rates["fp32"] and "onnxruntime" in rates["fp32"]
    assert all(v > 0 for kernels in rates.values() for v in kernels.values())
    if runs_natively("bf16"):
        assert "torch" in rates["bf16"]
    if runs_natively("int8"):
        assert "onnxruntime" in rates["int8"]


def test_peaks_the_cpu_has_no_instructions_for_are_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_cpu(monkeypatch, ZEN3)
    assert set(cpu_peaks(min_seconds=0.01, n=64)) == {"fp32"}
    assert skipped_peaks("cpu") == {
        "bf16": "the bf16 GEMM peak needs a CPU with avx512_bf16 or amx_bf16 instructions, and this one has none",
        "int8": "the int8 GEMM peak needs a CPU with avx512_vnni or avx_vnni or amx_int8 instructions, and this "
                "one has none"}
    assert skipped_peaks("cuda") == {}  # torch's GPU matmuls do not depend on the CPU
    fake_cpu(monkeypatch, ALDER_LAKE)  # VNNI without bf16
    assert set(skipped_peaks("cpu")) == {"bf16"}
    assert "bf16" not in cpu_peaks(min_seconds=0.01, n=64)


def test_cpu_identity_lists_known_features_only() -> None:
    identity = cpu_identity()
    assert set(identity) == {"vendor", "family", "model", "stepping", "isa"}
    if identity["isa"] is not None:
        assert set(identity["isa"]) <= set(ISA_FEATURES)
        assert isinstance(identity["family"], int)

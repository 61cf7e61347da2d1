"""Fake CPUs for the tests: the /proc/cpuinfo flags that matter of real ones, set through $CCLD_TRT_CPU_FLAGS
(cpu_features), which the bench's workers and CLI subprocesses inherit."""

from __future__ import annotations

import pytest

from ccld_trt.cpu_features import FLAGS_ENV

# AMD EPYC family 25 model 1 (CI on some days): AVX2, no AVX-512, no bf16 or VNNI dot products
ZEN3 = frozenset({"avx2", "fma"})
ZEN4 = frozenset({"avx2", "avx512f", "avx512_bf16", "avx512_vnni"})
SKYLAKE = frozenset({"avx2", "avx512f"})
HASWELL = frozenset({"avx2", "fma"})
ALDER_LAKE = frozenset({"avx2", "avx_vnni"})
SAPPHIRE_RAPIDS = frozenset({"avx512f", "avx512_bf16", "amx_bf16", "amx_int8", "avx512_vnni", "avx_vnni"})


def fake_cpu(monkeypatch: pytest.MonkeyPatch, flags: frozenset[str]) -> None:
    """This process and its children see a CPU with ``flags`` until the test ends."""
    monkeypatch.setenv(FLAGS_ENV, " ".join(sorted(flags)))

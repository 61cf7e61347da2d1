"""What this CPU runs natively (runtime/ccld_trt/cpu_features.py), on faked CPUs so that every host runs every
case: the flags read once and fakeable, which precisions each CPU runs, and the backends' answers on a CPU
without bf16 or VNNI dot products (torch bf16 refused in one line, OpenVINO's default fp32)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ccld_trt import backend_select, cpu_features
from ccld_trt.cpu_features import (
    FLAGS_ENV,
    cpu_flags,
    default_cpu_precision,
    missing_instructions,
    native_precisions,
    precision_problem,
)
from ccld_trt.export.errors import UserError
from cpu_fakes import ALDER_LAKE, HASWELL, SAPPHIRE_RAPIDS, SKYLAKE, ZEN3, ZEN4, fake_cpu


def test_flags_are_read_once_and_can_be_faked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(FLAGS_ENV, raising=False)
    real = cpu_flags()
    assert cpu_flags() is real  # the same cached object: /proc/cpuinfo is read once
    assert real is None or "fpu" in real  # None: a kernel without a flags line (not x86)
    monkeypatch.setenv(FLAGS_ENV, "avx2, fma avx512_vnni")
    assert cpu_flags() == {"avx2", "fma", "avx512_vnni"} and cpu_features.faked()
    monkeypatch.setenv(FLAGS_ENV, "")  # a CPU with no flags at all, not "unknown"
    assert cpu_flags() == frozenset() and native_precisions() == ("fp32",)


@pytest.mark.parametrize(("flags", "runs"), [
    (ZEN3, ("fp32",)),
    (HASWELL, ("fp32",)),
    (SKYLAKE, ("fp32",)),
    (ALDER_LAKE, ("fp32", "int8")),
    (ZEN4, ("fp32", "bf16", "int8")),
    (SAPPHIRE_RAPIDS, ("fp32", "bf16", "int8")),
])
def test_native_precisions(flags: frozenset[str], runs: tuple[str, ...], monkeypatch: pytest.MonkeyPatch) -> None:
    assert native_precisions(flags) == runs
    fake_cpu(monkeypatch, flags)
    assert native_precisions() == runs  # the faked flags are the default
    assert default_cpu_precision() == ("bf16" if "bf16" in runs else "fp32")
    assert missing_instructions("fp16") == missing_instructions("fp32") == ()  # need nothing


def test_unknown_flags_refuse_nothing_and_default_to_fp32() -> None:
    unknown: frozenset[str] | None = None
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cpu_features, "cpu_flags", lambda: unknown)
        assert native_precisions() == ("fp32", "bf16", "int8")
        assert precision_problem("openvino int8", "int8") is None
        assert default_cpu_precision() == "fp32"


def test_problems_are_one_line_and_suggest_what_runs() -> None:
    assert precision_problem("x int8", "int8", ZEN3, instead=("fp32", "bf16")) == (
        "x int8 needs a CPU with avx512_vnni or avx_vnni or amx_int8 instructions, and this one has none; use fp32")
    with_bf16 = precision_problem("x int8", "int8", SKYLAKE | {"avx512_bf16"}, instead=("fp32", "bf16"))
    assert with_bf16 is not None and with_bf16.endswith("; use fp32 or bf16")
    assert precision_problem("the bf16 GEMM peak", "bf16", ZEN3) == (
        "the bf16 GEMM peak needs a CPU with avx512_bf16 or amx_bf16 instructions, and this one has none")
    assert precision_problem("x bf16", "bf16", ZEN4) is None


def test_torch_bf16_is_refused_on_a_cpu_without_bf16(monkeypatch: pytest.MonkeyPatch, seed3_dir: Path) -> None:
    from ccld_trt.backends.torch_backend import TorchBackend
    from ccld_trt.export.models import ModelFiles, load_networks

    networks = load_networks(ModelFiles.resolve(seed3_dir))
    fake_cpu(monkeypatch, ZEN3)
    with pytest.raises(UserError, match=r"^torch bf16 needs a CPU with avx512_bf16 or amx_bf16 instructions, "
                                        r"and this one has none; use fp32$"):
        TorchBackend(networks, "cpu", "bf16")
    assert TorchBackend(networks, "cpu", "fp32").precision == "fp32"
    fake_cpu(monkeypatch, SAPPHIRE_RAPIDS)
    assert TorchBackend(networks, "cpu", "bf16").precision == "bf16"


def test_sample_refuses_torch_bf16_in_one_line(seed3_dir: Path, tmp_path: Path) -> None:
    env = {**os.environ, FLAGS_ENV: " ".join(sorted(ZEN3))}  # the fake reaches the subprocess
    result = subprocess.run([sys.executable, "-m", "ccld_trt", "sample", "a cat", "--models", str(seed3_dir),
                             "--backend", "torch", "--precision", "bf16", "--steps", "1", "--output-dir",
                             str(tmp_path)], capture_output=True, text=True, env=env, timeout=300)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert lines[-1].endswith("torch bf16 needs a CPU with avx512_bf16 or amx_bf16 instructions, and this one has "
                              "none; use fp32"), result.stderr
    assert not list(tmp_path.glob("*.png"))


def test_openvino_defaults_to_fp32_without_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_cpu(monkeypatch, ZEN3)
    assert backend_select.default_precision("openvino", "cpu") == "fp32"
    with pytest.raises(UserError, match=r"^openvino int8 needs .*avx512_vnni.*; use fp32$"):
        backend_select.check_cpu_precision("openvino", "int8")
    assert backend_select.check_cpu_precision("openvino", "int8", "cuda") == "int8"  # the CPU's flags only
    fake_cpu(monkeypatch, ZEN4)
    assert backend_select.default_precision("openvino", "cpu") == "bf16"
    assert backend_select.default_precision("torch", "cpu") == "fp32"


def test_backend_selection_does_not_import_the_openvino_backend() -> None:
    """backend_select sits below the backends: it answers for openvino without importing its module (they
    imported each other)."""
    code = ("import sys; from ccld_trt import backend_select as b; b.default_precision('openvino', 'cpu'); "
            "b.check_cpu_precision('openvino', 'bf16');\n"
            "try: b.resolve_backend('openvino', 'cpu')\nexcept b.UserError: pass\n"
            "print('ccld_trt.backends.openvino_backend' in sys.modules)")
    env = {**os.environ, FLAGS_ENV: " ".join(sorted(SAPPHIRE_RAPIDS))}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120,
                         check=True)
    assert out.stdout.strip() == "False"

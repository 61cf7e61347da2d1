"""What this CPU runs natively: its feature flags, read once, and the reduced precisions they make worth running.

fp32 always runs. bf16 needs bf16 dot-product instructions (avx512_bf16 or amx_bf16) and int8 needs VNNI
(avx512_vnni, avx_vnni or amx_int8): without them torch emulates bf16 (on an AVX2-only Zen 3 a 2048x2048 bf16
matmul takes a minute, fp32 well under a second), OpenVINO would run bf16 as fp32, and int8 kernels sum byte
products in saturating 16-bit pairs (ONNX Runtime's MatMulInteger then gets full-range operands wrong). So the
backends refuse such a precision, the bench skips its rows and GEMM peaks, and ``doctor`` says which run.

The flags come from /proc/cpuinfo, read once per process. ``$CCLD_TRT_CPU_FLAGS`` (space- or comma-separated
flags, empty for none) replaces them: tests fake another CPU with it, and it reaches subprocesses (the bench's
workers, a served page) as it is. Where the flags cannot be read (not Linux), nothing is refused: the libraries
decide, and defaults stay at fp32.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

FLAGS_ENV = "CCLD_TRT_CPU_FLAGS"
CPU_PRECISIONS = ("fp32", "bf16", "int8")
# The flags (as /proc/cpuinfo spells them) of the dot-product instructions each reduced precision needs; any one
# of them is enough. Precisions not listed (fp32; fp16 graphs, which the CPU computes in fp32) need none.
PRECISION_ISA: dict[str, tuple[str, ...]] = {
    "bf16": ("avx512_bf16", "amx_bf16"),
    "int8": ("avx512_vnni", "avx_vnni", "amx_int8"),
}


@functools.cache
def _cpuinfo_flags() -> frozenset[str] | None:
    """The first processor's ``flags`` line of /proc/cpuinfo; None where the file cannot be read."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8")
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return None


def faked() -> bool:
    """Whether ``$CCLD_TRT_CPU_FLAGS`` replaces the CPU's own flags."""
    return os.environ.get(FLAGS_ENV) is not None


def cpu_flags() -> frozenset[str] | None:
    """This CPU's feature flags: ``$CCLD_TRT_CPU_FLAGS`` when set, else /proc/cpuinfo's (read once); None when
    unknown."""
    fake = os.environ.get(FLAGS_ENV)
    if fake is not None:
        return frozenset(fake.replace(",", " ").split())
    return _cpuinfo_flags()


def _flags_or_cpu(flags: frozenset[str] | None) -> frozenset[str] | None:
    return cpu_flags() if flags is None else flags


def missing_instructions(precision: str, flags: frozenset[str] | None = None) -> tuple[str, ...]:
    """The instructions ``precision`` needs one of when the CPU (``flags``, default ``cpu_flags()``) has none of
    them; () when it runs natively, needs none, or the flags are unknown."""
    needs = PRECISION_ISA.get(precision, ())
    flags = _flags_or_cpu(flags)
    if not needs or flags is None or flags & set(needs):
        return ()
    return needs


def runs_natively(precision: str, flags: frozenset[str] | None = None) -> bool:
    """Whether the CPU has the instructions ``precision`` needs (True when it needs none; with unknown flags
    True as well, since nothing is refused then)."""
    return not missing_instructions(precision, flags)


def native_precisions(flags: frozenset[str] | None = None) -> tuple[str, ...]:
    """The CPU_PRECISIONS this CPU runs natively, in that order."""
    return tuple(p for p in CPU_PRECISIONS if runs_natively(p, flags))


def precision_problem(subject: str, precision: str, flags: frozenset[str] | None = None,
                      instead: tuple[str, ...] = ()) -> str | None:
    """Why ``subject`` (e.g. "openvino bf16", "the int8 GEMM peak") cannot run on this CPU, in one line; None
    when it can. ``instead``: precisions to suggest, those this CPU runs natively ("; use fp32 or bf16")."""
    needs = missing_instructions(precision, flags)
    if not needs:
        return None
    others = [p for p in instead if p != precision and runs_natively(p, flags)]
    return (f"{subject} needs a CPU with {' or '.join(needs)} instructions, and this one has none"
            + (f"; use {' or '.join(others)}" if others else ""))


def default_cpu_precision(flags: frozenset[str] | None = None) -> str:
    """bf16 where the CPU's flags are known and include bf16 dot products, else fp32: the default of backends
    that run bf16 at no accuracy cost worth refusing (OpenVINO)."""
    flags = _flags_or_cpu(flags)
    return "bf16" if flags is not None and runs_natively("bf16", flags) else "fp32"


def physical_cores() -> int:
    """Physical cores among the CPUs this process may run on (SMT siblings count once): the thread count that
    compute-bound kernels scale to. Falls back to the logical count where the topology is unknown."""
    try:
        allowed = os.sched_getaffinity(0)
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
    cores = set()
    for cpu in allowed:
        siblings = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list")
        try:
            cores.add(siblings.read_text(encoding="utf-8").strip())
        except OSError:
            cores.add(str(cpu))
    return max(1, len(cores))

"""The rows of a benchmark document: one Record per measurement, one Skip per variant that did not run (or
stopped) and why. Both serialize with ``dataclasses.asdict`` to the keys ``report`` reads."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ccld_trt.benchmarks.flops import Cost
from ccld_trt.benchmarks.plan import Variant
from ccld_trt.benchmarks.timing import Measurement, summarize_ms


@dataclass
class Record:
    """One measured row. Times in milliseconds; memory in MiB; ``flops`` per call; ``batch``: images per call
    (the U-Net runs ``rows`` = batch * conditions); correctness fields are set on end-to-end rows only."""

    backend: str
    precision: str
    device: str
    stage: str
    batch: int
    median_ms: float
    p90_ms: float
    min_ms: float
    repeats: int
    warmup: int
    flops: int | None
    weight_bytes: int | None
    activation_bytes: int | None
    achieved_gflops: float | None
    peak_fraction: float | None          # achieved / the measured GEMM peak of its precision (set at the end)
    peak_rss_mb: float
    rss_scope: str                       # "measurement" (peak reset before it) or "process" (lifetime peak)
    device_peak_mb: float | None         # torch.cuda.max_memory_allocated: torch allocations only
    rows: int | None = None
    steps: int | None = None
    n: int | None = None
    images_per_s: float | None = None
    latents_rel_error: float | None = None
    psnr_db: float | None = None         # None when the pixels are identical (infinite PSNR)
    pixels_max_abs_diff: int | None = None
    flagged: bool = False
    flag_reason: str | None = None
    peak_error: str | None = None        # why peak_fraction is not reported although it was computed (> 100 %)


@dataclass(frozen=True)
class Skip:
    """A variant missing from the results, or from some of them: it could not open here, failed while
    measuring (its finished rows stay), or (the reference) could not produce the correctness outputs.
    ``reason`` is one line for the report."""

    backend: str
    precision: str
    reason: str

    @classmethod
    def of(cls, variant: Variant, reason: str) -> Skip:
        return cls(variant.backend, variant.precision, reason)

    @classmethod
    def failed_while_measuring(cls, variant: Variant, reason: str) -> Skip:
        return cls.of(variant, f"failed while measuring: {reason}")


def make_record(device: str, variant: Variant, stage: str, batch: int, m: Measurement, cost: Cost | None,
                warmup: int, **extra: Any) -> Record:
    """The row of measurement ``m`` of ``stage`` at ``batch``; achieved GFLOP/s from ``cost`` and the median
    time (peak_fraction is set later, once the run's GEMM peak is known); ``extra``: the optional fields."""
    median, p90, low = summarize_ms(m.samples_ms)
    achieved = cost.flops / (median / 1e3) / 1e9 if cost and median > 0 else None
    return Record(
        backend=variant.backend, precision=variant.precision, device=device, stage=stage, batch=batch,
        median_ms=median, p90_ms=p90, min_ms=low, repeats=len(m.samples_ms), warmup=warmup,
        flops=cost.flops if cost else None, weight_bytes=cost.weight_bytes if cost else None,
        activation_bytes=cost.activation_bytes if cost else None, achieved_gflops=achieved, peak_fraction=None,
        peak_rss_mb=m.peak_rss_mb, rss_scope=m.rss_scope, device_peak_mb=m.device_peak_mb, **extra)

"""Timing and memory of one measured call: marks in time (host clock or CUDA events), the process's peak
RSS, repeated calls from an idle device, and the summary statistics of their times."""

from __future__ import annotations

import re
import resource
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ccld_trt.pipeline import synchronize

Mark = float | torch.cuda.Event

_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


@dataclass
class Measurement:
    """Repeated calls of one function: their times in ms, peak host RSS in MiB (``rss_scope`` says over what:
    "measurement" or "process"), peak torch device memory in MiB (CUDA only) and the last call's output."""

    samples_ms: list[float]
    peak_rss_mb: float
    rss_scope: str
    device_peak_mb: float | None
    output: Any


def mark(device: torch.device) -> Mark:
    """A point in time: the host clock on the CPU, an event in the current stream on CUDA."""
    if device.type == "cuda":
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event
    return time.perf_counter()


def elapsed_ms(start: Mark, end: Mark) -> float:
    if isinstance(start, torch.cuda.Event) and isinstance(end, torch.cuda.Event):
        end.synchronize()
        return start.elapsed_time(end)
    assert isinstance(start, float) and isinstance(end, float)
    return (end - start) * 1e3


def _reset_peak_rss() -> str:
    """Reset the kernel's peak-RSS counter of this process; returns the scope the next reading has."""
    try:
        _CLEAR_REFS.write_text("5", encoding="utf-8")  # Linux: "5" resets VmHWM to the current RSS
        return "measurement"
    except OSError:
        return "process"


def _peak_rss_mb() -> float:
    try:
        match = re.search(r"VmHWM:\s+(\d+) kB", _STATUS.read_text(encoding="utf-8"))
        if match:
            return int(match.group(1)) / 1024
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def measure(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> Measurement:
    """Call ``fn`` warmup + repeats times; time the repeats, each from an idle device (CUDA events on GPU,
    perf_counter on CPU), and read peak host RSS and peak torch device memory over the repeats.

    Events bracket the call on the current stream after a synchronize, so they also time a backend that
    blocks the host while its own stream works: the start event fires at once on the idle stream.
    """
    for _ in range(warmup):
        fn()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    scope = _reset_peak_rss()
    samples, output = [], None
    for _ in range(repeats):
        synchronize(device)
        start = mark(device)
        output = fn()
        end = mark(device)
        samples.append(elapsed_ms(start, end))
    device_peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return Measurement(samples, _peak_rss_mb(), scope, device_peak, output)


def merged(measurements: Sequence[Measurement]) -> Measurement:
    """Several measurements of the same call as one: all their samples, the highest peaks, the last output."""
    first = measurements[0]
    device_peak = None if first.device_peak_mb is None else max(m.device_peak_mb or 0.0 for m in measurements)
    return Measurement([t for m in measurements for t in m.samples_ms], max(m.peak_rss_mb for m in measurements),
                       first.rss_scope, device_peak, measurements[-1].output)


def summarize_ms(samples: Sequence[float]) -> tuple[float, float, float]:
    """(median, p90, min) of timings in ms; p90 interpolates linearly between samples."""
    a = np.asarray(samples, dtype=np.float64)
    return float(np.median(a)), float(np.percentile(a, 90)), float(a.min())

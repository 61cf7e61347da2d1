"""``ccld-trt bench``: latency, throughput, memory, FLOP/s and correctness of every backend and precision that
runs on this machine, per stage and end to end, in one run.

Stages (all at the full-size architectures unless told otherwise):

* ``text-encoder``: one prompt, tokens [1, 77]; ``image-encoder``: one image prompt, pixels [1, 3, S, S];
* ``unet``: one U-Net/CFG evaluation at batch B, x [B, 4, 32, 32] with 2 conditions (zero + one text prompt),
  so B * 2 U-Net rows;
* ``sampler-step``: one PLMS step after its Runge-Kutta warm-up (one evaluation plus the sampler arithmetic),
  timed between consecutive evaluations inside the end-to-end runs, so it costs no extra model calls;
* ``decoder``: latents [B, 4, 32, 32] -> images [B, 3, 256, 256];
* ``end-to-end``: text prompt -> n decoded uint8 images, PLMS, all n in one batch.

Each backend runs in a process of its own (BackendProcess): the stages of one backend after another, then the
end-to-end runs with the backends' repeats interleaved, so that a shared machine's slow spells do not land on
one backend only. Each backend's end-to-end latents and pixels are compared with torch fp32 on the same seed;
a backend that is fast but wrong is flagged.
"""

from __future__ import annotations

import contextlib
import gc
import multiprocessing
import os
import re
import resource
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from functools import partial
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from tqdm import tqdm

from ccld_trt.backend_select import BACKENDS as SELECTABLE_BACKENDS
from ccld_trt.backend_select import cuda_unavailable_reason, resolve_backend
from ccld_trt.backends.base import Backend
from ccld_trt.backends.onnxruntime_backend import OnnxRuntimeBackend
from ccld_trt.benchmarks.flops import Cost, end_to_end_cost, stage_costs
from ccld_trt.benchmarks.machine import gemm_peak_gflops, machine_info
from ccld_trt.benchmarks.op_profile import op_type_times
from ccld_trt.benchmarks.report import SCHEMA_VERSION, ReportPaths, write_reports
from ccld_trt.export.errors import UserError
from ccld_trt.export.models import ModelFiles, load_networks, models_dir
from ccld_trt.export.onnx_export import random_inputs
from ccld_trt.pipeline import (
    DEFAULT_AUTOENCODER_SCALE,
    LATENT_CHANNELS,
    Request,
    conditions,
    decode,
    sample_latents,
    synchronize,
)
from ccld_trt.runner import Session, open_backend
from ccld_trt.samplers import evaluations
from ccld_trt.tokenizer import tokenize

BACKENDS = ("torch", "torch-cudagraph", "onnxruntime", "tensorrt")
PROFILED_GRAPHS = ("unet_cfg", "decoder")
GRAPH_BACKENDS = frozenset({"onnxruntime", "tensorrt"})  # they run the exported graphs, not the torch modules
# What to try per backend and device type. A combination that cannot run here is still tried, so that the
# report says why it was skipped.
PRECISIONS: dict[str, dict[str, tuple[str, ...]]] = {
    "torch": {"cpu": ("fp32", "bf16"), "cuda": ("fp32", "fp16", "bf16")},
    "torch-cudagraph": {"cpu": ("fp16",), "cuda": ("fp32", "fp16")},
    "onnxruntime": {"cpu": ("fp32", "fp16"), "cuda": ("fp32", "fp16")},
    "tensorrt": {"cpu": ("fp16",), "cuda": ("fp32", "fp16")},
}
FULL_BATCHES = (1, 4, 16)
FULL_END_TO_END = ((15, 1), (15, 4), (15, 16), (50, 1), (50, 4), (50, 16))
QUICK_BATCHES = (1,)
QUICK_END_TO_END = ((15, 1),)
PROMPT = ("a watercolor painting of a lighthouse at dawn", 3.0)
METHOD = "plms"
LATENT_SIZE = (32, 32)  # the published model's 256x256 images
PLMS_WARMUP_STEPS = 3  # PRK steps before PLMS has the history it needs
# An end-to-end warm-up runs this many steps (PRK and PLMS both run) at the measured n: the first run of a job
# pays for fresh memory (page faults on every new activation buffer, slow in VMs), which stage warm-ups at the
# same shapes do not cover, and a full-length warm-up of 50 steps at n 16 would take minutes on a CPU.
E2E_WARMUP_STEPS = 5
# Thresholds of "fast but wrong", against torch fp32 on the same seed
MAX_FP32_LATENTS_REL_ERROR = 1e-3
MIN_REDUCED_PSNR_DB = 35.0


@dataclass(frozen=True)
class Variant:
    """One row group of the report: a backend opened at one precision."""

    backend: str
    precision: str

    @property
    def label(self) -> str:
        return f"{self.backend} {self.precision}"


REFERENCE = Variant("torch", "fp32")

# (variant, device, model files) -> an open session; UserError (or any exception) = skipped with the reason
Opener = Callable[[Variant, str, ModelFiles], Session]


@dataclass(frozen=True)
class BenchConfig:
    """What to measure. ``variants`` (when given) replaces the list derived from ``backends`` and ``device``."""

    backends: tuple[str, ...] = BACKENDS
    device: str = "cpu"
    models: Path | None = None          # None: $CCLD_TRT_MODELS or ./models
    demo_size: str = "full"             # demo weights written when the models directory lacks weights
    weights_cache: Path = Path("build/bench-weights")
    output: Path = Path("benchmarks/results")
    quick: bool = False
    batches: tuple[int, ...] = FULL_BATCHES
    end_to_end: tuple[tuple[int, int], ...] = FULL_END_TO_END  # (steps, n)
    repeats: int = 5
    warmup: int = 2
    e2e_repeats: int = 3                # end-to-end runs take minutes on a CPU; min(repeats, e2e_repeats)
    seed: int = 0
    gemm_seconds: float = 1.0
    variants: tuple[Variant, ...] | None = None

    @classmethod
    def preset(cls, quick: bool = False, **overrides: Any) -> BenchConfig:
        """The full run, or with ``quick`` batch 1 and one end-to-end run (15 steps, 1 image) per variant, a
        few minutes on a small CPU. Overrides that are None keep the preset's value (CLI flags not given)."""
        base = cls(quick=True, batches=QUICK_BATCHES, end_to_end=QUICK_END_TO_END, repeats=3, warmup=1,
                   e2e_repeats=1, gemm_seconds=0.5) if quick else cls()
        return replace(base, **{k: v for k, v in overrides.items() if v is not None})

    def validate(self) -> None:
        """UserError naming the first invalid field."""
        if self.repeats < 1:
            raise UserError(f"--repeats must be >= 1, got {self.repeats}")
        if self.e2e_repeats < 1:
            raise UserError(f"--e2e-repeats must be >= 1, got {self.e2e_repeats}")
        if self.warmup < 0:
            raise UserError(f"--warmup must be >= 0, got {self.warmup}")
        if not self.backends and self.variants is None:
            raise UserError("--backends names none")
        unknown = [b for b in self.backends if b not in BACKENDS]
        if unknown:
            raise UserError(f"unknown backend(s) {', '.join(unknown)}; choose from {', '.join(BACKENDS)}")
        if not self.batches or any(b < 1 for b in self.batches):
            raise UserError(f"batches must be positive, got {self.batches}")
        if any(s < 1 or n < 1 for s, n in self.end_to_end):
            raise UserError(f"end-to-end steps and n must be positive, got {self.end_to_end}")
        try:
            device = torch.device(self.device)
        except RuntimeError as e:
            raise UserError(f"unknown device {self.device!r}: use cpu, cuda or cuda:N") from e
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"--device {self.device}: {cuda_unavailable_reason()}")
        if device.type not in ("cpu", "cuda"):
            raise UserError(f"unknown device {self.device!r}: use cpu, cuda or cuda:N")

    def planned_variants(self) -> tuple[Variant, ...]:
        if self.variants is not None:
            return self.variants
        device_type = torch.device(self.device).type
        return tuple(Variant(b, p) for b in self.backends for p in PRECISIONS[b][device_type])


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
    peak_fraction: float | None          # achieved / measured fp32 GEMM peak (set once the run's peak is known)
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


@dataclass
class Measurement:
    samples_ms: list[float]
    peak_rss_mb: float
    rss_scope: str
    device_peak_mb: float | None
    output: Any


# -- timing and memory -------------------------------------------------------------------------------------

Mark = float | torch.cuda.Event


def _mark(device: torch.device) -> Mark:
    """A point in time: the host clock on the CPU, an event in the current stream on CUDA."""
    if device.type == "cuda":
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event
    return time.perf_counter()


def _elapsed_ms(start: Mark, end: Mark) -> float:
    if isinstance(start, torch.cuda.Event) and isinstance(end, torch.cuda.Event):
        end.synchronize()
        return start.elapsed_time(end)
    assert isinstance(start, float) and isinstance(end, float)
    return (end - start) * 1e3


_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


def _reset_peak_rss() -> str:
    """Reset the kernel's peak-RSS counter of this process; returns the scope the next reading has."""
    try:
        _CLEAR_REFS.write_text("5")  # Linux: "5" resets VmHWM to the current RSS
        return "measurement"
    except OSError:
        return "process"


def _peak_rss_mb() -> float:
    try:
        match = re.search(r"VmHWM:\s+(\d+) kB", _STATUS.read_text())
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
        start = _mark(device)
        output = fn()
        end = _mark(device)
        samples.append(_elapsed_ms(start, end))
    device_peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return Measurement(samples, _peak_rss_mb(), scope, device_peak, output)


def summarize_ms(samples: Sequence[float]) -> tuple[float, float, float]:
    """(median, p90, min) of timings in ms; p90 interpolates linearly between samples."""
    a = np.asarray(samples, dtype=np.float64)
    return float(np.median(a)), float(np.percentile(a, 90)), float(a.min())


# -- correctness -------------------------------------------------------------------------------------------

def latents_rel_error(latents: torch.Tensor, reference: torch.Tensor) -> float:
    """||latents - reference|| / ||reference|| (Frobenius norms, float64)."""
    diff = (latents.double() - reference.double()).norm()
    return float(diff / reference.double().norm().clamp_min(1e-30))


def psnr_db(pixels: np.ndarray, reference: np.ndarray) -> float:
    """PSNR of uint8 pixels against reference pixels in dB; inf when identical."""
    mse = float(np.mean((pixels.astype(np.float64) - reference.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * float(np.log10(255.0**2 / mse))


def judge(precision: str, rel_error: float, psnr: float) -> str | None:
    """Why a result is "fast but wrong", or None: fp32 must match torch fp32 latents to 1e-3 relative;
    reduced precisions must keep the pixels above 35 dB PSNR."""
    if precision == "fp32" and not rel_error <= MAX_FP32_LATENTS_REL_ERROR:
        return f"fp32 latents rel error {rel_error:.2e} > {MAX_FP32_LATENTS_REL_ERROR:.0e}"
    if precision != "fp32" and not psnr >= MIN_REDUCED_PSNR_DB:
        return f"{precision} pixels PSNR {psnr:.1f} dB < {MIN_REDUCED_PSNR_DB:.0f} dB"
    return None


# -- model files and backends ------------------------------------------------------------------------------

def bench_model_files(config: BenchConfig, log: Callable[[str], None]) -> tuple[ModelFiles, dict[str, Any]]:
    """The models directory's files when complete, else demo weights of ``config.demo_size`` in the cache
    (written once). Returns the files and a description of them for the report."""
    directory = models_dir(config.models)
    files = ModelFiles.resolve(directory)
    try:
        files.check_present()
        return files, {"dir": str(directory), "demo": files.is_demo(), "size": None}
    except UserError:
        pass
    from ccld_trt.export.demo_weights import MARKER, write_demo_weights

    cache = config.weights_cache / f"{config.demo_size}-seed0"
    if not (cache / MARKER).exists():
        log(f"{directory} lacks model weights: writing {config.demo_size} RANDOM demo weights to {cache} (once)")
        # written under a temporary name and renamed, so an interrupted write never looks complete
        partial = cache.with_name(f"{cache.name}.partial-{os.getpid()}")
        shutil.rmtree(partial, ignore_errors=True)
        write_demo_weights(partial, config.demo_size, seed=0)
        shutil.rmtree(cache, ignore_errors=True)
        partial.rename(cache)
    return ModelFiles.resolve(cache), {"dir": str(cache), "demo": True, "size": config.demo_size}


def open_variant(variant: Variant, device: str, files: ModelFiles) -> Session:
    """``runner.open_backend`` for the variant; UserError with a one-line reason when it cannot run here."""
    if variant.backend in SELECTABLE_BACKENDS:
        resolve_backend(variant.backend, device)  # says why before anything loads
    elif variant.backend == "torch-cudagraph" and torch.device(device).type != "cuda":
        raise UserError("CUDA graphs need a CUDA device (--device cuda)")
    cuda_graph = variant.backend == "torch-cudagraph"
    session = open_backend("torch" if cuda_graph else variant.backend, device, files, variant.precision,
                           cuda_graph=cuda_graph)
    opened = getattr(session.backend, "precision", variant.precision)
    if opened != variant.precision:
        raise UserError(f"opened at precision {opened}, not {variant.precision}")
    return session


def _reason(error: BaseException) -> str:
    text = str(error).splitlines()[0] if str(error) else ""
    return text if isinstance(error, UserError) else f"{type(error).__name__}: {text}"


# -- measurements ------------------------------------------------------------------------------------------

@dataclass
class EndToEndOutput:
    latents: torch.Tensor        # float32 [n, 4, 32, 32], CPU
    pixels: np.ndarray           # uint8 [n, 256, 256, 3]
    step_ms: list[float]         # the PLMS steps after warm-up (plms_step_intervals_ms)


def end_to_end(backend: Backend, request: Request) -> EndToEndOutput:
    """The ``sample`` command's work for a text-only request: encode, sample, decode to uint8 pixels."""
    marks: list[Mark] = []
    conds, weights = conditions(backend, request, [])
    latents = sample_latents(backend, request, conds, weights, on_evaluation=lambda: marks.append(
        _mark(backend.device)))
    pixels = decode(backend, latents, DEFAULT_AUTOENCODER_SCALE)
    return EndToEndOutput(latents.cpu(), pixels, plms_step_intervals_ms(marks))


def plms_step_intervals_ms(marks: Sequence[Mark]) -> list[float]:
    """Times of the PLMS steps after warm-up from the marks of one run: evaluation k's mark to evaluation
    k+1's, for k from the first PLMS evaluation on (that interval holds the sampler arithmetic of one step
    and the next evaluation, the steady-state period of the loop)."""
    first_plms = evaluations(METHOD, PLMS_WARMUP_STEPS)
    return [_elapsed_ms(a, b) for a, b in zip(marks[first_plms:], marks[first_plms + 1:], strict=False)]


class Progress(Protocol):
    """What the measurements need of a progress bar (tqdm, or its stand-in in a worker process)."""

    def set_postfix_str(self, s: str) -> None: ...

    def update(self, n: int = 1) -> object: ...


@dataclass
class _Context:
    config: BenchConfig
    device: torch.device
    costs: dict[bool, dict[tuple[str, int], Cost]]  # by whether the backend runs the exported graphs
    references: dict[tuple[int, int], EndToEndOutput]
    bar: Progress

    def costs_of(self, variant: Variant) -> dict[tuple[str, int], Cost]:
        """The costs of what ``variant`` runs: the exported graphs' or the torch modules'."""
        return self.costs[variant.backend in GRAPH_BACKENDS]


def _request(steps: int, n: int, seed: int) -> Request:
    return Request(prompts=[PROMPT], n=n, seed=seed, steps=steps, method=METHOD, latent_size=LATENT_SIZE)


def _record(ctx: _Context, variant: Variant, stage: str, batch: int, m: Measurement, cost: Cost | None,
            warmup: int, **extra: Any) -> Record:
    median, p90, low = summarize_ms(m.samples_ms)
    achieved = cost.flops / (median / 1e3) / 1e9 if cost and median > 0 else None
    return Record(
        backend=variant.backend, precision=variant.precision, device=str(ctx.device), stage=stage, batch=batch,
        median_ms=median, p90_ms=p90, min_ms=low, repeats=len(m.samples_ms), warmup=warmup,
        flops=cost.flops if cost else None, weight_bytes=cost.weight_bytes if cost else None,
        activation_bytes=cost.activation_bytes if cost else None, achieved_gflops=achieved, peak_fraction=None,
        peak_rss_mb=m.peak_rss_mb, rss_scope=m.rss_scope, device_peak_mb=m.device_peak_mb, **extra)


def _stage_calls(session: Session, config: BenchConfig,
                 device: torch.device) -> list[tuple[str, int, Callable[[], Any]]]:
    """(stage, batch, call) of every single-network measurement, inputs made once up front."""
    backend = session.backend
    gen = torch.Generator().manual_seed(config.seed)
    tokens = tokenize([PROMPT[0]]).to(device)
    pixels = torch.rand(1, 3, session.image_size, session.image_size, generator=gen).to(device)
    conds, weights = conditions(backend, _request(1, 1, config.seed), [])
    calls: list[tuple[str, int, Callable[[], Any]]] = [
        ("text-encoder", 1, partial(backend.encode_text, tokens)),
        ("image-encoder", 1, partial(backend.encode_image, pixels)),
    ]
    for b in config.batches:
        x = torch.randn(b, LATENT_CHANNELS, *LATENT_SIZE, generator=gen).to(device)
        t = torch.full([b], 0.5, device=device)
        z = (torch.randn(b, LATENT_CHANNELS, *LATENT_SIZE, generator=gen) * DEFAULT_AUTOENCODER_SCALE).to(device)
        calls.append(("unet", b, partial(backend.unet, x, t, conds, weights)))
        calls.append(("decoder", b, partial(backend.decode, z)))
    return calls


def _measure_stages(ctx: _Context, variant: Variant, session: Session) -> list[Record]:
    """Every single-network stage of one open backend."""
    config, device = ctx.config, ctx.device
    costs = ctx.costs_of(variant)
    records: list[Record] = []
    for stage, batch, call in _stage_calls(session, config, device):
        ctx.bar.set_postfix_str(f"{variant.label} {stage} b{batch}")
        m = measure(call, device, config.warmup, config.repeats)
        rows = batch * 2 if stage == "unet" else None
        records.append(_record(ctx, variant, stage, batch, m, costs.get((stage, batch)), config.warmup, rows=rows))
        ctx.bar.update()
    return records


def _measure_end_to_end(ctx: _Context, workers: dict[Variant, BackendProcess],
                        skipped: list[dict[str, str]]) -> list[Record]:
    """Every end-to-end case on every backend, the backends' repeats interleaved: round r runs each once, in an
    order rotated per round, so that a shared machine's slow and fast spells fall on all of them alike (the
    ratios between backends are what these runs are for). A backend that fails is dropped from later rounds
    and cases, and reported in ``skipped``; rows of its finished cases stay."""
    config = ctx.config
    repeats = min(config.repeats, config.e2e_repeats)
    records: list[Record] = []
    step_rows: dict[tuple[Variant, int], Measurement] = {}  # PLMS step intervals timed inside the runs, per n
    live = dict(workers)

    def run(variant: Variant, request: Request, note: str = "") -> Measurement | None:
        ctx.bar.set_postfix_str(f"{variant.label} end-to-end {request.steps} steps n{request.n}{note}")
        try:
            m: Measurement = live[variant].call("end_to_end", request)
            return m
        except BackendFailed as e:
            skipped.append({"backend": variant.backend, "precision": variant.precision,
                            "reason": f"failed while measuring: {e.reason}"})
            tqdm.write(f"{variant.label} failed while measuring: {e.reason}", file=sys.stderr)
            live.pop(variant).close()
            return None

    for steps, n in config.end_to_end:
        request = _request(steps, n, config.seed)
        if config.warmup:
            for variant in list(live):
                run(variant, _request(min(steps, E2E_WARMUP_STEPS), n, config.seed), " warm-up")
        done: dict[Variant, list[Measurement]] = {v: [] for v in live}
        for r in range(repeats):
            order = list(live)
            shift = r % max(len(order), 1)
            for variant in order[shift:] + order[:shift]:
                m = run(variant, request)
                if m is not None:
                    done[variant].append(m)
                ctx.bar.update()
        complete = {v: ms for v, ms in done.items() if v in live and ms}
        if REFERENCE in complete:
            ctx.references[steps, n] = complete[REFERENCE][-1].output
        for variant, ms in complete.items():
            out: EndToEndOutput = ms[-1].output
            device_peak = None if ms[0].device_peak_mb is None else max(m.device_peak_mb or 0.0 for m in ms)
            m = Measurement([t for m in ms for t in m.samples_ms], max(m.peak_rss_mb for m in ms), ms[0].rss_scope,
                            device_peak, out)
            step_rows[variant, n] = replace(m, samples_ms=[t for m in ms for t in m.output.step_ms])
            costs = ctx.costs_of(variant)
            record = _record(ctx, variant, "end-to-end", n, m, end_to_end_cost(costs, evaluations(METHOD, steps), n),
                             1 if config.warmup else 0, steps=steps, n=n, rows=n * 2,
                             images_per_s=n / (float(np.median(m.samples_ms)) / 1e3))
            reference = ctx.references.get((steps, n))
            if reference is not None:
                record.latents_rel_error = latents_rel_error(out.latents, reference.latents)
                psnr = psnr_db(out.pixels, reference.pixels)
                record.psnr_db = None if psnr == float("inf") else psnr
                record.pixels_max_abs_diff = int(np.abs(out.pixels.astype(np.int16) - reference.pixels).max())
                record.flag_reason = judge(variant.precision, record.latents_rel_error, psnr)
                record.flagged = record.flag_reason is not None
            records.append(record)
    for (variant, n), m in step_rows.items():
        if m.samples_ms:
            costs = ctx.costs_of(variant)
            records.append(_record(ctx, variant, "sampler-step", n, m, costs["unet", n], 0, rows=n * 2))
    return records


# -- one process per backend -------------------------------------------------------------------------------

class BackendFailed(Exception):
    """A backend could not open, or failed while measuring; ``reason`` is one line."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _PipeProgress:
    """A worker's progress bar: forwards to the parent's."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def set_postfix_str(self, s: str) -> None:
        self.conn.send(("postfix", s))

    def update(self, n: int = 1) -> None:
        self.conn.send(("update", n))


def _serve_backend(conn: Connection, variant: Variant, config: BenchConfig, files: ModelFiles,
                   costs: dict[bool, dict[tuple[str, int], Cost]], opener: Opener) -> None:
    """A worker process: open ``variant``, then answer the parent's commands ("stages": every stage and the op
    profile; "end_to_end", request: one timed job) until "close". Each reply is ("done", result) or
    ("failed", reason), after which the worker ends."""
    try:
        session = opener(variant, config.device, files)
    except Exception as e:  # whatever a backend raises while opening, the run goes on without it
        conn.send(("failed", _reason(e)))
        return
    conn.send(("done", None))
    ctx = _Context(config, torch.device(config.device), costs, {}, _PipeProgress(conn))
    while True:
        command, *args = conn.recv()
        if command == "close":
            return
        try:
            if command == "stages":
                records = _measure_stages(ctx, variant, session)
                ctx.bar.set_postfix_str(f"{variant.label} op profile")
                result: Any = (records, op_profiles(variant, session))
            else:
                (request,) = args
                result = measure(partial(end_to_end, session.backend, request), ctx.device, 0, 1)
        except Exception as e:  # a backend that breaks mid-run keeps its finished rows
            conn.send(("failed", _reason(e)))
            return
        conn.send(("done", result))


class BackendProcess:
    """One backend open in its own process, measured on command.

    Each backend gets a process of its own because backends in one process slow each other down: with ONNX
    Runtime's sessions merely open, torch's decoder took 3.8 s instead of 3.0 on the 2-core CPU (memory
    allocator state); in separate processes neither changes the other. Processes are spawned, not forked
    (CUDA cannot be used in a forked child). Raises BackendFailed if the backend cannot open.
    """

    def __init__(self, variant: Variant, config: BenchConfig, files: ModelFiles,
                 costs: dict[bool, dict[tuple[str, int], Cost]], opener: Opener, bar: Progress) -> None:
        context = multiprocessing.get_context("spawn")
        self.conn, child = context.Pipe()
        self.bar = bar
        self.process = context.Process(target=_serve_backend, args=(child, variant, config, files, costs, opener),
                                       name=f"bench {variant.label}", daemon=True)
        self.process.start()
        child.close()
        try:
            self._reply()
        except BackendFailed:
            self.close()
            raise

    def call(self, command: str, *args: Any) -> Any:
        """Send a command (see _serve_backend) and wait for its result; BackendFailed if it failed."""
        self.conn.send((command, *args))
        return self._reply()

    def _reply(self) -> Any:
        while True:
            try:
                kind, value = self.conn.recv()
            except EOFError:
                self.process.join(timeout=10)
                raise BackendFailed(f"its process ended (exit code {self.process.exitcode})") from None
            if kind == "update":
                self.bar.update(value)
            elif kind == "postfix":
                self.bar.set_postfix_str(value)
            elif kind == "failed":
                raise BackendFailed(value)
            else:
                return value

    def close(self) -> None:
        with contextlib.suppress(OSError):  # the worker may be gone already
            self.conn.send(("close",))
        self.process.join(timeout=30)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join()
        self.conn.close()


def op_profiles(variant: Variant, session: Session) -> list[dict[str, Any]]:
    """Kernel time per op type of the graphs that take the time (PROFILED_GRAPHS) at batch 1, for the ONNX
    Runtime backend; nothing for the others."""
    backend = session.backend
    if not isinstance(backend, OnnxRuntimeBackend):
        return []
    dims = {"batch": 1, "conds": 2, "height": LATENT_SIZE[0], "width": LATENT_SIZE[1]}
    profiles = []
    for graph in PROFILED_GRAPHS:
        feed = {name: t.numpy() for name, t in random_inputs(graph, dims, session.image_size).items()}
        profiles.append({"backend": variant.backend, "precision": variant.precision, "graph": graph, "batch": 1,
                         "ops": op_type_times(backend.files[graph], feed, backend.options, backend.providers)})
    return profiles


def _reference_outputs(config: BenchConfig, files: ModelFiles, opener: Opener) -> dict[tuple[int, int],
                                                                                       EndToEndOutput]:
    """torch fp32 end-to-end outputs (untimed), for a run whose variants do not include it."""
    session = opener(REFERENCE, config.device, files)
    return {(steps, n): end_to_end(session.backend, _request(steps, n, config.seed))
            for steps, n in config.end_to_end}


def _release() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def measure_all(config: BenchConfig, opener: Opener = open_variant,
                log: Callable[[str], None] = lambda msg: tqdm.write(msg, file=sys.stderr)) -> dict[str, Any]:
    """Run the whole benchmark; the JSON document (see ``report.SCHEMA_VERSION``)."""
    config.validate()
    device = torch.device(config.device)
    files, weights = bench_model_files(config, log)
    log("counting FLOPs on the meta device")
    networks = load_networks(files)
    batches = sorted({*config.batches, *(n for _, n in config.end_to_end)})
    costs = {exported: stage_costs(networks, batches, LATENT_SIZE, exported=exported) for exported in (False, True)}
    del networks
    _release()
    info = machine_info(config.device)
    log("measuring the GEMM peak")
    # reduced-precision peaks only on CUDA, where tensor cores make them an order of magnitude higher
    precisions = ("fp32", "fp16", "bf16") if device.type == "cuda" else ("fp32",)
    peaks = {p: gemm_peak_gflops(config.device, p, min_seconds=config.gemm_seconds) for p in precisions}
    variants = sorted(config.planned_variants(), key=lambda v: v != REFERENCE)  # reference first
    references: dict[tuple[int, int], EndToEndOutput] = {}
    skipped: list[dict[str, str]] = []
    if REFERENCE not in variants:
        log("computing torch fp32 reference outputs for the correctness column")
        try:
            references = _reference_outputs(config, files, opener)
        except Exception as e:  # correctness is then unknown, but the timings still stand
            skipped.append({"backend": REFERENCE.backend, "precision": REFERENCE.precision,
                            "reason": f"reference for correctness unavailable: {_reason(e)}"})
        _release()
    stage_count = 2 * len(config.batches) + 2
    e2e_count = len(config.end_to_end) * min(config.repeats, config.e2e_repeats)
    records: list[Record] = []
    profiles: list[dict[str, Any]] = []
    workers: dict[Variant, BackendProcess] = {}
    total = (stage_count + e2e_count) * len(variants)
    with tqdm(total=total, desc="bench", unit="measurement", disable=None, file=sys.stderr) as bar:
        ctx = _Context(config, device, costs, references, bar)
        try:
            # Stages one backend after another (the others idle); each stays open for the end-to-end runs.
            for variant in variants:
                bar.set_postfix_str(f"opening {variant.label}")
                start = bar.n
                try:
                    worker = BackendProcess(variant, config, files, costs, opener, bar)
                except BackendFailed as e:
                    skipped.append({"backend": variant.backend, "precision": variant.precision, "reason": e.reason})
                    log(f"skipped {variant.label}: {e.reason}")
                    bar.update(stage_count + e2e_count)
                    continue
                try:
                    stage_records, stage_profiles = worker.call("stages")
                except BackendFailed as e:  # a backend that breaks mid-run keeps its finished rows
                    skipped.append({"backend": variant.backend, "precision": variant.precision,
                                    "reason": f"failed while measuring: {e.reason}"})
                    log(f"{variant.label} failed while measuring: {e.reason}")
                    worker.close()
                    bar.update(start + stage_count + e2e_count - bar.n)  # what the failure left unmeasured
                    continue
                records += stage_records
                profiles += stage_profiles
                workers[variant] = worker
            records += _measure_end_to_end(ctx, workers, skipped)
        finally:
            for worker in workers.values():
                worker.close()
        bar.update(total - bar.n)  # end-to-end runs of backends that failed on the way
    log("measuring the GEMM peak again")
    # The peak is the best of both measurements: on a shared machine either may fall in a slow spell.
    for p in precisions:
        peaks[p] = max(peaks[p], gemm_peak_gflops(config.device, p, min_seconds=config.gemm_seconds))
    for r in records:
        r.peak_fraction = None if r.achieved_gflops is None else r.achieved_gflops / peaks["fp32"]
    return {
        "schema_version": SCHEMA_VERSION,
        "machine": info,
        "run": {
            "device": str(device), "quick": config.quick, "repeats": config.repeats, "warmup": config.warmup,
            "e2e_repeats": min(config.repeats, config.e2e_repeats),
            "e2e_warmup_steps": E2E_WARMUP_STEPS if config.warmup else 0, "seed": config.seed, "method": METHOD,
            "prompt": PROMPT[0], "prompt_weight": PROMPT[1], "latent_size": list(LATENT_SIZE),
            "weights": weights, "gemm_peak_gflops": peaks,
            "reference": {"backend": REFERENCE.backend, "precision": REFERENCE.precision},
            "thresholds": {"fp32_latents_rel_error": MAX_FP32_LATENTS_REL_ERROR,
                           "reduced_precision_psnr_db": MIN_REDUCED_PSNR_DB},
        },
        "results": [asdict(r) for r in records],
        "op_profiles": profiles,
        "skipped": skipped,
    }


def run_bench(config: BenchConfig, opener: Opener = open_variant) -> tuple[dict[str, Any], ReportPaths]:
    """Measure everything ``config`` asks for and write JSON, Markdown and PNG under
    ``config.output/<machine>/``; returns the JSON document and the paths written."""
    doc = measure_all(config, opener)
    return doc, write_reports(doc, config.output)


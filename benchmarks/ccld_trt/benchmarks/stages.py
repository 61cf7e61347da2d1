"""What one open backend is measured on: each single-network stage at the configured batches, the end-to-end
job (prompt -> decoded pixels, with the PLMS step intervals timed inside it) and ONNX Runtime's kernel time
per op type. Runs in the backend's worker process."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

import numpy as np
import torch

from ccld_trt.backends.base import Backend
from ccld_trt.backends.onnxruntime_backend import OnnxRuntimeBackend
from ccld_trt.benchmarks.flops import Cost
from ccld_trt.benchmarks.op_profile import op_type_times
from ccld_trt.benchmarks.plan import (
    GRAPH_BACKENDS,
    LATENT_SIZE,
    METHOD,
    PLMS_WARMUP_STEPS,
    PROFILED_GRAPHS,
    PROMPT,
    BenchConfig,
    Variant,
    bench_request,
)
from ccld_trt.benchmarks.records import Record, make_record
from ccld_trt.benchmarks.timing import Mark, elapsed_ms, mark, measure
from ccld_trt.export.onnx_export import random_inputs
from ccld_trt.pipeline import DEFAULT_AUTOENCODER_SCALE, LATENT_CHANNELS, Request, conditions, decode, sample_latents
from ccld_trt.runner import Session
from ccld_trt.samplers import evaluations
from ccld_trt.tokenizer import tokenize

# (stage, batch) -> cost, by whether the backend runs the exported graphs (True) or the torch modules
Costs = dict[bool, dict[tuple[str, int], Cost]]


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
        mark(backend.device)))
    pixels = decode(backend, latents, DEFAULT_AUTOENCODER_SCALE)
    return EndToEndOutput(latents.cpu(), pixels, plms_step_intervals_ms(marks))


def plms_step_intervals_ms(marks: Sequence[Mark]) -> list[float]:
    """Times of the PLMS steps after warm-up from the marks of one run: evaluation k's mark to evaluation
    k+1's, for k from the first PLMS evaluation on (that interval holds the sampler arithmetic of one step
    and the next evaluation, the steady-state period of the loop)."""
    first_plms = evaluations(METHOD, PLMS_WARMUP_STEPS)
    return [elapsed_ms(a, b) for a, b in zip(marks[first_plms:], marks[first_plms + 1:], strict=False)]


class Progress(Protocol):
    """What the measurements need of a progress bar (tqdm, or its stand-in in a worker process)."""

    def set_postfix_str(self, s: str) -> None: ...

    def update(self, n: int = 1) -> object: ...


@dataclass
class Context:
    """What measurements share: the run's config and device, the costs, the torch fp32 end-to-end outputs by
    (steps, n) (filled in the parent process only) and the progress bar."""

    config: BenchConfig
    device: torch.device
    costs: Costs
    references: dict[tuple[int, int], EndToEndOutput]
    bar: Progress

    def costs_of(self, variant: Variant) -> dict[tuple[str, int], Cost]:
        """The costs of what ``variant`` runs: the exported graphs' or the torch modules'."""
        return self.costs[variant.backend in GRAPH_BACKENDS]


def _stage_calls(session: Session, config: BenchConfig,
                 device: torch.device) -> list[tuple[str, int, Callable[[], Any]]]:
    """(stage, batch, call) of every single-network measurement, inputs made once up front."""
    backend = session.backend
    gen = torch.Generator().manual_seed(config.seed)
    tokens = tokenize([PROMPT[0]]).to(device)
    pixels = torch.rand(1, 3, session.image_size, session.image_size, generator=gen).to(device)
    conds, weights = conditions(backend, bench_request(1, 1, config.seed), [])
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


def measure_stages(ctx: Context, variant: Variant, session: Session) -> list[Record]:
    """Every single-network stage of one open backend."""
    config, device = ctx.config, ctx.device
    costs = ctx.costs_of(variant)
    records: list[Record] = []
    for stage, batch, call in _stage_calls(session, config, device):
        ctx.bar.set_postfix_str(f"{variant.label} {stage} b{batch}")
        m = measure(call, device, config.warmup, config.repeats)
        rows = batch * 2 if stage == "unet" else None
        records.append(make_record(str(device), variant, stage, batch, m, costs.get((stage, batch)), config.warmup,
                                   rows=rows))
        ctx.bar.update()
    return records


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

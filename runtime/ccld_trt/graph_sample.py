"""A job of text and image prompts on a graph backend (onnxruntime, openvino) on the CPU, without importing torch:
the same images as the torch-driven path, bit for bit, 0.5-0.6 s sooner in a fresh ``sample`` process on 2 cores
(torch's import, ~1 s of one core, was what it waited for before its first graph call; docs/performance.md).

The eager graphs are the ones ``runner.prefetch_graphs`` opened (the CLOOB image encoder is opened at its first
call); the job's arithmetic outside them is numpy's: the token ids (``tokenizer.token_ids``), the image prompts'
pixels (``image_prompt``, read by ``jobs.assemble``), the CFG weights, the starting noise (``randn``), the sampler
(a ``sampler_tape`` recorded for the job's method, steps, eta and each batch's rows; the noise ddpm and ddim with
eta > 0 add at their steps is drawn with the starting noise) and the pixels
(``outputs.to_pixels``). The tapes are recorded, and the noise checked against ``torch.randn``, by an earlier
``sample`` that ran the same kind of job with torch (``save_tapes``, in the build directory); until then, and for
every job this path does not cover (an init image, int8), ``sample`` runs with torch as before.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ccld_trt.backend_select import require_openvino
from ccld_trt.backends.onnxruntime_sessions import open_graph_session, run_cpu
from ccld_trt.backends.openvino_compile import infer, open_graph
from ccld_trt.cpu_features import cpu_flags
from ccld_trt.export.atomic import write_atomic
from ccld_trt.export.build_dir import build_root
from ccld_trt.export.graph_specs import EAGER_GRAPHS
from ccld_trt.randn import BLOCK, randn
from ccld_trt.request import LATENT_CHANNELS
from ccld_trt.sampler_names import needs_step_noise
from ccld_trt.sampler_tape import Tape, from_json, replay, to_json

if TYPE_CHECKING:
    from ccld_trt.backends.base import Opened
    from ccld_trt.jobs import Job
    from ccld_trt.request import Request
    from ccld_trt.runner import BackendOptions

TAPE_DIR = "sampler-tapes"  # under the build directory
# what a tape's arithmetic comes from: a change to any of them records the tapes again
_SOURCES = ("samplers.py", "schedule.py", "sampler_tape.py", "randn.py")
# a graph call: graph name, {input name: array} -> its one output
RunGraph = Callable[[str, Mapping[str, np.ndarray]], np.ndarray]


def covers(options: BackendOptions, job: Job) -> bool:
    """Whether this path can run ``job`` on ``options`` (resolved): onnxruntime or openvino on the CPU, not int8;
    text and image prompts, no init image; at least 16 latent values in all, and for a sampler that adds noise at
    its steps (ddpm, ddim with eta > 0) a multiple of 16 (``randn`` then draws them as one long draw)."""
    request = job.request
    values = request.n * LATENT_CHANNELS * request.latent_size[0] * request.latent_size[1]
    return (options.backend in ("onnxruntime", "openvino") and options.device == "cpu"
            and options.precision in ("fp32", "bf16") and job.init_pixels is None and values >= BLOCK
            and (values % BLOCK == 0 or not needs_step_noise(request.method, request.eta)))


def batch_rows(batch: slice) -> int:
    """How many images a batch of ``Request.batches`` holds (which of a job's tapes samples it)."""
    return batch.stop - batch.start


def _row_counts(request: Request) -> list[int]:
    """The distinct row counts of ``request``'s batches: one tape each."""
    return sorted({batch_rows(batch) for batch in request.batches()})


def _draws(tapes: Mapping[int, Tape]) -> int:
    """How many noise tensors like the job's latents its sampler uses (the same for each of its ``tapes``): the
    start, and for ddpm and ddim with eta > 0 one per step but the last."""
    return 1 + next(iter(tapes.values())).noise_draws


def tape_key(request: Request, rows: int) -> dict[str, Any]:
    """What a tape depends on: the sampler, its steps, ddim's eta and the batch's rows, the code and torch that
    recorded it, and the CPU (torch's kernels, and so the noise this path was checked to match, are picked per CPU)."""
    here = Path(__file__).parent
    code = hashlib.sha256(b"".join((here / name).read_bytes() for name in _SOURCES)).hexdigest()
    return {"method": request.method, "steps": request.steps, "eta": _eta(request), "rows": rows, "code": code,
            "torch": version("torch"), "cpu": sorted(cpu_flags() or ()),
            "capability": os.environ.get("ATEN_CPU_CAPABILITY", "")}


def _eta(request: Request) -> float:
    """The eta a tape is recorded with: the request's where the sampler reads it (ddim), else 0."""
    return request.eta if request.method == "ddim" else 0.0


def tape_path(request: Request, rows: int, build_dir: Path | None = None) -> Path:
    """``<build>/sampler-tapes/<method>-<steps>-<rows>.json`` (ddim with eta > 0: ``...-eta<eta>.json``)."""
    eta = f"-eta{_eta(request)!r}" if _eta(request) else ""
    return build_root(build_dir) / TAPE_DIR / f"{request.method}-{request.steps}-{rows}{eta}.json"


def load_tapes(request: Request, build_dir: Path | None = None) -> dict[int, Tape] | None:
    """{rows: tape} for each of ``request``'s batch sizes, as ``save_tapes`` recorded them, if all are there with
    today's key; else None (also for an unreadable or malformed file: it is recorded again)."""
    tapes = {}
    for rows in _row_counts(request):
        try:
            data = json.loads(tape_path(request, rows, build_dir).read_text(encoding="utf-8"))
            if not isinstance(data, dict) or data.get("key") != tape_key(request, rows):
                return None
            tapes[rows] = from_json(data.get("tape"))
        except (OSError, ValueError):
            return None
    return tapes


def save_tapes(request: Request, build_dir: Path | None = None) -> bool:
    """Record the tapes of ``request``'s kind of job (imports torch) and keep them, if ``randn`` gives this
    machine's ``torch.randn`` for the job's seed and shape (every draw the job makes); whether they were kept. A
    failure to write is not an error."""
    import torch

    from ccld_trt.sampler_tape import record

    tapes = {rows: record(request.method, request.steps, rows, _eta(request)) for rows in _row_counts(request)}
    generator, shape = torch.Generator().manual_seed(request.seed), [request.n, LATENT_CHANNELS, *request.latent_size]
    drawn = np.concatenate([torch.randn(shape, generator=generator).numpy().reshape(-1)
                            for _ in range(_draws(tapes))])  # one after another, as pipeline.draw_noise draws them
    if not np.array_equal(drawn.view(np.uint32), randn(request.seed, drawn.size).view(np.uint32)):
        return False
    for rows, tape in tapes.items():
        text = json.dumps({"key": tape_key(request, rows), "tape": to_json(tape)})
        path = tape_path(request, rows, build_dir)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, text)
        except OSError:
            return False
    return True


def graph_runner(options: BackendOptions, onnx_dir: Path, opened: Opened) -> RunGraph | None:
    """Calls of the graphs of ``onnx_dir`` for ``options`` (resolved): the eager ones from ``opened``
    (runner.prefetch_graphs's), None unless it holds them all; an on-demand one (the CLOOB image encoder) opened
    at its first call as the backend opens it."""
    if not all(graph in opened for graph in EAGER_GRAPHS):
        return None
    openvino, precision = options.backend == "openvino", options.precision or "fp32"
    handles = {graph: handle for graph, (_, handle) in opened.items()}  # openvino's: (compiled model, request)

    def run(graph: str, feed: Mapping[str, np.ndarray]) -> np.ndarray:
        if graph not in handles:
            handles[graph] = _open(openvino, onnx_dir, graph, precision)
        return np.asarray(infer(handles[graph][1], feed) if openvino else run_cpu(handles[graph], feed))

    return run


def _open(openvino: bool, onnx_dir: Path, graph: str, precision: str) -> Any:
    """``graph``'s handle as the backend opens it: OpenVINO's (compiled model, request), from its model cache;
    an ONNX Runtime session, from its saved optimised copy (each made first where it is missing)."""
    if openvino:
        opened = open_graph(require_openvino().Core(), onnx_dir, graph, precision)
        assert opened is not None  # not cached_only: compiled where the cache has no blob
        return opened[1]
    return open_graph_session(onnx_dir, graph, precision)


def generate(run: RunGraph, job: Job, tapes: Mapping[int, Tape], on_evaluation: Callable[[], object] | None = None
             ) -> tuple[np.ndarray, np.ndarray]:
    """``job`` (``covers``) with its ``load_tapes`` -> (latents float32 [n, 4, h, w] before the autoencoder scale,
    pixels uint8 [n, 8h, 8w, 3]), as ``pipeline.generate`` makes them."""
    from ccld_trt.outputs import to_pixels
    from ccld_trt.tokenizer import token_ids

    request = job.request
    # 1. the CFG conditions: the zero embedding, each text prompt's, each image prompt's; weighted [1 - sum(w), w...]
    embeds = [np.zeros([1, 512], np.float32)]
    if request.prompts:
        embeds.append(run("text_encoder", {"tokens": token_ids([text for text, _ in request.prompts])}))
    embeds += [run("image_encoder", {"pixels": pixels}) for pixels, _ in job.image_pixels]
    conds = np.concatenate(embeds).astype(np.float32, copy=False)
    weights = [w for _, w in request.prompts] + [w for _, w in job.image_pixels]
    cfg = np.array([1 - sum(weights), *weights], dtype=np.float32)
    # 2. the starting noise, then the noise of each step (ddpm, ddim with eta > 0), drawn as torch.manual_seed(seed)
    # then torch.randn would draw them (pipeline.draw_noise): one long draw, whole blocks of 16 each
    shape = (request.n, LATENT_CHANNELS, *request.latent_size)
    x, *step_noise = randn(request.seed, _draws(tapes) * int(np.prod(shape))).reshape(-1, *shape)

    # 3. the sampler, a batch at a time
    def model(x: np.ndarray, t: np.ndarray) -> np.ndarray:
        v = run("unet_cfg", {"x": x, "t": t, "conds": conds, "weights": cfg})
        if on_evaluation is not None:
            on_evaluation()
        return v

    parts = request.batches()
    latents = np.concatenate([replay(tapes[batch_rows(batch)], x[batch], model, [s[batch] for s in step_noise])
                              for batch in parts])
    # 4. decoding, at the job's scale, in the same batches
    scale = np.float32(job.autoencoder_scale)
    return latents, np.concatenate([to_pixels(run("decoder", {"latents": latents[batch] * scale})) for batch in parts])

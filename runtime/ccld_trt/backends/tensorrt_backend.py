"""The TensorRT backend: the Backend interface over the engines (unet_cfg, decoder, text_encoder,
image_encoder) built by ``ccld_trt.engines.build`` into one directory, by either TensorRT flavour, plus the plain
per-row U-Net engine (``unet``) for ``unet_rows``, the cluster's merged calls, when it was built.

Before any engine loads, every sidecar is checked against this machine (flavour and version, the GPU or the
RTX targets, precision) and against the model files the caller names (their SHA-256 against the checkpoints the
engines were built from), so engines of other weights are refused in one line instead of giving wrong images.
An engine whose sidecar names no checkpoint (its graph carried no source metadata) is refused too.

The engines run on a stream of their own; each call converts its inputs on the caller's stream, then orders the
engine stream after the caller's and the caller's stream after it (GPU-side waits, no host sync), and returns
fresh tensors, so the sampler never sees a buffer that the next call overwrites. Calls larger than an engine's
profile are split (see GraphBackend).
"""

from __future__ import annotations

import atexit
import logging
from collections.abc import Mapping
from pathlib import Path

import torch

from ccld_trt.backends.base import GraphBackend
from ccld_trt.engines.engine import Engine, engine_file
from ccld_trt.engines.flavor import FLAVORS, Flavor, parse_flavor, require_flavor
from ccld_trt.engines.profiles import ShapeRange
from ccld_trt.engines.sidecar import Sidecar, check_sidecar, checkpoint_digests, gpu_identity, read_sidecar
from ccld_trt.export.errors import UserError, require_file
from ccld_trt.export.graph_specs import BACKEND_GRAPHS, GRAPH_PRECISIONS, GRAPHS, GraphSpec
from ccld_trt.export.models import ModelFiles
from ccld_trt.export.onnx_manifest import COMPONENT

log = logging.getLogger(__name__)
ROWS_GRAPH = "unet"  # the plain U-Net, one condition per row: optional, loaded on the first unet_rows


def model_checkpoints(files: ModelFiles) -> dict[str, Path]:
    """The checkpoint of each component, by the names the exporter's ``source_sha256`` metadata uses."""
    return {"unet": files.unet, "autoencoder": files.autoencoder, "cloob": files.cloob}


def source_problems(graph: str, sidecar: Sidecar, digests: Mapping[str, str]) -> list[str]:
    """Why an engine of ``graph`` is not tied to the model files of ``digests`` ({component: SHA-256}; empty:
    none named, only the tie itself is checked)."""
    component = COMPONENT[graph]
    if not sidecar.sources.get(component):
        return [f"its sidecar names no {component} checkpoint it was built from (a graph without source metadata), "
                "so it could run against any model files"]
    return [f"built from another {c} checkpoint (its SHA-256 differs)"
            for c, digest in sorted(sidecar.sources.items()) if c in digests and digests[c] != digest]


def small_call_problems(spec: GraphSpec, profile: Mapping[str, ShapeRange]) -> list[str]:
    """Inputs whose built batch / conds range does not start at 1: the last part of a split call (and a single
    image) would be refused at run time."""
    return [f"{spec.name} input {t.name} takes {dim} >= {profile[t.name][0][i]}"
            for t in spec.inputs for i, dim in enumerate(t.shape)
            if dim in ("batch", "conds") and t.name in profile and profile[t.name][0][i] > 1]


class TensorRTBackend(GraphBackend):
    """Backend over the engines in ``engine_dir`` (names: engines.engine.engine_file).

    precision: which engines to load ("fp16": ``<graph>.fp16.engine``); cuda_graph: replay the U-Net launches
    from CUDA graphs (saves the per-launch CPU cost of many small kernels); flavor: "auto" (the one the engines
    were built with), "tensorrt" or "rtx"; models: the model files the engines must have been built from (None:
    only that each engine names its checkpoint). ``close()`` (also at exit) saves TensorRT-RTX runtime caches.
    """

    name = "tensorrt"

    def __init__(self, engine_dir: Path, *, device: str | torch.device = "cuda", precision: str = "fp16",
                 cuda_graph: bool = False, flavor: str = "auto", models: ModelFiles | None = None) -> None:
        if precision not in GRAPH_PRECISIONS:
            raise UserError(f"the tensorrt backend runs {' or '.join(GRAPH_PRECISIONS)} engines, not {precision!r}")
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise UserError(f"the tensorrt backend runs on a CUDA device, not {self.device}")
        gpu_name, capability = gpu_identity(self.device)  # UserError without a CUDA GPU
        engine_dir = Path(engine_dir)
        paths = {graph: require_file(engine_file(engine_dir, graph, precision), f"{graph} engine")
                 for graph in BACKEND_GRAPHS}
        if (rows := engine_file(engine_dir, ROWS_GRAPH, precision)).is_file():
            paths[ROWS_GRAPH] = rows
        built = {graph: read_sidecar(path) for graph, path in paths.items()}
        self.flavor = engines_flavor(flavor, built)
        hint = "rebuild them: ccld-trt engines build" + (
            f" --models {models.unet.parent}" if models else "") + f" --output {engine_dir}"
        digests = checkpoint_digests(model_checkpoints(models), engine_dir / "checkpoints.json") if models else {}
        current = Sidecar(flavor=self.flavor, version=require_flavor(self.flavor), compute_capabilities=(capability,),
                          gpu_name=gpu_name if self.flavor == "tensorrt" else "", precision=precision)
        for graph, sidecar in built.items():  # every engine checked before any loads
            problems = check_sidecar(sidecar, current) + source_problems(graph, sidecar, digests)
            problems += small_call_problems(GRAPHS[graph], sidecar.profiles)
            if problems:
                raise UserError(f"engine {paths[graph]} does not fit: {'; '.join(problems)}: {hint}")
        self._hint = hint
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.engines = {graph: Engine(path, GRAPHS[graph], self.device, self.flavor,
                                      engine_sha256=built[graph].engine_sha256,
                                      cuda_graph=cuda_graph and graph in ("unet_cfg", ROWS_GRAPH))
                        for graph, path in paths.items()}
        for graph in BACKEND_GRAPHS:
            self.engines[graph].activate()
        self.cuda_graph = cuda_graph
        self.stream = torch.cuda.Stream(self.device)
        atexit.register(self.close)

    def unet_rows(self, x: torch.Tensor, t: torch.Tensor, embed: torch.Tensor) -> torch.Tensor:
        """The plain U-Net, one condition per row: x [B, 4, h, w], t [B], embed [B, 512] -> v [B, 4, h, w].

        For callers that merge the CFG rows of several requests into one call (the cluster) and weigh each
        request's rows themselves. Runs ``<engine_dir>/unet[.fp16].engine`` (built by ``ccld-trt engines build``
        with the others), activated on the first call; rows beyond its profile are split."""
        engine = self.engines.get(ROWS_GRAPH)
        if engine is None:
            raise UserError(f"no {ROWS_GRAPH} engine for merged U-Net rows (engines built before it existed): "
                            f"{self._hint}")
        engine.activate()
        return self._call(ROWS_GRAPH, {"x": x, "t": t, "embed": embed})

    def close(self) -> None:
        """Save what the engines learnt (TensorRT-RTX runtime caches); safe to call more than once."""
        for engine in self.engines.values():
            try:
                engine.close()
            except Exception as e:  # at exit, one engine's cache must not stop the others'
                log.warning("closing engine %s: %s", engine.path, e)

    def limits(self, graph: str) -> dict[str, int]:
        """The largest batch / conds each input of the engine's profile admits."""
        limits: dict[str, int] = {}
        for t in GRAPHS[graph].inputs:
            _, _, hi = self.engines[graph].profile[t.name]
            for dim, size in zip(t.shape, hi, strict=True):
                if isinstance(dim, str) and dim in ("batch", "conds"):
                    limits[dim] = min(limits.get(dim, size), size)
        return limits

    def _run(self, graph: str, feed: Mapping[str, torch.Tensor]) -> torch.Tensor:
        spec = GRAPHS[graph]
        caller = torch.cuda.current_stream(self.device)
        # converted on the caller's stream first, so that the wait below covers the conversion kernels too
        inputs = {t.name: feed[t.name].to(self.device, getattr(torch, t.dtype)) for t in spec.inputs}
        self.stream.wait_stream(caller)
        out = self.engines[graph].infer(inputs, self.stream)
        caller.wait_stream(self.stream)
        (result,) = out.values()  # every graph has one output
        return result.clone()  # on the caller's stream, which now waits for the engine


def engines_flavor(choice: str, built: Mapping[str, Sidecar]) -> Flavor:
    """The flavour to run ``built`` engines with: theirs for "auto" (UserError when they mix flavours or name an
    unknown one), else the one chosen (a mismatch is then reported by the sidecar check)."""
    wanted = parse_flavor(choice)
    if wanted != "auto":
        return wanted
    found = {s.flavor for s in built.values()}
    if len(found) != 1 or not found <= set(FLAVORS):
        raise UserError(f"the engines were built with {', '.join(sorted(found))}: rebuild them with one flavour "
                        "(ccld-trt engines build)")
    (flavor,) = found
    return flavor  # type: ignore[return-value]

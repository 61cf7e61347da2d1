"""One engine at run time, in either TensorRT flavour: load (check, deserialize once), activate (execution
context), allocate device buffers as torch CUDA tensors, infer on a CUDA stream, optionally as a CUDA graph.

Regular TensorRT: the launch is captured into a torch CUDA graph by hand, anew whenever the input shapes
change. TensorRT-RTX: its own CUDA-graph strategy does that, and its just-in-time kernel specialisations are
kept in a runtime cache file beside the engine, so the next start skips them.

TensorRT is imported lazily: importing this module never needs it.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from ccld_trt.engines.flavor import Flavor, require_flavor, require_tensorrt, rtx_logger, trt_logger
from ccld_trt.engines.profiles import Shape, ShapeRange, outside_profile
from ccld_trt.engines.sidecar import REBUILD_HINT
from ccld_trt.export.atomic import write_atomic
from ccld_trt.export.errors import UserError
from ccld_trt.export.graph_specs import GraphSpec
from ccld_trt.export.shapes import bind_dims, resolve_dim

if TYPE_CHECKING:
    import tensorrt as trt
    import tensorrt_rtx as trtx

    CudaEngine = trt.ICudaEngine | trtx.ICudaEngine
    Context = trt.IExecutionContext | trtx.IExecutionContext

__all__ = ["Engine", "engine_file", "plan_buffers", "require_tensorrt", "runtime_cache_file", "tensor_dtype_name"]
log = logging.getLogger(__name__)

# TensorRT DataType name -> the dtype name graph_specs uses. An explicit table: trt.nptype raises TypeError for
# BF16, FP8 and INT4, which numpy does not have.
_DTYPE_NAMES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT8": "int8", "UINT8": "uint8",
                "INT32": "int32", "INT64": "int64", "BOOL": "bool", "FP8": "float8_e4m3fn", "INT4": "int4",
                "FP4": "float4_e2m1", "E8M0": "float8_e8m0fnu"}


def tensor_dtype_name(datatype: Any) -> str:
    """A TensorRT DataType of either flavour (``DataType.BF16``) -> "bfloat16"; unknown ones lower-cased."""
    name = str(getattr(datatype, "name", datatype))
    return _DTYPE_NAMES.get(name, name.lower())


def engine_file(engine_dir: Path, graph: str, precision: str) -> Path:
    """Where the engine of ``graph`` lives: ``<dir>/<graph>.fp16.engine`` (fp16) or ``<dir>/<graph>.engine``,
    mirroring the ONNX names ``<graph>.fp16.onnx`` / ``<graph>.onnx``."""
    return Path(engine_dir) / (f"{graph}.fp16.engine" if precision == "fp16" else f"{graph}.engine")


def runtime_cache_file(engine_path: Path) -> Path:
    """TensorRT-RTX's runtime cache of an engine: ``<engine>.runtime-cache``."""
    return engine_path.with_name(engine_path.name + ".runtime-cache")


def torch_dtype(name: str) -> torch.dtype:
    """A graph_specs dtype name ("float32", "int64") -> the torch dtype."""
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"no torch dtype named {name!r}")
    return dtype


def plan_buffers(spec: GraphSpec, input_shapes: Mapping[str, Sequence[int]]) -> dict[str, tuple[Shape, torch.dtype]]:
    """Shape and dtype of every I/O tensor of ``spec`` (inputs first) for the given input shapes, output shapes
    resolved from the symbolic dims (``decoder``: images [N, 3, 8h, 8w]); ValueError if inputs break the spec."""
    env = bind_dims(spec, input_shapes)
    return {t.name: (tuple(resolve_dim(d, env) for d in t.shape), torch_dtype(t.dtype))
            for t in (*spec.inputs, *spec.outputs)}


def _shape(dims: Any) -> Shape:
    return tuple(int(dims[i]) for i in range(len(dims)))


def io_problems(engine: CudaEngine, spec: GraphSpec) -> list[str]:
    """How a deserialized engine's I/O differs from ``spec`` (names, directions, dtypes); empty if it matches."""
    problems = []
    names = {engine.get_tensor_name(i) for i in range(engine.num_io_tensors)}
    for mode, tensors in (("input", spec.inputs), ("output", spec.outputs)):
        for t in tensors:
            if t.name not in names or engine.get_tensor_mode(t.name).name.lower() != mode:
                problems.append(f"no {mode} {t.name}")
            elif (dtype := tensor_dtype_name(engine.get_tensor_dtype(t.name))) != t.dtype:
                problems.append(f"{t.name} is {dtype}, not {t.dtype}")
    return problems


class Replayable(Protocol):
    def replay(self) -> None: ...


class Engine:
    """A serialized engine for one graph of graph_specs, run with buffers owned here on ``device``.

    flavor: which TensorRT built it; engine_sha256: the hash its sidecar records (checked at load);
    cuda_graph: replay launches from CUDA graphs.

    Buffers are flat torch tensors that only grow; a smaller request uses a prefix view, so addresses stay valid
    until a larger shape forces a reallocation.
    """

    def __init__(self, path: Path, spec: GraphSpec, device: torch.device, flavor: Flavor = "tensorrt", *,
                 engine_sha256: str = "", cuda_graph: bool = False) -> None:
        self.path = Path(path)
        self.spec = spec
        self.device = device
        self.flavor = flavor
        self.engine_sha256 = engine_sha256
        self.cuda_graph = cuda_graph
        self.profile: dict[str, ShapeRange] = {}  # the built (min, opt, max) of each input, profile 0
        self._runtime: trt.Runtime | trtx.Runtime | None = None  # must outlive the engine
        self._engine: CudaEngine | None = None
        self._context: Context | None = None
        self._runtime_cache: Any = None  # TensorRT-RTX's IRuntimeCache
        self._cache_dirty = False
        self._storage: dict[str, torch.Tensor] = {}
        self._buffers: dict[str, torch.Tensor] = {}
        self._shapes: dict[str, Shape] = {}
        self._graph: Replayable | None = None  # regular TensorRT: the launch captured at _graph_shapes
        self._graph_shapes: dict[str, Shape] = {}

    def load(self) -> None:
        """Read and check the engine file (its hash, the GPU's validity for it), deserialize it (once) and check
        its I/O against the graph spec."""
        if self._engine is not None:
            return
        data = self.path.read_bytes()
        if self.engine_sha256 and hashlib.sha256(data).hexdigest() != self.engine_sha256:
            raise UserError(f"engine {self.path} is not the file its sidecar describes: {REBUILD_HINT}")
        require_flavor(self.flavor)
        with torch.cuda.device(self.device):
            runtime, engine = self._deserialize(data)
        if engine is None:
            raise UserError(f"{self.flavor} could not load engine {self.path} (see its log above): {REBUILD_HINT}")
        problems = io_problems(engine, self.spec)
        if problems:
            raise UserError(f"engine {self.path} is not a {self.spec.name} engine ({'; '.join(problems)}): "
                            f"{REBUILD_HINT}")
        self.profile = {t.name: tuple(_shape(s) for s in engine.get_tensor_profile_shape(t.name, 0))  # type: ignore[misc]
                        for t in self.spec.inputs}
        self._runtime, self._engine = runtime, engine

    def _deserialize(self, data: bytes) -> tuple[trt.Runtime | trtx.Runtime, CudaEngine | None]:
        if self.flavor == "tensorrt":
            import tensorrt as trt

            runtime = trt.Runtime(trt_logger())
            return runtime, runtime.deserialize_cuda_engine(data)
        import tensorrt_rtx as trtx

        rtx_runtime = trtx.Runtime(rtx_logger())
        validity, diagnostics = rtx_runtime.get_engine_validity(data)
        if validity == trtx.EngineValidity.INVALID:
            reasons = [name.lower().replace("_", " ") for name, flag in
                       trtx.EngineInvalidityDiagnostics.__members__.items() if int(diagnostics) & int(flag)]
            raise UserError(f"engine {self.path} cannot run on this GPU ({', '.join(reasons) or 'no reason given'})"
                            f": {REBUILD_HINT} --compute-capability with this GPU's")
        if validity == trtx.EngineValidity.SUBOPTIMAL:
            log.warning("engine %s runs on this GPU, but not at its best: consider rebuilding it", self.path)
        return rtx_runtime, rtx_runtime.deserialize_cuda_engine(data)

    def activate(self) -> None:
        """Create the execution context (TensorRT allocates its scratch memory for the largest profile shape);
        for TensorRT-RTX with its runtime cache, read from ``<engine>.runtime-cache`` when there is one, and its
        CUDA-graph strategy when asked for."""
        if self._engine is None:
            self.load()
        engine = self._engine
        with torch.cuda.device(self.device):
            if self.flavor == "tensorrt-rtx":
                self._context = self._rtx_context(engine)  # type: ignore[arg-type]
            else:
                self._context = engine.create_execution_context()  # type: ignore[union-attr]
        if self._context is None:
            raise UserError(f"{self.flavor} could not create an execution context for {self.path} "
                            "(out of GPU memory?)")

    def _rtx_context(self, engine: trtx.ICudaEngine) -> trtx.IExecutionContext:
        import tensorrt_rtx as trtx

        config = engine.create_runtime_config()
        cache = config.create_runtime_cache()
        path = runtime_cache_file(self.path)
        if path.is_file() and not cache.deserialize(path.read_bytes()):
            log.warning("runtime cache %s does not fit this GPU or TensorRT-RTX: starting a new one", path)
            cache.reset()
        config.set_runtime_cache(cache)
        if self.cuda_graph:
            config.cuda_graph_strategy = trtx.CudaGraphStrategy.WHOLE_GRAPH_CAPTURE
        self._runtime_cache = cache
        return engine.create_execution_context(config)

    def allocate(self, input_shapes: Mapping[str, Sequence[int]]) -> dict[str, torch.Tensor]:
        """Device buffers (inputs and outputs) for these input shapes, bound to the context; reused while the
        shapes are unchanged, reallocated only when a tensor grows. UserError if a shape is outside the profile.

        All or nothing: when it fails, the next call sets every shape and address again."""
        shapes = {name: tuple(int(s) for s in shape) for name, shape in input_shapes.items()}
        if shapes == self._shapes:
            return self._buffers
        if self._context is None:
            self.activate()
        context = self._context
        assert context is not None
        plan = plan_buffers(self.spec, shapes)
        problems = outside_profile(self.spec.name, shapes, self.profile)
        if problems:
            raise UserError(f"{'; '.join(problems)}: rebuild the engines with larger limits "
                            "(ccld-trt engines build)")
        grown = {name: torch.empty(math.prod(shape), dtype=dtype, device=self.device)
                 for name, (shape, dtype) in plan.items()
                 if name not in self._storage or self._storage[name].numel() < math.prod(shape)}
        self._shapes = {}  # from here the context changes: until it all succeeds, nothing is reused
        if grown:
            self._storage.update(grown)
            self._graph = None  # it captured the old addresses
        buffers = {name: self._storage[name][: math.prod(shape)].view(shape) for name, (shape, _) in plan.items()}
        for name, shape in shapes.items():
            if not context.set_input_shape(name, shape):
                raise RuntimeError(f"TensorRT refused shape {list(shape)} for {self.spec.name} input {name}")
        for name, buf in buffers.items():
            context.set_tensor_address(name, buf.data_ptr())
        for t in self.spec.outputs:  # the engine infers output shapes itself; graph_specs must agree
            if (got := _shape(context.get_tensor_shape(t.name))) != plan[t.name][0]:
                raise RuntimeError(f"{self.path.name}: output {t.name} is {list(got)}, graph_specs says "
                                   f"{list(plan[t.name][0])}")
        self._buffers, self._shapes = buffers, shapes
        self._cache_dirty = self._runtime_cache is not None  # a new shape: TensorRT-RTX specialises anew
        return buffers

    def infer(self, feed: Mapping[str, torch.Tensor], stream: torch.cuda.Stream) -> dict[str, torch.Tensor]:
        """Run the engine on ``stream`` without a host sync: ``feed`` {input name: tensor} is copied into the
        input buffers; returns {output name: buffer}. The buffers are overwritten by the next call."""
        with torch.cuda.stream(stream):  # buffers are allocated for, and copies ordered on, this stream
            buffers = self.allocate({name: t.shape for name, t in feed.items()})
            for name, t in feed.items():
                buffers[name].copy_(t, non_blocking=True)
            self.launch(stream)
        return {t.name: buffers[t.name] for t in self.spec.outputs}

    def launch(self, stream: torch.cuda.Stream) -> None:
        """One launch on the allocated buffers: from a CUDA graph when asked for (regular TensorRT: captured by
        hand at the current shapes), then the runtime cache saved if it learnt something."""
        if self.cuda_graph and self.flavor == "tensorrt":
            self._replay(stream)
        else:
            self._execute(stream)
        if self._cache_dirty:
            self.save_runtime_cache()

    def _execute(self, stream: torch.cuda.Stream) -> None:
        assert self._context is not None
        if not self._context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"TensorRT inference of {self.path.name} failed (see its log above)")

    def _replay(self, stream: torch.cuda.Stream) -> None:
        # One graph, captured anew on every shape change: the execution context keeps shape-dependent state of
        # its own, so a graph captured at an earlier shape is not trusted after the context has moved on.
        if self._graph is None or self._graph_shapes != self._shapes:
            self._graph = None
            self._execute(stream)  # TensorRT finishes shape-dependent setup in the first launch after a change
            self._graph, self._graph_shapes = self._capture(stream), dict(self._shapes)
        self._graph.replay()

    def _capture(self, stream: torch.cuda.Stream) -> Replayable:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            self._execute(stream)
        return graph

    def save_runtime_cache(self) -> None:
        """Write TensorRT-RTX's runtime cache to ``<engine>.runtime-cache`` (nothing for regular TensorRT)."""
        if self._runtime_cache is not None:
            write_atomic(runtime_cache_file(self.path), memoryview(self._runtime_cache.serialize()))
        self._cache_dirty = False

"""One engine at run time, in either TensorRT flavour: load (check, deserialize once), activate (execution
context), allocate device buffers as torch CUDA tensors, infer on a CUDA stream, optionally as a CUDA graph.

Regular TensorRT: the launch is captured into a torch CUDA graph by hand, one graph per input-shape set, each
with its own execution context and buffers (a few, least recently used dropped first), so alternating shapes
(a batch split 4 + 2) replay instead of capturing again. TensorRT-RTX: its own CUDA-graph strategy does that,
and its just-in-time kernel specialisations are kept in a runtime cache file beside the engine, so the next
start skips them (engines.runtime_cache: saved when it changed, off the inference path, and at close).

TensorRT is imported lazily: importing this module never needs it.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import logging
import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from ccld_trt.engines.flavor import MODULES, Flavor, require_flavor, require_tensorrt, rtx_logger, trt_logger
from ccld_trt.engines.profiles import Shape, ShapeRange, outside_profile
from ccld_trt.engines.runtime_cache import RuntimeCacheFile, runtime_cache_file
from ccld_trt.engines.sidecar import REBUILD_HINT
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

MAX_GRAPHS = 4  # regular TensorRT with CUDA graphs: shape sets kept captured, each with its own context

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


@dataclass
class _Slot:
    """Regular TensorRT with CUDA graphs: an execution context set to one input-shape set for good, its own
    buffers (exactly that size, so their addresses never change) and, after its first launch, the graph of it."""

    context: Any
    shapes: dict[str, Shape]
    buffers: dict[str, torch.Tensor]
    graph: Replayable | None = None


# TensorRT-RTX's EngineInvalidityDiagnostics -> what it means and what fixes it; {cap}: this GPU's capability.
INVALIDITY_FIXES = {
    "VERSION_MISMATCH": "built by another TensorRT-RTX version: rebuild it with this one (ccld-trt engines build)",
    "UNSUPPORTED_CC": "not built for this GPU (compute {cap}): rebuild it with --compute-capability {cap}",
    "OLD_CUDA_DRIVER": "the NVIDIA driver is too old for this TensorRT-RTX (its CUDA 13 wheels need an R580 or "
                       "newer driver): update the driver",
    "OLD_CUDA_RUNTIME": "the CUDA runtime is older than the engine's: install the TensorRT-RTX wheel of your CUDA "
                        "version, or update CUDA",
    "INSUFFICIENT_GPU_MEMORY": "not enough free GPU memory: free some, or rebuild with a smaller profile",
    "MALFORMED_ENGINE": "the engine file is damaged: rebuild it (ccld-trt engines build)",
    "CUDA_ERROR": "CUDA failed while checking it (see the log above): check the driver and the GPU",
}


def invalidity_message(path: Path, reasons: Sequence[str], capability: str | None) -> str:
    """One line for an engine TensorRT-RTX will not run here: each diagnostic (``reasons``, enum names such as
    "OLD_CUDA_DRIVER") with its own fix; ``capability``: this GPU's ("8.9"), None if unknown."""
    cap = capability or "X.Y"
    fixes = [INVALIDITY_FIXES.get(r, r.lower().replace("_", " ")).format(cap=cap) for r in reasons]
    return f"engine {path} cannot run here: {'; '.join(fixes) or f'no reason given: {REBUILD_HINT}'}"


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
        self._runtime_config: Any = None  # TensorRT-RTX's IRuntimeConfig: must outlive the context made from it
        self.runtime_cache: RuntimeCacheFile | None = None  # TensorRT-RTX's, saved to <engine>.runtime-cache
        self._scratch: torch.Tensor | None = None  # device memory shared by the per-shape contexts
        self._storage: dict[str, torch.Tensor] = {}
        self._buffers: dict[str, torch.Tensor] = {}
        self._shapes: dict[str, Shape] = {}
        self._slots: OrderedDict[tuple[tuple[str, Shape], ...], _Slot] = OrderedDict()
        self._slot: _Slot | None = None  # the slot the last allocate chose

    @property
    def graphs_by_hand(self) -> bool:
        """Whether launches replay CUDA graphs captured here (regular TensorRT with cuda_graph)."""
        return self.cuda_graph and self.flavor == "tensorrt"

    def load(self) -> None:
        """Read and check the engine file (its hash, the GPU's validity for it), deserialize it (once) and check
        its I/O against the graph spec."""
        if self._engine is not None:
            return
        data = self.path.read_bytes()
        if self.engine_sha256 and hashlib.sha256(data).hexdigest() != self.engine_sha256:
            raise UserError(f"engine {self.path} is not the file its sidecar describes: {REBUILD_HINT}")
        require_flavor(self.flavor)
        with self._device_scope():
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
            reasons = [name for name, flag in trtx.EngineInvalidityDiagnostics.__members__.items()
                       if int(diagnostics) & int(flag)]
            raise UserError(invalidity_message(self.path, reasons, self._capability()))
        if validity == trtx.EngineValidity.SUBOPTIMAL:
            log.warning("engine %s runs on this GPU, but not at its best: consider rebuilding it", self.path)
        return rtx_runtime, rtx_runtime.deserialize_cuda_engine(data)

    def _device_scope(self) -> contextlib.AbstractContextManager[Any]:
        # TensorRT works on the current CUDA device; tests with fakes run on the CPU
        return torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()

    def _capability(self) -> str | None:
        if self.device.type != "cuda":
            return None
        major, minor = torch.cuda.get_device_capability(self.device)
        return f"{major}.{minor}"

    def activate(self) -> None:
        """Create the execution context (TensorRT allocates its scratch memory for the largest profile shape;
        with CUDA graphs by hand, allocate makes one per shape set instead);
        for TensorRT-RTX with its runtime cache, read from ``<engine>.runtime-cache`` when there is one, and its
        CUDA-graph strategy when asked for. Once: later calls do nothing."""
        if self._context is not None:
            return
        if self._engine is None:
            self.load()
        engine = self._engine
        if self.graphs_by_hand:
            return  # a context per shape set, made by allocate
        if self.flavor == "tensorrt-rtx":
            with self._device_scope():
                self._context = self._rtx_context(engine)  # type: ignore[arg-type]
        else:
            self._context = self._new_context()

    def _new_context(self) -> Context:
        """A regular-TensorRT execution context (each holds its own scratch memory for the largest profile
        shape); UserError when TensorRT cannot make one."""
        assert self._engine is not None
        with self._device_scope():
            context = self._engine.create_execution_context()
        if context is None:
            raise UserError(f"{self.flavor} could not create an execution context for {self.path} "
                            "(out of GPU memory?)")
        return context

    def _rtx_context(self, engine: trtx.ICudaEngine) -> trtx.IExecutionContext:
        import tensorrt_rtx as trtx

        config = engine.create_runtime_config()
        cache = config.create_runtime_cache()
        self.runtime_cache = RuntimeCacheFile(runtime_cache_file(self.path), cache)
        self.runtime_cache.load()
        config.set_runtime_cache(cache)
        if self.cuda_graph:
            config.cuda_graph_strategy = trtx.CudaGraphStrategy.WHOLE_GRAPH_CAPTURE
        # NVIDIA's own samples keep the runtime config (and its cache) alive as long as the context
        self._runtime_config = config
        context = engine.create_execution_context(config)
        if context is None:
            raise UserError(f"{self.flavor} could not create an execution context for {self.path} "
                            "(out of GPU memory?)")
        return context

    def allocate(self, input_shapes: Mapping[str, Sequence[int]]) -> dict[str, torch.Tensor]:
        """Device buffers (inputs and outputs) for these input shapes, bound to the context; reused while the
        shapes are unchanged, reallocated only when a tensor grows. UserError if a shape is outside the profile.

        All or nothing: when it fails, the next call sets every shape and address again.

        Regular TensorRT with CUDA graphs: each shape set has a slot of its own (context, buffers, graph), kept
        while it is among the MAX_GRAPHS most recently used."""
        shapes = {name: tuple(int(s) for s in shape) for name, shape in input_shapes.items()}
        if self.graphs_by_hand:
            return self._slot_for(shapes).buffers
        if shapes == self._shapes:
            return self._buffers
        if self._context is None:
            self.activate()
        context = self._context
        assert context is not None
        plan = self._plan(shapes)
        grown = {name: torch.empty(math.prod(shape), dtype=dtype, device=self.device)
                 for name, (shape, dtype) in plan.items()
                 if name not in self._storage or self._storage[name].numel() < math.prod(shape)}
        self._shapes = {}  # from here the context changes: until it all succeeds, nothing is reused
        self._storage.update(grown)
        buffers = {name: self._storage[name][: math.prod(shape)].view(shape) for name, (shape, _) in plan.items()}
        self._bind(context, shapes, buffers, plan)
        self._buffers, self._shapes = buffers, shapes
        if self.runtime_cache is not None:  # TensorRT-RTX specialises kernels for it
            self.runtime_cache.new_shape()
        return buffers

    def _plan(self, shapes: dict[str, Shape]) -> dict[str, tuple[Shape, torch.dtype]]:
        problems = outside_profile(self.spec.name, shapes, self.profile)
        if problems:
            raise UserError(f"{'; '.join(problems)}: rebuild the engines with larger limits "
                            "(ccld-trt engines build)")
        return plan_buffers(self.spec, shapes)

    def _bind(self, context: Any, shapes: Mapping[str, Shape], buffers: Mapping[str, torch.Tensor],
              plan: Mapping[str, tuple[Shape, torch.dtype]]) -> None:
        """Set ``context``'s input shapes and every tensor address; RuntimeError if TensorRT disagrees."""
        for name, shape in shapes.items():
            if not context.set_input_shape(name, shape):
                raise RuntimeError(f"TensorRT refused shape {list(shape)} for {self.spec.name} input {name}")
        for name, buf in buffers.items():
            context.set_tensor_address(name, buf.data_ptr())
        for t in self.spec.outputs:  # the engine infers output shapes itself; graph_specs must agree
            if (got := _shape(context.get_tensor_shape(t.name))) != plan[t.name][0]:
                raise RuntimeError(f"{self.path.name}: output {t.name} is {list(got)}, graph_specs says "
                                   f"{list(plan[t.name][0])}")

    def _slot_context(self) -> Any:
        """A context for a new slot. The slots' contexts share one scratch allocation (TensorRT >= 10.1): they
        run one at a time on one stream, and scratch holds nothing from one launch to the next."""
        engine = self._engine
        assert engine is not None
        if not hasattr(engine, "device_memory_size_v2"):
            return self._new_context()
        size = int(engine.device_memory_size_v2)
        if self._scratch is None or self._scratch.numel() < size:
            self._scratch = torch.empty(size, dtype=torch.uint8, device=self.device)  # 512-byte aligned
        strategy = importlib.import_module(MODULES[self.flavor]).ExecutionContextAllocationStrategy.USER_MANAGED
        with self._device_scope():
            context = engine.create_execution_context(strategy)
        if context is None:
            raise UserError(f"{self.flavor} could not create an execution context for {self.path}")
        context.set_device_memory(self._scratch.data_ptr(), self._scratch.numel())
        return context

    def _slot_for(self, shapes: dict[str, Shape]) -> _Slot:
        """The slot of this shape set (made when new, the least recently used one dropped beyond MAX_GRAPHS)."""
        key = tuple(sorted(shapes.items()))
        slot = self._slots.get(key)
        if slot is None:
            if self._engine is None:
                self.load()
            plan = self._plan(shapes)
            context = self._slot_context()
            buffers = {name: torch.empty(shape, dtype=dtype, device=self.device) for name, (shape, dtype) in
                       plan.items()}
            self._bind(context, shapes, buffers, plan)
            slot = self._slots[key] = _Slot(context, shapes, buffers)
            while len(self._slots) > MAX_GRAPHS:
                self._drop_oldest_slot()
        self._slots.move_to_end(key)
        self._slot = slot
        return slot

    def _drop_oldest_slot(self) -> None:
        # A replay of it may still be queued: let the GPU finish before its graph and buffers go.
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        self._slots.popitem(last=False)

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
        """One launch on the allocated buffers: from a CUDA graph when asked for (regular TensorRT: the graph of
        the current shape set, captured on its first launch); TensorRT-RTX: the runtime cache looked at now and
        then (RuntimeCacheFile.after_launch)."""
        if self.graphs_by_hand:
            self._replay(stream)
        else:
            assert self._context is not None
            self._execute(self._context, stream)
        if self.runtime_cache is not None:
            self.runtime_cache.after_launch()

    def _execute(self, context: Any, stream: torch.cuda.Stream) -> None:
        if not context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"TensorRT inference of {self.path.name} failed (see its log above)")

    def _replay(self, stream: torch.cuda.Stream) -> None:
        slot = self._slot
        assert slot is not None, "allocate first"
        if slot.graph is None:
            self._execute(slot.context, stream)  # TensorRT finishes shape-dependent setup in the first launch
            slot.graph = self._capture(slot.context, stream)
        slot.graph.replay()

    def _capture(self, context: Any, stream: torch.cuda.Stream) -> Replayable:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            self._execute(context, stream)
        return graph

    def close(self) -> None:
        """Save TensorRT-RTX's runtime cache if it changed, and stop its writer thread."""
        if self.runtime_cache is not None:
            self.runtime_cache.close()

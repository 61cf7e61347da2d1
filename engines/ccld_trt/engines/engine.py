"""One TensorRT engine at run time: load (deserialize once), activate (execution context), allocate device
buffers as torch CUDA tensors, infer on a CUDA stream, optionally through a captured CUDA graph.

TensorRT is imported lazily: importing this module never needs it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ccld_trt.engines.profiles import Shape, ShapeRange, bind_dims, outside_profile, resolve_dim
from ccld_trt.engines.sidecar import REBUILD_HINT
from ccld_trt.export.errors import UserError
from ccld_trt.export.graph_specs import GraphSpec

if TYPE_CHECKING:
    import tensorrt as trt

INSTALL_HINT = "pip install 'ccld-trt[tensorrt]' (needs an NVIDIA GPU and driver)"


def require_tensorrt() -> str:
    """The installed TensorRT version ("10.13.0.35"); a one-line UserError if TensorRT cannot be imported."""
    try:
        import tensorrt as trt
    except (ImportError, OSError) as e:  # OSError: the package is there but its libnvinfer is not
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"TensorRT is not installed: import tensorrt failed ({first}); {INSTALL_HINT}") from e
    version = getattr(trt, "__version__", None)
    # tensorrt-stubs alone make `import tensorrt` succeed, as an empty namespace package
    if not isinstance(version, str) or not hasattr(trt, "Builder"):
        raise UserError(f"TensorRT is not installed: only its type stubs are; {INSTALL_HINT}")
    return version


def trt_major(version: str) -> int:
    """"10.13.0.35" -> 10."""
    return int(version.split(".")[0])


@functools.cache
def trt_logger() -> trt.ILogger:
    """One logger for builders and runtimes (TensorRT wants them to share one), warnings and errors only."""
    import tensorrt as trt

    return trt.Logger(trt.Logger.WARNING)


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


def _shape(dims: trt.Dims) -> Shape:
    return tuple(int(dims[i]) for i in range(len(dims)))


def _profile_range(engine: trt.ICudaEngine, name: str) -> ShapeRange:
    lo, opt, hi = engine.get_tensor_profile_shape(name, 0)  # the only profile the builder makes
    return _shape(lo), _shape(opt), _shape(hi)


class Engine:
    """A serialized engine for one graph of graph_specs, run with buffers owned here on ``device``.

    Buffers are flat torch tensors that only grow; a smaller request uses a prefix view, so addresses (and the
    CUDA graphs captured on them) stay valid until a larger shape forces a reallocation.
    """

    def __init__(self, path: Path, spec: GraphSpec, device: torch.device) -> None:
        self.path = Path(path)
        self.spec = spec
        self.device = device
        self.profile: dict[str, ShapeRange] = {}  # the built (min, opt, max) of each input, profile 0
        self._runtime: trt.Runtime | None = None  # must outlive the engine
        self._engine: trt.ICudaEngine | None = None
        self._context: trt.IExecutionContext | None = None
        self._storage: dict[str, torch.Tensor] = {}
        self._buffers: dict[str, torch.Tensor] = {}
        self._shapes: dict[str, Shape] = {}
        self._graphs: dict[tuple[tuple[str, Shape], ...], torch.cuda.CUDAGraph] = {}

    def load(self) -> None:
        """Deserialize the engine (once) and check its I/O against the graph spec."""
        if self._engine is not None:
            return
        require_tensorrt()
        import tensorrt as trt

        with torch.cuda.device(self.device):
            runtime = trt.Runtime(trt_logger())
            engine = runtime.deserialize_cuda_engine(self.path.read_bytes())
        if engine is None:
            raise UserError(f"TensorRT could not load engine {self.path} (see its log above): {REBUILD_HINT}")
        problems = []
        modes = {t.name: trt.TensorIOMode.INPUT for t in self.spec.inputs}
        modes.update({t.name: trt.TensorIOMode.OUTPUT for t in self.spec.outputs})
        names = {engine.get_tensor_name(i) for i in range(engine.num_io_tensors)}
        for t in (*self.spec.inputs, *self.spec.outputs):
            if t.name not in names or engine.get_tensor_mode(t.name) != modes[t.name]:
                problems.append(f"no {modes[t.name].name.lower()} {t.name}")
            elif (dtype := np.dtype(trt.nptype(engine.get_tensor_dtype(t.name))).name) != t.dtype:
                problems.append(f"{t.name} is {dtype}, not {t.dtype}")
        if problems:
            raise UserError(f"engine {self.path} is not a {self.spec.name} engine ({'; '.join(problems)}): "
                            f"{REBUILD_HINT}")
        self.profile = {t.name: _profile_range(engine, t.name) for t in self.spec.inputs}
        self._runtime, self._engine = runtime, engine

    def activate(self) -> None:
        """Create the execution context (TensorRT allocates its scratch memory for the largest profile shape)."""
        if self._engine is None:
            self.load()
        assert self._engine is not None
        with torch.cuda.device(self.device):
            self._context = self._engine.create_execution_context()
        if self._context is None:
            raise UserError(f"TensorRT could not create an execution context for {self.path} (out of GPU memory?)")

    def allocate(self, input_shapes: Mapping[str, Sequence[int]]) -> dict[str, torch.Tensor]:
        """Device buffers (inputs and outputs) for these input shapes, bound to the context; reused while the
        shapes are unchanged, reallocated only when a tensor grows. UserError if a shape is outside the profile."""
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
                            "(ccld-trt engines build --rebuild)")
        for name, (shape, dtype) in plan.items():
            store = self._storage.get(name)
            if store is None or store.numel() < math.prod(shape):
                self._storage[name] = torch.empty(math.prod(shape), dtype=dtype, device=self.device)
                self._graphs.clear()  # they captured the old addresses
        self._buffers = {name: self._storage[name][: math.prod(shape)].view(shape) for name, (shape, _) in plan.items()}
        for name, shape in shapes.items():
            if not context.set_input_shape(name, shape):
                raise RuntimeError(f"TensorRT refused shape {list(shape)} for {self.spec.name} input {name}")
        for name, buf in self._buffers.items():
            context.set_tensor_address(name, buf.data_ptr())
        for t in self.spec.outputs:  # the engine infers output shapes itself; graph_specs must agree
            if (got := _shape(context.get_tensor_shape(t.name))) != plan[t.name][0]:
                raise RuntimeError(f"{self.path.name}: output {t.name} is {list(got)}, graph_specs says "
                                   f"{list(plan[t.name][0])}")
        self._shapes = shapes
        return self._buffers

    def infer(self, feed: Mapping[str, torch.Tensor], stream: torch.cuda.Stream, *,
              cuda_graph: bool = False) -> dict[str, torch.Tensor]:
        """Run the engine on ``stream`` without a host sync: ``feed`` {input name: tensor} is copied into the
        input buffers; returns {output name: buffer}. The buffers are overwritten by the next call.

        cuda_graph: replay a CUDA graph of the launch, captured on the first call with these input shapes (that
        capture synchronizes the device once).
        """
        with torch.cuda.stream(stream):  # buffers are allocated for, and copies ordered on, this stream
            buffers = self.allocate({name: t.shape for name, t in feed.items()})
            for name, t in feed.items():
                buffers[name].copy_(t, non_blocking=True)
            if cuda_graph:
                self._replay(stream)
            else:
                self._execute(stream)
        return {t.name: buffers[t.name] for t in self.spec.outputs}

    def _execute(self, stream: torch.cuda.Stream) -> None:
        assert self._context is not None
        if not self._context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"TensorRT inference of {self.path.name} failed (see its log above)")

    def _replay(self, stream: torch.cuda.Stream) -> None:
        key = tuple(sorted(self._shapes.items()))
        graph = self._graphs.get(key)
        if graph is None:
            # TensorRT finishes shape-dependent setup in the first launch after a shape change: capture after it
            self._execute(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=stream):
                self._execute(stream)
            self._graphs[key] = graph
        graph.replay()

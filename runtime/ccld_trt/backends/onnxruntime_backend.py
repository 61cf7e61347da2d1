"""The ONNX Runtime backend: the Backend interface over the exported graphs (unet_cfg, decoder, text_encoder,
image_encoder, encoder) of one directory, on the CPU, or on a CUDA GPU through the TensorRT and CUDA execution
providers of onnxruntime-gpu.

Each session is created once; the graphs a text-only request does not run (graph_specs.ON_DEMAND_GRAPHS) on their
first call (exported then, through ``export``, where they are not current), or by ``open_all``. On the CPU a session
opens from the graph as ONNX Runtime optimised it the first time (onnxruntime_sessions.optimized_model: saved once
per graph file, ONNX Runtime version and CPU, then loaded without optimising again: ~1 s less per start on the
full-size U-Net, outputs bit-identical to optimising anew), its weights in a file beside it that ONNX Runtime maps
into memory instead of copying out of the graph (the three graphs of a text prompt open in ~0.4 s, not ~1.4 s, on a
2-core AMD EPYC). A call binds the caller's torch tensors' memory as the graph inputs (IO binding, no copy) and has
ONNX Runtime write into an output tensor allocated once per output shape; the caller gets a copy of it, because
samplers keep earlier outputs (PLMS's history) while the buffer is reused by the next call.
"""

from __future__ import annotations

from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ccld_trt import backend_select
from ccld_trt.backends.base import Export, GraphBackend, Opened, graph_path, take_opened
from ccld_trt.backends.onnxruntime_sessions import OPTIMIZED_DIR, open_cpu_session, session_key, session_options
from ccld_trt.export.errors import UserError, require_file
from ccld_trt.export.graph_specs import EAGER_GRAPHS, GRAPHS, ON_DEMAND_GRAPHS
from ccld_trt.export.onnx_files import onnx_path
from ccld_trt.export.quiet_imports import import_onnxruntime
from ccld_trt.export.shapes import output_shapes

GPU_HINT = "pip install 'ccld-trt[gpu]' (onnxruntime-gpu) and use an NVIDIA GPU, or the cpu device"


def check_precision(precision: str) -> str:
    """``precision`` if this backend has graphs for it (fp32, fp16), else UserError."""
    return backend_select.check_precision("onnxruntime", precision)


def execution_providers(device: torch.device, precision: str, cache_dir: Path) -> list[Any]:
    """ONNX Runtime providers for ``device``: the CPU's, or TensorRT (when onnxruntime-gpu has it; engines cached
    in ``cache_dir``) then CUDA, with the CPU for anything they leave. UserError when CUDA is asked for but this
    onnxruntime has no CUDA provider."""
    ort = import_onnxruntime()

    if device.type == "cpu":
        return ["CPUExecutionProvider"]
    if device.type != "cuda":
        raise UserError(f"the onnxruntime backend runs on cpu or cuda, not {device.type}")
    available = ort.get_available_providers()
    if "CUDAExecutionProvider" not in available:
        raise UserError(f"onnxruntime {ort.__version__} has no CUDA provider (it offers {', '.join(available)}); "
                        f"{GPU_HINT}")
    index = device.index or 0
    providers: list[Any] = []
    if "TensorrtExecutionProvider" in available:
        providers.append(("TensorrtExecutionProvider", {
            "device_id": index, "trt_fp16_enable": precision == "fp16", "trt_engine_cache_enable": True,
            "trt_timing_cache_enable": True, "trt_engine_cache_path": str(cache_dir),
            "trt_timing_cache_path": str(cache_dir)}))
    providers += [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
    return providers


class OnnxRuntimeBackend(GraphBackend):
    """Backend over ``<onnx_dir>/<graph>.onnx`` (``precision`` fp32) or ``<graph>.fp16.onnx`` (fp16),
    as written by ``ccld_trt.export.onnx_export.export_all``. ``threads``: intra-op threads on the CPU.
    ``export``: called with an on-demand graph's name before it opens (runner.open_session's; None: the graph
    must be there).

    One call at a time (as the pipeline makes them): calls share their bindings and output buffers.
    """

    name = "onnxruntime"

    def __init__(self, onnx_dir: Path, device: str | torch.device = "cpu", precision: str = "fp32",
                 threads: int | None = None, opened: Opened | None = None, export: Export | None = None) -> None:
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.precision = check_precision(precision)
        onnx_dir = self.onnx_dir = Path(onnx_dir)
        # what each session was opened with, kept so that tools (the benchmark's profiler) can open them alike
        self.providers = execution_providers(self.device, precision, onnx_dir / "ort-tensorrt-cache")
        self.options = session_options(threads)
        self.files = {graph: self._graph_file(graph) for graph in EAGER_GRAPHS}
        self._export = export
        self.sessions: dict[str, Any] = {}
        # ONNX Runtime builds a CPU session without the GIL: two at once use two cores (the three of a text prompt
        # 0.45 -> 0.35 s on 2 cores); on a GPU one at a time (TensorRT's builds would share its memory)
        with ThreadPoolExecutor(2 if self.device.type == "cpu" else 1) as pool:
            list(pool.map(lambda graph: self._open(graph, opened), EAGER_GRAPHS))
        self._ort_device = self.device.type
        self._device_id = self.device.index or 0
        # (graph, output shape) -> the IO binding with its output bound, and that output tensor
        self._bound: dict[tuple[str, tuple[int, ...]], tuple[Any, torch.Tensor]] = {}

    def _graph_file(self, graph: str) -> Path:
        """``<onnx_dir>/<graph>[.fp16].onnx``; UserError when it is missing."""
        return require_file(onnx_path(self.onnx_dir, graph, self.precision), f"{graph} ONNX graph")

    def _open(self, graph: str, opened: Opened | None = None) -> None:
        """Open ``graph``'s session (on the CPU from its saved optimised copy when there is one; taken from
        ``opened``, onnxruntime_sessions.open_saved_sessions's result, where that opened the same copy alike)."""
        ort = import_onnxruntime()

        path = graph_path(self.files, graph, self._export, lambda: self._graph_file(graph))
        if self.device.type == "cpu":
            root = self.onnx_dir / OPTIMIZED_DIR
            session = take_opened(opened, graph, session_key(root, path, self.options))
            self.sessions[graph] = session if session is not None else open_cpu_session(path, self.options, root)
        else:
            self.sessions[graph] = ort.InferenceSession(str(path), self.options, providers=self.providers)

    def open_all(self) -> None:
        """Open the on-demand graphs' sessions now (a server may do this at start-up, off the request path)."""
        for graph in ON_DEMAND_GRAPHS:
            if graph not in self.sessions:
                self._open(graph)

    def unet_rows(self, x: torch.Tensor, t: torch.Tensor, embed: torch.Tensor) -> torch.Tensor:
        """The plain U-Net, one condition per row: x [B, 4, h, w], t [B], embed [B, 512] -> v [B, 4, h, w].

        For callers that merge the CFG rows of several requests into one call (the cluster) and weigh each
        request's rows themselves. Runs ``<onnx_dir>/unet[.fp16].onnx``, exported like the other graphs
        (``export_all(..., ["unet"])``); its session opens on the first call.
        """
        return self._call("unet", {"x": x, "t": t, "embed": embed})

    def _run(self, graph: str, feed: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Run ``graph`` on ``feed`` ({input name: tensor}, converted to the graph's dtypes on this device);
        returns a new tensor holding its output."""
        if graph not in self.sessions:
            self._open(graph)
        spec = GRAPHS[graph]
        inputs = {t.name: feed[t.name].to(self.device, getattr(torch, t.dtype)).contiguous() for t in spec.inputs}
        (output,) = spec.outputs
        shape = output_shapes(spec, {name: tensor.shape for name, tensor in inputs.items()})[output.name]
        if (graph, shape) not in self._bound:
            out = torch.empty(shape, dtype=getattr(torch, output.dtype), device=self.device)
            binding = self.sessions[graph].io_binding()
            binding.bind_output(output.name, self._ort_device, self._device_id, np.dtype(output.dtype), shape,
                                out.data_ptr())
            self._bound[graph, shape] = binding, out
        binding, out = self._bound[graph, shape]
        for t in spec.inputs:
            tensor = inputs[t.name]
            binding.bind_input(t.name, self._ort_device, self._device_id, np.dtype(t.dtype), tuple(tensor.shape),
                               tensor.data_ptr())
        if self.device.type == "cuda":
            # ONNX Runtime works on its own stream: the inputs written on torch's must be complete. Run returns
            # once its outputs are.
            torch.cuda.current_stream(self.device).synchronize()
        self.sessions[graph].run_with_iobinding(binding)
        return out.clone()

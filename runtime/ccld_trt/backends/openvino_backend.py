"""The OpenVINO backend: the Backend interface over the exported graphs (unet_cfg, decoder, text_encoder,
image_encoder) on the CPU, read straight from the fp32 ONNX files by OpenVINO's ONNX frontend.

Precisions: ``fp32``; ``bf16``, the fp32 graphs compiled with OpenVINO's bf16 inference hint (weights and
activations in bf16 where OpenVINO deems it safe, accumulation in fp32), which needs the CPU's bf16 dot-product
instructions; ``int8``, the NNCF-quantised graphs that ``ccld_trt.export.quantize`` writes (where a graph has
none, its fp32 graph runs), the rest at bf16 where the CPU has it. The CPU's instruction set is checked before
anything compiles, so a precision that cannot run is one clear line, not a slow or silently-fp32 run.

Each graph is compiled once per model file: OpenVINO's model cache keeps the compiled blob under the graphs'
directory, so later starts load it instead of compiling again (openvino_compile: the torch-free part, with which a
fresh ``sample`` process compiles the graphs from the cache while it imports torch). One ``Core`` serves the
graphs the backend compiles itself; the graphs a text-only request does not run (graph_specs.ON_DEMAND_GRAPHS:
the CLOOB image encoder, the autoencoder's encoder) are compiled on their first call (exported then, through
``export``, where they are not current), or by ``open_all``. One inference request per graph, as the pipeline
makes one call at a time.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ccld_trt.backend_select import require_openvino
from ccld_trt.backends.base import Export, GraphBackend, Opened, graph_path, take_opened
from ccld_trt.backends.openvino_compile import (
    CACHE_DIR,
    cache_folder,
    check_precision,
    compile_config,
    compile_graph,
    graph_file,
    graph_files,
    infer,
)
from ccld_trt.cpu_features import default_cpu_precision, physical_cores
from ccld_trt.export.graph_specs import EAGER_GRAPHS, GRAPHS, ON_DEMAND_GRAPHS


class OpenVinoBackend(GraphBackend):
    """Backend over the graphs of ``onnx_dir`` (as written by ``export_all``, plus ``quantize`` for int8), on
    the CPU. ``precision``: fp32, bf16 or int8 (None: bf16 where the CPU has it, else fp32). ``threads``: per
    inference (None: the physical cores). ``export``: called with an on-demand graph's name before it compiles
    (runner.open_session's; None: the graph must be there). One call at a time (as the pipeline makes them)."""

    name = "openvino"

    def __init__(self, onnx_dir: Path, precision: str | None = None, threads: int | None = None,
                 opened: Opened | None = None, export: Export | None = None) -> None:
        self.device = torch.device("cpu")
        self.precision = check_precision(precision or default_cpu_precision())
        ov = require_openvino()
        onnx_dir = Path(onnx_dir)
        self.files = graph_files(onnx_dir, EAGER_GRAPHS, self.precision)
        self._export = export
        self.threads = threads or physical_cores()
        self.config = compile_config(self.precision, self.threads)
        self._core = ov.Core()
        self.compiled: dict[str, Any] = {}
        self._requests: dict[str, Any] = {}
        for graph in EAGER_GRAPHS:
            self._open(graph, opened)

    def _open(self, graph: str, opened: Opened | None = None) -> None:
        """Compile ``graph`` (from OpenVINO's model cache when it holds this file's blob) and make its request; or
        take both from ``opened`` (openvino_compile.open_cached_graphs's result) where that compiled the same file
        version alike."""
        path = graph_path(self.files, graph, self._export, lambda: graph_file(self.onnx_dir, graph, self.precision))
        folder = cache_folder(self.onnx_dir / CACHE_DIR, path, self.config)
        handle = take_opened(opened, graph, folder)
        if handle is None:
            model = compile_graph(self._core, path, self.config, folder)
            handle = model, model.create_infer_request()
        self.compiled[graph], self._requests[graph] = handle

    def open_all(self) -> None:
        """Compile the on-demand graphs now (a server may do this at start-up, off the request path)."""
        for graph in ON_DEMAND_GRAPHS:
            if graph not in self._requests:
                self._open(graph)

    @property
    def onnx_dir(self) -> Path:
        """The graphs' directory (where the cluster's replica exports the plain ``unet`` graph for unet_rows)."""
        return self.files["unet_cfg"].parent

    def unet_rows(self, x: torch.Tensor, t: torch.Tensor, embed: torch.Tensor) -> torch.Tensor:
        """The plain U-Net, one condition per row: x [B, 4, h, w], t [B], embed [B, 512] -> v [B, 4, h, w].

        For callers that merge the CFG rows of several requests into one call (the cluster) and weigh each
        request's rows themselves. Runs ``<onnx_dir>/unet.onnx`` (``export_all(..., ["unet"], fp16=False)``; for
        int8, its int8 model where export.quantize made one), compiled like the others on the first call."""
        return self._call("unet", {"x": x, "t": t, "embed": embed})

    def _run(self, graph: str, feed: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Run ``graph`` on ``feed`` ({input name: tensor}, converted to the graph's dtypes); returns a new
        tensor holding its output."""
        spec = GRAPHS[graph]
        inputs = {t.name: np.ascontiguousarray(feed[t.name].detach().cpu().to(getattr(torch, t.dtype)).numpy())
                  for t in spec.inputs}
        if graph not in self._requests:
            self._open(graph)
        return torch.from_numpy(np.asarray(infer(self._requests[graph], inputs)))

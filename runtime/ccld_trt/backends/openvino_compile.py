"""How the OpenVINO backend compiles the graph files, without torch: which file each graph runs from, the CPU
properties, and where OpenVINO's model cache keeps each compiled blob. A fresh ``sample`` process compiles the
graphs from that cache while it imports torch (``open_cached_graphs``, started by runner.prefetch_graphs)."""

from __future__ import annotations

import hashlib
import shutil
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ccld_trt import backend_select
from ccld_trt.cpu_features import default_cpu_precision, physical_cores
from ccld_trt.export.errors import require_file
from ccld_trt.export.onnx_files import file_version, onnx_path

if TYPE_CHECKING:  # the backend's module imports torch; this one must not (it runs while torch imports)
    from ccld_trt.backends.base import Opened

CACHE_DIR = "openvino-cache"  # under the graphs' directory: compiled blobs, a folder per file version and configuration
# OpenVINO's names for the inference precision hint
_HINTS = {"fp32": "f32", "bf16": "bf16"}


def check_precision(precision: str) -> str:
    """``precision`` if this backend runs it and this CPU has its instructions (cpu_features), else UserError
    (one line)."""
    backend_select.check_precision("openvino", precision)
    return backend_select.check_cpu_precision("openvino", precision)


def graph_file(onnx_dir: Path, graph: str, precision: str) -> Path:
    """The file ``graph`` runs from: the int8 model where ``precision`` is int8 and one was made for the graph
    (see export.quantize), else the fp32 ONNX graph. A missing file is a UserError."""
    int8 = None
    if precision == "int8":
        from ccld_trt.export.quantize import quantized_path  # the quantiser (and the exporter) only for int8

        int8 = quantized_path(onnx_dir, graph)
    return require_file(int8 or onnx_path(onnx_dir, graph), f"{graph} graph")


def graph_files(onnx_dir: Path, graphs: Iterable[str], precision: str) -> dict[str, Path]:
    """The file each of ``graphs`` runs from (``graph_file``); missing files are a UserError."""
    return {graph: graph_file(onnx_dir, graph, precision) for graph in graphs}


def compile_config(precision: str, threads: int) -> dict[str, Any]:
    """OpenVINO CPU properties: one stream, ``threads`` threads, latency-first, and the inference precision
    (int8 graphs run their unquantised ops at bf16 where the CPU has it)."""
    hint = _HINTS.get(precision) or _HINTS[default_cpu_precision()]
    return {"INFERENCE_PRECISION_HINT": hint, "INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1,
            "PERFORMANCE_HINT": "LATENCY"}


def cache_folder(root: Path, path: Path, config: Mapping[str, Any]) -> Path:
    """``<root>/<graph file name>-<file digest>-<config digest>``: the model cache of one version of one graph file
    compiled with one configuration. OpenVINO's cache key for a model compiled from a path is the path's absolute
    name and the properties, not the file's bytes, so the folder's name covers the rest: size and mtime of the file
    and of its weights beside it, and its absolute path too (a moved build directory would otherwise find the
    folder, miss its blob, compile without saying so, and keep the old blob beside the new). Folders of older
    versions of the same file are removed; those of the same version compiled otherwise (another precision,
    another thread count) are kept, so switching back and forth compiles nothing again."""
    ident = [str(path.resolve()), *file_version(path)]
    version = f"{path.name}-{_digest(ident)}-"
    folder = root / f"{version}{_digest(sorted(config.items()))}"
    if root.is_dir():
        for old in root.glob(f"{path.name}-*"):
            if not old.name.startswith(version):
                shutil.rmtree(old, ignore_errors=True)
    return folder


def _digest(value: object) -> str:
    return hashlib.sha256(repr(value).encode()).hexdigest()[:12]


def compile_graph(core: Any, path: Path, config: Mapping[str, Any], folder: Path) -> Any:
    """``path`` compiled for the CPU with ``config`` (an ov.CompiledModel), through the model cache ``folder``:
    from its blob when it holds one, else compiled (said on stderr: seconds on a small CPU) and the blob saved
    there."""
    if not folder.is_dir():
        print(f"openvino: compiling {path.name} for this CPU (once: the cache keeps it for later starts)",
              file=sys.stderr, flush=True)
    return core.compile_model(str(path), "CPU", {**config, "CACHE_DIR": str(folder)})


def infer(request: Any, inputs: Mapping[str, Any]) -> Any:
    """One call of a compiled graph's infer request on numpy ``inputs`` ({input name: array of the graph's dtype});
    its one output as a new array. OpenVINO reads the inputs in place (share_inputs); the output is a copy, not the
    request's own buffer, which the next call overwrites while samplers still hold earlier outputs."""
    return request.infer(inputs, share_inputs=True, share_outputs=False)[0]


def open_graph(core: Any, onnx_dir: Path, graph: str, precision: str, cached_only: bool = False
               ) -> tuple[Path, tuple[Any, Any]] | None:
    """``graph`` of ``onnx_dir`` (fp32 or bf16) as the backend opens it: (cache folder, (compiled model, infer
    request)), compiled through OpenVINO's model cache (``compile_graph``); with ``cached_only``, None where the
    cache holds no blob for it (nothing is compiled anew). The cache folder is the key the backend checks before
    using one (``OpenVinoBackend(opened=...)``): the same file version and properties."""
    config = compile_config(precision, physical_cores())
    path = graph_file(onnx_dir, graph, precision)
    folder = cache_folder(onnx_dir / CACHE_DIR, path, config)
    if cached_only and not folder.is_dir():
        return None
    model = compile_graph(core, path, config, folder)
    return folder, (model, model.create_infer_request())


def open_cached_graphs(onnx_dir: Path, graphs: Iterable[str], precision: str) -> Opened:
    """{graph: ``open_graph``'s (cache folder, (compiled model, infer request))} for those of ``graphs`` (fp32 or
    bf16) whose blob the model cache already holds; the others are left to the backend (nothing is compiled anew
    here). One ``ov.Core`` for all, one graph at a time: a compile sets the process's C locale and puts back the
    one it found, so two at once can leave "C" behind (Python's text files then default to ASCII; seen)."""
    core = backend_select.require_openvino().Core()
    opened: Opened = {}
    for graph in graphs:
        if (handle := open_graph(core, onnx_dir, graph, precision, cached_only=True)) is not None:
            opened[graph] = handle
    return opened

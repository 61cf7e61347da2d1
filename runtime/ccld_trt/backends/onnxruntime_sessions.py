"""How the ONNX Runtime backend opens CPU sessions, without torch: the session options, and the graph as ONNX
Runtime optimised it the first time (saved once per graph file, ONNX Runtime version and CPU, then opened without
optimising again), its weights in a file beside it that ONNX Runtime maps into memory. A fresh ``sample`` process
opens the saved copies while it imports torch (``open_saved_sessions``, started by runner.prefetch_graphs)."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import platform
import shutil
from collections.abc import Hashable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ccld_trt.export.onnx_files import external_data, file_version, onnx_path
from ccld_trt.export.quiet_imports import import_onnxruntime

if TYPE_CHECKING:  # the backend's module imports torch; this one must not (it runs while torch imports)
    from ccld_trt.backends.base import Opened

OPTIMIZED_DIR = "ort-optimized"  # under the graphs' directory: each graph as ONNX Runtime optimised it on this CPU
OPTIMIZED_NAME = "model.onnx"  # the optimised graph in its folder (its weights: model.onnx.data)
_PROVIDERS = ["CPUExecutionProvider"]


def session_options(threads: int | None = None) -> Any:
    """CPU-tuned session options: every graph optimisation (fusions, NCHWc layouts), ops run one after another
    (these graphs are chains, so parallel branches gain nothing), ``threads`` per op (None: ONNX Runtime's
    default, one per physical core)."""
    ort = import_onnxruntime()

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.inter_op_num_threads = 1
    options.intra_op_num_threads = threads or 0
    options.log_severity_level = 3  # errors only: the optimiser's notes are not for users
    return options


def optimized_model(root: Path, source: Path) -> Path:
    """``<root>/<graph file name>-<digest>/model.onnx``: where the CPU-optimised copy of ``source`` is kept, its
    weights in ``model.onnx.data`` beside it. The digest covers the source's size and mtime (and its external
    data's), the ONNX Runtime version and the CPU (the optimiser's NCHWc layouts are specific to it), so a changed
    graph, library or machine never opens an old copy; copies of older versions of the same file are removed."""
    ort = import_onnxruntime()

    ident = file_version(source)
    digest = hashlib.sha256(repr((ident, ort.__version__, platform.machine(), _cpu_model())).encode()).hexdigest()
    folder = root / f"{source.name}-{digest[:12]}"
    if root.is_dir():
        for old in root.glob(f"{source.name}-*"):
            if old.is_dir() and old != folder:
                shutil.rmtree(old, ignore_errors=True)
            elif old.is_file():  # a copy saved as one file, before the weights went beside it
                old.unlink(missing_ok=True)
    return folder / OPTIMIZED_NAME


@functools.cache  # read once per process: every session's key and copy name include it
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next((line for line in f if line.startswith("model name")), "")
    except OSError:
        return platform.processor()


def _copy_options(options: Any) -> Any:
    """A new SessionOptions with the same settings as ``options`` (the ones ``session_options`` sets)."""
    ort = import_onnxruntime()

    copy = ort.SessionOptions()
    for name in ("graph_optimization_level", "execution_mode", "inter_op_num_threads", "intra_op_num_threads",
                 "log_severity_level"):
        setattr(copy, name, getattr(options, name))
    return copy


def session_key(root: Path, source: Path, options: Any) -> Hashable:
    """What a CPU session of ``source`` opened with ``options`` depends on: its saved optimised copy's path (the
    graph file's version, ONNX Runtime's and the CPU's) and the threads per op."""
    return str(optimized_model(root, source)), options.intra_op_num_threads


def open_saved_session(source: Path, options: Any, root: Path) -> Any | None:
    """A CPU session of ``source`` opened without optimising or writing anything: from its optimised copy under
    ``root``, or the graph itself where its weights lie outside it (past 2 GB: not copied); None when neither."""
    ort = import_onnxruntime()

    if external_data(source).exists():
        return ort.InferenceSession(str(source), options, providers=_PROVIDERS)
    target = optimized_model(root, source)
    if not target.is_file():
        return None
    saved = _copy_options(options)
    saved.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(target), saved, providers=_PROVIDERS)


def open_cpu_session(source: Path, options: Any, root: Path) -> Any:
    """A CPU session of ``source``: from its optimised copy under ``root`` when there is one (no optimising
    again), else optimised now and the result saved there for the next start."""
    ort = import_onnxruntime()

    session = open_saved_session(source, options, root)
    if session is not None:
        return session
    target = optimized_model(root, source)
    staged = target.parent.with_name(f".{target.parent.name}.{os.getpid()}")
    staged.mkdir(parents=True, exist_ok=True)
    writing = _copy_options(options)
    writing.optimized_model_filepath = str(staged / target.name)
    # the weights (initializers past 1 KiB) to a data file: ONNX Runtime maps it into memory when the copy is
    # opened, where weights inside the graph's protobuf are parsed and copied
    writing.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                     f"{target.name}.data")
    try:
        session = ort.InferenceSession(str(source), writing, providers=_PROVIDERS)
        with contextlib.suppress(OSError):  # another process saved the same copy first: theirs is kept
            os.rename(staged, target.parent)  # the folder whole or not at all: another process may be opening it
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    return session


def open_graph_session(onnx_dir: Path, graph: str, precision: str) -> Any:
    """A CPU session of ``graph`` of ``onnx_dir`` as the backend opens one with its default options
    (``open_cpu_session``: from its saved optimised copy, made first where there is none)."""
    return open_cpu_session(onnx_path(onnx_dir, graph, precision), session_options(), onnx_dir / OPTIMIZED_DIR)


def run_cpu(session: Any, inputs: Mapping[str, Any]) -> Any:
    """One call of a CPU session on numpy ``inputs`` ({input name: array of the graph's dtype}); its one output as a
    new array (the backend binds torch tensors instead; the same kernels, the same bits)."""
    return session.run(None, dict(inputs))[0]


def open_saved_sessions(onnx_dir: Path, graphs: Iterable[str], precision: str) -> Opened:
    """{graph: (session_key, session)} for those of ``graphs`` that ``open_saved_session`` can open with the
    backend's default options; the others are left to the backend. The key is what the backend checks before
    using one (``OnnxRuntimeBackend(opened=...)``). The graphs are opened at once, a thread each: opening a saved
    copy keeps about one core busy (a fresh ``sample`` on two cores had them 0.1 s sooner, measured)."""
    options = session_options()
    root = onnx_dir / OPTIMIZED_DIR

    def open_one(graph: str) -> tuple[Hashable, Any] | None:
        source = onnx_path(onnx_dir, graph, precision)
        session = open_saved_session(source, options, root) if source.is_file() else None
        return None if session is None else (session_key(root, source, options), session)

    graphs = list(graphs)
    with ThreadPoolExecutor(len(graphs) or 1, thread_name_prefix="ccld-trt-onnxruntime") as pool:
        return {graph: handle for graph, handle in zip(graphs, pool.map(open_one, graphs), strict=True)
                if handle is not None}

"""Open a backend from model files: the one place that knows how each backend is constructed."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ccld_trt import stage_clock
from ccld_trt.backend_select import check_cpu_precision, check_precision, default_precision, resolve_backend
from ccld_trt.export.build_dir import DEFAULT_ENGINE_DIR
from ccld_trt.export.cloob_config import cloob_image_size, load_cloob_config
from ccld_trt.export.errors import UserError
from ccld_trt.export.graph_specs import BACKEND_GRAPHS, EAGER_GRAPHS
from ccld_trt.export.models import ModelFiles, Networks, checkpoint_autoencoder_scale, load_networks
from ccld_trt.limits import unet_shape_problem

if TYPE_CHECKING:  # torch's: the options and the model files are read without it (serve's page starts first)
    from ccld_trt.backends.base import Backend, Opened


@dataclass(frozen=True)
class BackendOptions:
    """How the networks run: which backend, on which device, at which precision, and where the backend keeps
    what it builds from the model files.

    precision: None picks the backend's default (backend_select.default_precision: torch fp32 on the CPU, fp16
    autocast on CUDA as the original; onnxruntime fp32 on the CPU, fp16 graphs on CUDA; openvino bf16 where the
    CPU has bf16 instructions, else fp32; tensorrt fp16 engines). cuda_graph: replay the U-Net/CFG evaluation
    from CUDA graphs (torch and tensorrt on CUDA). engine_dir: the TensorRT engines. onnx_dir: where the
    onnxruntime and openvino backends keep the exported graphs (None: build/onnx/<hash of the model paths>).
    compiled: torch.compile (Inductor) of the torch backend's networks (backends/compiled.py).
    """

    backend: str = "torch"
    device: str = "cpu"
    precision: str | None = None
    cuda_graph: bool = False
    engine_dir: Path = DEFAULT_ENGINE_DIR
    onnx_dir: Path | None = None
    trt_flavor: str = "auto"  # tensorrt: auto (the engines' own), tensorrt or rtx
    compiled: bool = False

    def resolved(self) -> BackendOptions:
        """These options with the backend and device names normalised, once the combination can run here;
        UserError saying why otherwise (checked before anything loads)."""
        backend, device = resolve_backend(self.backend, self.device)
        if self.cuda_graph and backend == "onnxruntime":
            raise UserError("CUDA-graph replay is for the torch and tensorrt backends")
        if self.cuda_graph and not device.startswith("cuda"):
            raise UserError("CUDA-graph replay needs a CUDA device")
        if self.compiled:
            from ccld_trt.backends.compiled import require_compile

            if backend != "torch":
                raise UserError(f"--compile is for the torch backend (torch.compile), not {backend}: its graphs "
                                "are compiled by the backend itself")
            require_compile(device)  # Inductor's C++ compiler (CPU) or Triton (CUDA)
        precision = check_precision(backend, self.precision or default_precision(backend, device))
        check_cpu_precision(backend, precision, device)  # this CPU has the instructions the precision needs
        return dataclasses.replace(self, backend=backend, device=device, precision=precision)

    def describe(self) -> str:
        """e.g. "torch fp32 on cpu", "torch fp32 compiled on cpu", "onnxruntime fp16 on cuda:0" (resolved options
        name their precision)."""
        precision = f" {self.precision}" if self.precision else ""
        compiled = " compiled" if self.compiled else ""
        return f"{self.backend}{precision}{compiled} on {self.device}"


@dataclass(frozen=True)
class ModelSource:
    """The model files, and the U-Net shape for a checkpoint that does not imply its own (None: read from the
    checkpoint's tensors)."""

    files: ModelFiles
    base_channels: int | None = None
    channel_multipliers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        # a U-Net wider than this machine can hold is refused here, before any file is read
        if problem := unet_shape_problem(self.base_channels, self.channel_multipliers):
            raise UserError(f"U-Net {problem}")

    def load(self) -> Networks:
        """The fp32 torch networks on the CPU (see export.models.load_networks)."""
        multipliers = list(self.channel_multipliers) if self.channel_multipliers is not None else None
        networks = load_networks(self.files, self.base_channels, multipliers)
        stage_clock.mark("model files read")  # bench --cold-start (no-op unless $CCLD_TRT_STAGES)
        return networks


@dataclass
class Session:
    """An open backend and what the front ends need to know about its model files. ``scale_source``: the U-Net
    checkpoint's stored autoencoder scale, or a function that reads it (only ``--autoencoder-scale checkpoint``
    asks, so a backend that runs exported graphs does not read the U-Net checkpoint to start)."""

    backend: Backend
    image_size: int                                 # CLOOB image encoder input side
    scale_source: float | Callable[[], float]
    demo: bool                                      # random demo weights?

    @functools.cached_property
    def checkpoint_autoencoder_scale(self) -> float:
        """The U-Net checkpoint's stored ``autoencoder_scale`` buffer (read on first use)."""
        source = self.scale_source
        return float(source() if callable(source) else source)


def prefetch_graphs(options: BackendOptions, models: ModelSource) -> Future[Opened] | None:
    """Start opening, in a thread, the graphs ``open_session`` will open for ``options``, from what earlier runs
    built (OpenVINO's cached blobs, ONNX Runtime's saved optimised copies; nothing is written). A fresh ``sample``
    process calls this first: the graphs open while it checks the job and imports torch (~1 s of one core), or
    while it gets ready to run a text job without torch (graph_sample, which takes the graphs through
    ``opened_graphs``). Hand the result to ``open_session``. None where there is nothing to gain: the torch and tensorrt
    backends, CUDA devices, OpenVINO's int8 (its graphs may still have to be made)."""
    if (options.backend.strip().lower() not in ("onnxruntime", "openvino")
            or options.device.strip().lower() != "cpu" or options.precision == "int8"):
        return None
    # numpy is imported here first: the thread's library (OpenVINO, ONNX Runtime) and torch both import it, and two
    # threads importing it at once can meet its circular imports half done ("ImportError: cannot import name
    # '__cpu_features__' from partially initialized module"; seen once in eight first runs)
    import numpy  # noqa: F401

    executor = ThreadPoolExecutor(1, thread_name_prefix="ccld-trt-prefetch")
    future = executor.submit(_open_built_graphs, options, models)
    executor.shutdown(wait=False)  # the thread ends with its one task
    return future


def _open_built_graphs(options: BackendOptions, models: ModelSource) -> Opened:
    options = options.resolved()
    onnx_dir = graphs_dir(options, models)
    if options.backend == "openvino":
        from ccld_trt.backends.openvino_compile import open_cached_graphs

        return open_cached_graphs(onnx_dir, EAGER_GRAPHS, options.precision or "fp32")
    from ccld_trt.backends.onnxruntime_sessions import open_saved_sessions

    return open_saved_sessions(onnx_dir, EAGER_GRAPHS, options.precision or "fp32")


def opened_graphs(future: Future[Opened] | None) -> Opened:
    """What ``prefetch_graphs`` opened, once it is done; {} when it opened nothing or failed (the backend then
    opens every graph itself, and says what is wrong in its own words)."""
    try:
        return future.result() if future is not None else {}
    except Exception:  # whatever it was is met again on the backend's own path, and reported there
        return {}


def open_session(options: BackendOptions, models: ModelSource, prefetched: Future[Opened] | None = None,
                 graphs: Sequence[str] = EAGER_GRAPHS) -> Session:
    """Open the backend ``options`` name (torch | onnxruntime | openvino | tensorrt) on the model files of
    ``models``; UserError when that cannot run here, said before anything loads. ``prefetched``: what
    ``prefetch_graphs`` is opening (waited for before anything here reads or writes the graphs' directory).
    ``graphs``: the backend graphs (graph_specs.BACKEND_GRAPHS) the onnxruntime and openvino backends export now
    where they are not current; the default, a text-only request's, leaves the CLOOB image encoder and the
    autoencoder's encoder to be exported when a request first runs them (a server that must not export on a
    request's path passes them all).

    Only the torch backend reads the torch networks up front. The backends that run exported graphs (onnxruntime,
    openvino) or engines (tensorrt) read none while their artefacts are current for these files (the ONNX
    manifest's checkpoint digests, cached by path, size and mtime, say so without reading the weights); the
    networks are loaded only when a graph must be exported, and then for all the graphs that must.
    """
    opened = opened_graphs(prefetched)
    options = options.resolved()
    files = models.files
    precision = options.precision or default_precision(options.backend, options.device)  # resolved: set
    if options.backend == "torch":
        from ccld_trt.backends.torch_backend import TorchBackend

        networks = models.load()
        backend: Backend = TorchBackend(networks, options.device, precision, options.cuda_graph, options.compiled)
        return Session(backend, networks.image_size, networks.checkpoint_autoencoder_scale, files.is_demo())
    files.check_present()
    if options.backend == "tensorrt":
        from ccld_trt.backends.tensorrt_backend import TensorRTBackend

        backend = TensorRTBackend(options.engine_dir, device=options.device, precision=options.precision or "fp16",
                                  cuda_graph=options.cuda_graph, flavor=options.trt_flavor, models=files)
    elif options.backend == "onnxruntime":
        from ccld_trt.backends.onnxruntime_backend import OnnxRuntimeBackend

        check_precision(options.backend, precision)
        export = functools.partial(_exported, options, models)
        backend = OnnxRuntimeBackend(export(graphs), options.device, precision, opened=opened, export=export)
    elif options.backend == "openvino":
        backend = _open_openvino(options, precision, models, opened, graphs)
    else:
        raise UserError(f"unknown backend {options.backend!r}")
    opened.clear()  # what the backend did not take (a graph changed since) is let go now, not at exit
    return Session(backend, cloob_image_size(load_cloob_config(files.cloob_config)),
                   functools.partial(checkpoint_autoencoder_scale, files.unet), files.is_demo())


def graphs_current(options: BackendOptions, models: ModelSource, graphs: Sequence[str] = EAGER_GRAPHS) -> bool:
    """Whether ``graphs`` are exported and up to date for ``models`` where the backend of (resolved) ``options``
    keeps them (the manifest and its digest cache say so without reading the weights, or importing torch)."""
    from ccld_trt.export.onnx_manifest import graphs_current as current

    return current(models.files, graphs_dir(options, models), graphs, fp16=options.precision == "fp16")


def graphs_dir(options: BackendOptions, models: ModelSource) -> Path:
    """``options.onnx_dir``, else the default one per set of model files."""
    from ccld_trt.export.onnx_files import default_onnx_dir

    return options.onnx_dir or default_onnx_dir(models.files)


def _exported(options: BackendOptions, models: ModelSource, graphs: Sequence[str]) -> Path:
    """The directory of the backend graphs of ``models`` (``graphs_dir``), with ``graphs`` exported there first
    unless the manifest shows them up to date (``graphs_current``; fp16 ones too for fp16 options); the torch
    networks are read only for an export."""
    onnx_dir = graphs_dir(options, models)
    if not graphs_current(options, models, graphs):
        from ccld_trt.export.onnx_export import export_all

        export_all(models.files, onnx_dir, graphs, fp16=options.precision == "fp16", networks=models.load())
    else:
        stage_clock.mark("model files read")  # the manifest and the digest cache, not the weights
    return onnx_dir


def _open_openvino(options: BackendOptions, precision: str, models: ModelSource, opened: Opened,
                   graphs: Sequence[str]) -> Backend:
    """The OpenVINO backend over the fp32 graphs (``graphs`` exported unless up to date, the others when first
    run) and, for int8, the quantised ones (made unless up to date, from every fp32 graph: calibration runs the
    sampler on the fp32 graphs, minutes on a small CPU)."""
    from ccld_trt.backends.openvino_backend import OpenVinoBackend
    from ccld_trt.pipeline import DEFAULT_AUTOENCODER_SCALE

    export = functools.partial(_exported, options, models)  # openvino's precisions are never fp16
    onnx_dir = export(BACKEND_GRAPHS if precision == "int8" else graphs)
    if precision == "int8":
        from ccld_trt.int8 import ensure_int8

        # the decoder's calibration (if its scheme needs one) sees latents at the published scale
        ensure_int8(onnx_dir, DEFAULT_AUTOENCODER_SCALE)
    return OpenVinoBackend(onnx_dir, precision, opened=opened, export=export)

"""Open a backend by name from model files: the one place that knows how each backend is constructed."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ccld_trt.backend_select import resolve_backend
from ccld_trt.backends.base import Backend
from ccld_trt.export.cloob import cloob_image_size, load_cloob_config
from ccld_trt.export.errors import UserError
from ccld_trt.export.models import ModelFiles, checkpoint_autoencoder_scale, load_networks


@dataclass
class Session:
    backend: Backend
    image_size: int                       # CLOOB image encoder input side
    checkpoint_autoencoder_scale: float   # the U-Net checkpoint's stored buffer
    demo: bool                            # random demo weights?


DEFAULT_ENGINE_DIR = Path("build/engines")


def open_backend(name: str, device: str, files: ModelFiles, precision: str | None = None, *,
                 cuda_graph: bool = False, engine_dir: Path | None = None, onnx_dir: Path | None = None,
                 base_channels: int | None = None,
                 channel_multipliers: list[int] | None = None) -> Session:
    """Load the networks and wrap them in the named backend (torch | onnxruntime | tensorrt).

    precision: None picks the backend's default (torch: fp32 on the CPU, fp16 autocast on CUDA as the original;
    onnxruntime: fp32 on the CPU, fp16 graphs on CUDA; tensorrt: fp16 engines). cuda_graph: replay the U-Net/CFG
    evaluation from CUDA graphs (torch and tensorrt on CUDA). engine_dir: the TensorRT engines. onnx_dir: where
    the onnxruntime backend keeps the exported graphs (default: build/onnx/<hash of the model paths>).
    """
    name, device = resolve_backend(name, device)  # says why a combination cannot run before anything loads
    if cuda_graph and name == "onnxruntime":
        raise UserError("--cuda-graph is for the torch and tensorrt backends")
    if name == "tensorrt":
        from ccld_trt.backends.tensorrt_backend import TensorRTBackend

        trt_backend = TensorRTBackend(engine_dir or DEFAULT_ENGINE_DIR, device=device, precision=precision or "fp16",
                                      cuda_graph=cuda_graph)
        return Session(trt_backend, cloob_image_size(load_cloob_config(files.cloob_config)),
                       checkpoint_autoencoder_scale(files.unet), files.is_demo())
    networks = load_networks(files, base_channels, channel_multipliers)
    precision = precision or ("fp16" if device.startswith("cuda") else "fp32")
    if name == "torch":
        from ccld_trt.backends.torch_backend import TorchBackend

        backend: Backend = TorchBackend(networks, device, precision, cuda_graph)
    elif name == "onnxruntime":
        from ccld_trt.backends.onnxruntime_backend import OnnxRuntimeBackend, check_precision
        from ccld_trt.export.graph_specs import BACKEND_GRAPHS
        from ccld_trt.export.onnx_export import default_onnx_dir, export_all

        check_precision(precision)
        # Exported once per set of model files; later runs find them up to date in the manifest.
        onnx_dir = onnx_dir or default_onnx_dir(files)
        export_all(files, onnx_dir, BACKEND_GRAPHS, fp16=precision == "fp16", networks=networks)
        backend = OnnxRuntimeBackend(onnx_dir, device, precision)
    else:
        raise UserError(f"unknown backend {name!r}")
    return Session(backend, networks.image_size, networks.checkpoint_autoencoder_scale, files.is_demo())

"""Open a backend by name from model files: the one place that knows how each backend is constructed."""

from __future__ import annotations

from dataclasses import dataclass

from ccld_trt.backends.base import Backend
from ccld_trt.errors import UserError
from ccld_trt.models import ModelFiles, load_networks


@dataclass
class Session:
    backend: Backend
    image_size: int                       # CLOOB image encoder input side
    checkpoint_autoencoder_scale: float   # the U-Net checkpoint's stored buffer
    demo: bool                            # random demo weights?


def open_backend(name: str, device: str, files: ModelFiles, precision: str | None = None,
                 base_channels: int | None = None, channel_multipliers: list[int] | None = None) -> Session:
    """Load the networks and wrap them in the named backend (torch | onnxruntime | tensorrt)."""
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA GPU is available to torch here (see `ccld-trt doctor`)")
    networks = load_networks(files, base_channels, channel_multipliers)
    if name == "torch":
        from ccld_trt.backends.torch_backend import TorchBackend

        backend: Backend = TorchBackend(networks, device, precision or ("fp16" if device == "cuda" else "fp32"))
    else:
        raise UserError(f"unknown backend {name!r}")
    return Session(backend, networks.image_size, networks.checkpoint_autoencoder_scale, files.is_demo())

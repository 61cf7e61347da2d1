"""The reference backend: the PyTorch networks themselves, eager, on the CPU or a CUDA device."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

from ccld_trt.backend_select import check_cpu_precision, check_precision
from ccld_trt.backends.compiled import CompiledSet, compile_calls
from ccld_trt.backends.cuda_graph import GraphedCall
from ccld_trt.export.errors import UserError
from ccld_trt.export.guided_unet import GuidedUNet
from ccld_trt.export.models import Networks
from ccld_trt.heap import reuse_freed_memory

# The U-Net's autocast dtype per precision (backend_select.PRECISIONS["torch"]); fp32 runs without autocast.
_AUTOCAST_DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


@contextlib.contextmanager
def ieee_fp32() -> Iterator[None]:
    """cuDNN convolutions and cuBLAS matmuls in IEEE fp32 inside, not TF32.

    torch allows TF32 for convolutions by default; on an H200 that moved the golden cases' latents by up to
    1.5e-3 (outside fp32's 1e-3), against 2e-6 with it off. The flags are process-wide, so they are set around
    each call and restored; a device runs one job at a time.
    """
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


class TorchBackend:
    """Eager torch. ``precision`` fp16/bf16 runs the U-Net under autocast (the original uses fp16 autocast on
    CUDA); the encoders and the decoder stay fp32 as in the original. ``cuda_graph`` (CUDA only) replays each
    U-Net/CFG evaluation from a CUDA graph captured per input shape: the strongest torch baseline on a GPU.
    fp32 on CUDA is IEEE fp32 (TF32 off), so it meets the goldens' fp32 tolerances as on the CPU. ``compiled``
    runs every network call through torch.compile (Inductor), static shapes per call (backends/compiled.py)."""

    name = "torch"

    def __init__(self, networks: Networks, device: str = "cpu", precision: str = "fp32",
                 cuda_graph: bool = False, compiled: bool = False) -> None:
        self.device = torch.device(device)
        if cuda_graph and self.device.type != "cuda":
            raise UserError("CUDA-graph replay needs a CUDA device")
        if self.device.type == "cpu":
            reuse_freed_memory()  # the activations' blocks reused, not faulted in again at every call (heap)
        # refused, not warned: emulated bf16 runs the U-Net many times slower than fp32 (a minute per 2048^2
        # matmul on an AVX2-only CPU), which a warning scrolled past would not explain
        self.precision = check_cpu_precision(self.name, check_precision(self.name, precision), device)
        self._autocast_dtype = _AUTOCAST_DTYPES[precision]
        exact = precision == "fp32" and self.device.type == "cuda"
        self._math: Callable[[], contextlib.AbstractContextManager[None]] = (
            ieee_fp32 if exact else contextlib.nullcontext)
        self._guided = GuidedUNet(networks.unet).to(self.device)
        self._guided_call: Callable[..., torch.Tensor] = self._guided_autocast
        self._rows_call: Callable[..., torch.Tensor] = self._rows_autocast
        self._decoder = networks.decoder.to(self.device)
        self._encoder = networks.encoder.to(self.device)
        self._text = networks.text_encoder.to(self.device)
        self._image = networks.image_encoder.to(self.device)
        self.compilation: CompiledSet | None = None  # torch.compile of every network call (backends/compiled.py)
        if compiled:
            self.compilation = compile_calls(self, device)
        if cuda_graph:  # replays the compiled U-Net too: Triton kernels capture like eager ones
            self._guided_call = GraphedCall(self._guided_call)

    def _guided_autocast(self, x: torch.Tensor, t: torch.Tensor, conds: torch.Tensor,
                         weights: torch.Tensor) -> torch.Tensor:
        if self._autocast_dtype is None:
            return self._guided(x, t, conds, weights)
        # no autocast weight cache: cached casts made during CUDA-graph capture would be freed behind the graph
        with torch.autocast(self.device.type, dtype=self._autocast_dtype, cache_enabled=False):
            return self._guided(x, t, conds, weights).float()

    @torch.inference_mode()
    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        with self._math():
            return self._text(tokens.to(self.device)).float()

    @torch.inference_mode()
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        with self._math():
            return self._image(pixels.to(self.device)).float()

    @torch.inference_mode()
    def unet(self, x: torch.Tensor, t: torch.Tensor, conds: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        with self._math():
            return self._guided_call(x, t, conds, weights)

    @torch.inference_mode()
    def unet_rows(self, x: torch.Tensor, t: torch.Tensor, embed: torch.Tensor) -> torch.Tensor:
        """The plain U-Net, one condition per row: x [B, 4, h, w], t [B], embed [B, 512] -> v float32 [B, 4, h, w]
        (at this backend's precision), for callers that weigh CFG rows themselves (the cluster)."""
        with self._math():
            return self._rows_call(x, t, embed)

    def _rows_autocast(self, x: torch.Tensor, t: torch.Tensor, embed: torch.Tensor) -> torch.Tensor:
        if self._autocast_dtype is None:
            return self._guided.unet(x, t, embed)
        with torch.autocast(self.device.type, dtype=self._autocast_dtype, cache_enabled=False):
            return self._guided.unet(x, t, embed).float()

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        with self._math():
            return self._decoder(latents.to(self.device)).float()

    @torch.inference_mode()
    def encode_latents(self, images: torch.Tensor) -> torch.Tensor:
        with self._math():
            return self._encoder(images.to(self.device)).float()

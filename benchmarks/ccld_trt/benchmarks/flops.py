"""FLOPs and memory traffic of the networks, counted by running them once on the ``meta`` device.

The meta device computes shapes only, so counting the full-size decoder at batch 16 costs milliseconds and no
memory, and gives the exact count for the exact shapes the benchmark times. FLOPs are those of
``torch.utils.flop_counter`` (matmuls, convolutions, attention: 2 per multiply-add); elementwise work, norms and
softmax are not counted, so they are a lower bound that the heavy layers dominate.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from ccld_trt.export.guided_unet import GuidedUNet
from ccld_trt.export.models import Networks
from ccld_trt.export.onnx_export import traced_module
from ccld_trt.pipeline import LATENT_CHANNELS

TEXT_CONTEXT = 77  # CLIP token context: every text-encoder call is [N, 77]
EMBED_DIM = 512


@dataclass(frozen=True)
class Cost:
    """What one call of a network costs.

    flops: floating-point operations (2 per multiply-add, matmul/conv/attention only).
    weight_bytes: size of the parameters and buffers the call reads, at float32.
    activation_bytes: bytes written by all ops (views excluded) when run unfused at float32: an estimate of
    eager activation traffic; fused engines write less.
    """

    flops: int
    weight_bytes: int
    activation_bytes: int

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.flops + other.flops, self.weight_bytes + other.weight_bytes,
                    self.activation_bytes + other.activation_bytes)

    def times(self, k: int) -> Cost:
        """The cost of k calls (each call reads the weights again)."""
        return Cost(self.flops * k, self.weight_bytes * k, self.activation_bytes * k)


def _tensors(value: Any) -> Iterable[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, list | tuple):
        for v in value:
            yield from _tensors(v)


class _BytesWritten(TorchDispatchMode):
    """Sums the bytes of every op's outputs (views alias their input, so they write nothing)."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            self.total += sum(t.numel() * t.element_size() for t in _tensors(out))
        return out


def count_cost(module: nn.Module, *inputs: torch.Tensor) -> Cost:
    """Cost of ``module(*inputs)``; inputs may be on any device (only their shapes and dtypes matter).

    The module's weights are swapped for meta tensors for the call, without copying or changing the module.
    """
    state = {name: torch.empty_like(t, device="meta")
             for name, t in [*module.named_parameters(), *module.named_buffers()]}
    meta_inputs = tuple(torch.empty_like(x, device="meta") for x in inputs)
    flop_counter = FlopCounterMode(display=False)
    bytes_written = _BytesWritten()
    with flop_counter, bytes_written:
        torch.func.functional_call(module, state, meta_inputs)
    # float32 weights, whatever the module holds, so the numbers compare across checkpoints and backends
    weight_bytes = sum(t.numel() for t in state.values()) * 4
    return Cost(flop_counter.get_total_flops(), weight_bytes, bytes_written.total)


def count_flops(module: nn.Module, *inputs: torch.Tensor) -> int:
    """FLOPs of ``module(*inputs)`` (see ``count_cost``)."""
    return count_cost(module, *inputs).flops


def stage_costs(networks: Networks, batches: Sequence[int], latent_size: tuple[int, int] = (32, 32),
                n_conds: int = 2, exported: bool = False) -> dict[tuple[str, int], Cost]:
    """Cost of each network call the benchmark times, keyed by (stage, batch).

    text-encoder and image-encoder at batch 1 (one prompt); unet (one CFG evaluation: x [B, 4, h, w] with
    ``n_conds`` conditions, so B * n_conds U-Net rows) and decoder (latents [B, 4, h, w]) at each batch.
    ``exported``: the work of the exported graphs (``onnx_export.traced_module``: the decoder with its upsampling
    convolutions in phase form), which the ONNX Runtime and TensorRT backends run, instead of the torch modules'.
    """
    h, w = latent_size
    s = networks.image_size
    costs = {
        ("text-encoder", 1): count_cost(networks.text_encoder, torch.zeros(1, TEXT_CONTEXT, dtype=torch.long)),
        ("image-encoder", 1): count_cost(networks.image_encoder, torch.zeros(1, 3, s, s)),
    }
    guided = GuidedUNet(networks.unet)
    decoder = traced_module("decoder", networks.decoder) if exported else networks.decoder
    for b in batches:
        costs["unet", b] = count_cost(guided, torch.zeros(b, LATENT_CHANNELS, h, w), torch.zeros(b),
                                      torch.zeros(n_conds, EMBED_DIM), torch.zeros(n_conds))
        costs["decoder", b] = count_cost(decoder, torch.zeros(b, LATENT_CHANNELS, h, w))
    return costs


def end_to_end_cost(costs: dict[tuple[str, int], Cost], evaluations: int, n: int) -> Cost:
    """One text prompt encoded, ``evaluations`` U-Net/CFG calls at batch n, one decode of n images."""
    return costs["text-encoder", 1] + costs["unet", n].times(evaluations) + costs["decoder", n]

"""Several requests' CFG evaluations as one plain U-Net call, and each request's guided velocity out of it.

A request's evaluation is v = sum_c w_c * UNet(x, t, cond_c) (``Backend.unet``). Its rows (x_i, t_i, cond_c),
condition-major as ``GuidedUNet`` orders them, can sit next to other requests' rows in one call of the plain
U-Net (``unet_rows(x, t, embed)``, one condition per row), after which each request sums its own rows with its
own weights. A single evaluation keeps the backend's fused path (``Backend.unet``), exactly as a solo run.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from ccld_trt.backends.base import Backend


@dataclass(frozen=True)
class UNetCall:
    """One request's CFG evaluation: x [N, 4, h, w], t [N], conds [C, 512], weights [C] (on the device)."""

    x: torch.Tensor
    t: torch.Tensor
    conds: torch.Tensor
    weights: torch.Tensor

    @property
    def rows(self) -> int:
        """Rows of the plain U-Net this evaluation needs: N images x C conditions."""
        return int(self.x.shape[0]) * int(self.conds.shape[0])


@runtime_checkable
class RowBackend(Protocol):
    """A backend that can also run the plain U-Net with one condition per row (torch, onnxruntime, openvino,
    tensorrt)."""

    def unet_rows(self, x: torch.Tensor, t: torch.Tensor, embed: torch.Tensor) -> torch.Tensor:
        """x [B, 4, h, w], t [B], embed [B, 512] -> v [B, 4, h, w]."""
        ...


def cfg_rows(call: UNetCall) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """An evaluation's rows for the plain U-Net: x [C*N, 4, h, w], t [C*N], embed [C*N, 512], condition-major
    (row c*N + i is image i with condition c), as GuidedUNet lays them out."""
    n, c = call.x.shape[0], call.conds.shape[0]
    return (call.x.repeat(c, 1, 1, 1), call.t.repeat(c),
            call.conds[:, None].expand(-1, n, -1).flatten(0, 1))


def guided_sum(v_rows: torch.Tensor, call: UNetCall) -> torch.Tensor:
    """The plain U-Net's outputs of ``cfg_rows(call)`` [C*N, 4, h, w] -> v = sum_c w_c * v_c [N, 4, h, w]."""
    c = call.conds.shape[0]
    vs = v_rows.reshape(c, call.x.shape[0], *call.x.shape[1:])
    return (vs * call.weights.reshape(-1, 1, 1, 1, 1)).sum(0)


def run_merged(backend: Backend, calls: Sequence[UNetCall]) -> list[torch.Tensor]:
    """Each call's guided v, all of them in one plain U-Net call when there are several and the backend has
    ``unet_rows``; one call alone (or a backend without it) goes through ``backend.unet``."""
    if len(calls) == 1 or not isinstance(backend, RowBackend):
        return [backend.unet(c.x, c.t, c.conds, c.weights) for c in calls]
    parts = [cfg_rows(c) for c in calls]
    v = backend.unet_rows(*(torch.cat(tensors) for tensors in zip(*parts, strict=True)))
    sizes = [c.rows for c in calls]
    return [guided_sum(rows, call) for rows, call in zip(v.split(sizes), calls, strict=True)]


class SerialBackend:
    """A Backend whose calls run one at a time across threads (the backends keep shared buffers per call):
    requests condition and decode on their own threads while the batcher runs U-Net calls on its own."""

    def __init__(self, backend: Backend) -> None:
        self.inner = backend
        self.name = backend.name
        self.device = backend.device
        self.lock = threading.Lock()

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        with self.lock:
            return self.inner.encode_text(tokens)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        with self.lock:
            return self.inner.encode_image(pixels)

    def unet(self, x: torch.Tensor, t: torch.Tensor, conds: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        with self.lock:
            return self.inner.unet(x, t, conds, weights)

    def merged(self, calls: Sequence[UNetCall]) -> list[torch.Tensor]:
        """run_merged on the wrapped backend, under the lock."""
        with self.lock:
            return run_merged(self.inner, calls)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        with self.lock:
            return self.inner.decode(latents)

    def encode_latents(self, images: torch.Tensor) -> torch.Tensor:
        with self.lock:
            return self.inner.encode_latents(images)

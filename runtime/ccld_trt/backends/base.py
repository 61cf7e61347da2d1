"""The backend interface: four networks with fixed I/O contracts, behind which torch, ONNX Runtime and
TensorRT differ. Samplers and the pipeline only ever see this interface.

All tensors are torch tensors on ``backend.device`` (float32 unless noted), so the sampler arithmetic runs
where the backend's buffers live; a backend converts at its own boundary if its library needs to.
"""

from __future__ import annotations

from typing import Protocol

import torch


class Backend(Protocol):
    name: str
    device: torch.device

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens int64 [N, 77] -> CLOOB text embeddings float32 [N, 512] (not normalised, as the original)."""
        ...

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels float32 [N, 3, S, S] in [0, 1] (S = the CLOOB image size) -> L2-normalised embeddings [N, 512].

        The CLOOB mean/std normalisation happens inside.
        """
        ...

    def unet(self, x: torch.Tensor, t: torch.Tensor, conds: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Classifier-free-guided velocity: x [N, 4, h, w], t [N], conds [C, 512], weights [C] -> v [N, 4, h, w].

        v = sum_c weights[c] * UNet(x, t, conds[c]), evaluated as one batched call of N*C rows
        (rows ordered condition-major, as the original's ``repeat`` / ``repeat_interleave``).
        """
        ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents float32 [N, 4, h, w], already multiplied by the autoencoder scale -> images [N, 3, 8h, 8w]
        in about [-1, 1]."""
        ...

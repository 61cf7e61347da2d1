"""Classifier-free guidance folded into one module, so a backend makes one U-Net call per evaluation.

The same module is the torch backend's U-Net and the source of the ``unet_cfg`` ONNX graph.
"""

from __future__ import annotations

import torch
from torch import nn


class GuidedUNet(nn.Module):
    """v = sum_c weights[c] * unet(x, t, conds[c]), as the original ``cfg_model_fn``.

    Rows of the batched call are condition-major: row c*N + i pairs image i with condition c.
    """

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, t: torch.Tensor, conds: torch.Tensor,
                weights: torch.Tensor) -> torch.Tensor:
        """x [N, 4, h, w], t [N], conds [C, 512], weights [C] -> v [N, 4, h, w] (float32)."""
        n, c = x.shape[0], conds.shape[0]
        x_in = x.repeat(c, 1, 1, 1)
        t_in = t.repeat(c)
        # conds.repeat_interleave(n, 0), written as expand + flatten: plain Expand/Reshape in ONNX (not OneHot)
        embed_in = conds[:, None].expand(-1, n, -1).flatten(0, 1)
        vs = self.unet(x_in, t_in, embed_in).reshape(c, n, *x.shape[1:])
        return (vs * weights.reshape(-1, 1, 1, 1, 1)).sum(0)

"""CUDA-graph replay of the guided U-Net (needs a GPU) and its refusal on the CPU."""

from __future__ import annotations

import pytest
import torch

from ccld_trt.backends.cuda_graph import GraphedCall
from ccld_trt.backends.torch_backend import TorchBackend
from ccld_trt.export.errors import UserError


def test_cuda_graph_needs_cuda():
    with pytest.raises(UserError, match="needs a CUDA device"):
        TorchBackend(None, "cpu", "fp32", cuda_graph=True)  # type: ignore[arg-type]  # refused before use


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_graphed_call_replays_per_shape_and_returns_fresh_tensors():
    lin = torch.nn.Linear(8, 8).cuda()
    graphed = GraphedCall(lambda x: lin(x).relu())
    for rows in (2, 3, 2):
        x = torch.randn(rows, 8, device="cuda")
        out = graphed(x)
        torch.testing.assert_close(out, lin(x).relu())
    first = graphed(torch.ones(2, 8, device="cuda"))
    graphed(torch.zeros(2, 8, device="cuda"))
    torch.testing.assert_close(first, lin(torch.ones(2, 8, device="cuda")).relu())  # not overwritten
    assert len(graphed._graphs) == 2

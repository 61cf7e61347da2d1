"""CUDA-graph replay of the guided U-Net (needs a GPU) and its refusal on the CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ccld_trt.backends.cuda_graph import GraphedCall
from ccld_trt.backends.torch_backend import TorchBackend
from ccld_trt.export.errors import UserError
from ccld_trt.export.models import ModelFiles, load_networks

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_cuda_graph_needs_cuda():
    with pytest.raises(UserError, match="needs a CUDA device"):
        TorchBackend(None, "cpu", "fp32", cuda_graph=True)  # type: ignore[arg-type]  # refused before use


@pytest.mark.gpu
@needs_cuda
def test_graphed_call_replays_per_shape_and_returns_fresh_tensors():
    lin = torch.nn.Linear(8, 8).cuda()
    graphed = GraphedCall(lambda x: lin(x).relu())
    for rows in (2, 3, 2):
        x = torch.randn(rows, 8, device="cuda")
        torch.testing.assert_close(graphed(x), lin(x).relu())
    first = graphed(torch.ones(2, 8, device="cuda"))
    graphed(torch.zeros(2, 8, device="cuda"))
    torch.testing.assert_close(first, lin(torch.ones(2, 8, device="cuda")).relu())  # not overwritten
    assert graphed.captures == 2


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize(("precision", "tol"), [("fp32", 1e-4), ("fp16", 1e-2)])
def test_cuda_graph_unet_returns_to_an_earlier_shape(precision: str, tol: float, seed3_dir: Path,
                                                      monkeypatch: pytest.MonkeyPatch):
    """Batch 2 -> 3 -> 2 -> 3 through the backend's graphed CFG U-Net equals eager execution of the same inputs.

    Every call has fresh inputs, so a graph replaying stale static inputs, or an output buffer clobbered by
    another shape's graph in the shared memory pool, gives values off by O(1), far outside the tolerance (which
    only allows cuDNN choosing other kernels under capture).
    """
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # fp32 means fp32 on both sides
    networks = load_networks(ModelFiles.resolve(seed3_dir))
    eager = TorchBackend(networks, "cuda", precision)
    graphed = TorchBackend(networks, "cuda", precision, cuda_graph=True)  # the same modules, moved to CUDA once
    gen = torch.Generator().manual_seed(0)
    conds = torch.randn(3, 512, generator=gen).cuda()
    weights = torch.tensor([-1.5, 2.0, 0.5]).cuda()
    results = []
    for batch in (2, 3, 2, 3):
        x = torch.randn(batch, 4, 32, 32, generator=gen).cuda()
        t = torch.rand(batch, generator=gen).cuda()
        results.append((graphed.unet(x, t, conds, weights), eager.unet(x, t, conds, weights)))
    for got, want in results:  # checked after all calls: earlier results must not change with later replays
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    assert results[0][0].shape == (2, 4, 32, 32) and results[1][0].shape == (3, 4, 32, 32)
    assert graphed._guided_call.captures == 2  # type: ignore[union-attr]  # one graph per shape, reused

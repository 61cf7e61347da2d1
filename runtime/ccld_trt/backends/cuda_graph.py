"""CUDA-graph capture and replay of a function of fixed-shape tensors (one graph per input-shape set)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from torch.cuda import _POOL_HANDLE  # what torch.cuda.graph_pool_handle returns

Key = tuple[tuple[tuple[int, ...], torch.dtype], ...]


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    static_in: list[torch.Tensor]  # allocated before capture, outside the graph pool: only this graph uses them
    static_out: torch.Tensor       # allocated in the graph pool during capture, kept alive by this reference


class GraphedCall:
    """Replays ``fn(*inputs) -> tensor`` from a CUDA graph captured on first use of each input shape/dtype set.

    Owns the static input/output buffers of every captured shape. Each call copies the inputs into that shape's
    static buffers, replays, and returns a copy of the output, so a caller may keep results across calls.
    Replaying removes the CPU cost of launching the U-Net's few hundred small kernels one by one, which
    dominates at small batch on a fast GPU.

    All graphs share one memory pool, so a new shape reuses the intermediates' memory of the shapes before it
    instead of reserving its own. That is safe here because the graphs run one at a time on one stream and
    nothing but the static buffers outlives a call: a graph's intermediates may overwrite another graph's
    intermediates or its static output, but each static output is copied out before the next replay, and the
    static inputs are not in the pool at all.
    """

    def __init__(self, fn: Callable[..., torch.Tensor]) -> None:
        self.fn = fn
        self._graphs: dict[Key, _Captured] = {}
        self._pool: _POOL_HANDLE | None = None
        self._stream: torch.cuda.Stream | None = None

    @property
    def captures(self) -> int:
        """How many graphs (input shape/dtype sets) have been captured."""
        return len(self._graphs)

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        key = tuple((tuple(t.shape), t.dtype) for t in inputs)
        captured = self._graphs.get(key)
        if captured is None:
            captured = self._graphs[key] = self._capture(inputs)
        for buffer, t in zip(captured.static_in, inputs, strict=True):
            buffer.copy_(t)
        captured.graph.replay()
        return captured.static_out.clone()

    def _capture(self, inputs: tuple[torch.Tensor, ...]) -> _Captured:
        if self._stream is None:
            self._stream = torch.cuda.Stream(inputs[0].device)
            self._pool = torch.cuda.graph_pool_handle()
        side = self._stream
        static_in = [t.clone() for t in inputs]  # on the caller's stream, before (outside) the capture
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the graph: cuDNN/cuBLAS pick algorithms and workspaces
            for _ in range(2):
                self.fn(*static_in)
        graph = torch.cuda.CUDAGraph()
        # Captured on the warm-up stream, so the capture sees the workspaces and algorithms warmed up there.
        with torch.cuda.graph(graph, pool=self._pool, stream=side):
            static_out = self.fn(*static_in)
        torch.cuda.current_stream().wait_stream(side)
        return _Captured(graph, static_in, static_out)

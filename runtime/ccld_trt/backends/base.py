"""The backend interface: five networks with fixed I/O contracts, behind which torch, ONNX Runtime and
TensorRT differ. Samplers and the pipeline only ever see this interface.

All tensors are torch tensors on ``backend.device`` (float32 unless noted), so the sampler arithmetic runs
where the backend's buffers live; a backend converts at its own boundary if its library needs to.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

from ccld_trt.export.graph_specs import GRAPHS


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

    def encode_latents(self, images: torch.Tensor) -> torch.Tensor:
        """images float32 [N, 3, 8h, 8w] in [-1, 1] -> the autoencoder posterior's mean float32 [N, 4, h, w]
        (deterministic), before the autoencoder scale (image-to-image's init)."""
        ...


# {graph: (key, handle)}: graphs opened ahead of the backend (runner.prefetch_graphs, in its thread), each with what
# it was opened from (a graph file version and settings)
Opened = dict[str, tuple[Hashable, Any]]
# Makes the named graphs current in a graph backend's directory (exported from the model files unless up to date):
# what runner.open_session gives the backend for the graphs it did not export up front
Export = Callable[[Sequence[str]], object]


def graph_path(files: dict[str, Path], graph: str, export: Export | None, locate: Callable[[], Path]) -> Path:
    """``graph``'s file from ``files`` (a graph backend's, by graph); one not there yet (an on-demand graph, first
    run now) is exported first where it is not current (``export``; None: it must be there), then ``locate``d and
    added."""
    if graph not in files:
        if export is not None:
            export([graph])
        files[graph] = locate()
    return files[graph]


def take_opened(opened: Opened | None, graph: str, key: Hashable) -> Any | None:
    """``graph``'s handle (a session; a compiled model and its request) from ``opened``, removed from it, if it was
    opened from what ``key`` names (the same graph file version and settings as the backend would open now); else
    None, and the backend opens it."""
    key_and_handle = opened.pop(graph, None) if opened else None
    return key_and_handle[1] if key_and_handle is not None and key_and_handle[0] == key else None


class GraphBackend:
    """The Backend interface over the exported graphs (unet_cfg, decoder, text_encoder, image_encoder, encoder), for the
    backends that run them (ONNX Runtime, OpenVINO, TensorRT). A subclass runs one graph call (``_run``) and may cap the
    ``batch`` and ``conds`` dimensions of a call (``limits``, e.g. an engine's profile): larger calls are split,
    their batches concatenated and their CFG conditions summed (v is a weighted sum over conditions)."""

    name: str
    device: torch.device

    def _run(self, graph: str, feed: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """One call of ``graph`` on ``feed`` ({input name: tensor}) -> a new tensor holding its one output."""
        raise NotImplementedError

    def limits(self, graph: str) -> dict[str, int]:
        """The largest ``batch`` / ``conds`` one call of ``graph`` takes ({}: no limit)."""
        return {}

    def _call(self, graph: str, feed: Mapping[str, torch.Tensor]) -> torch.Tensor:
        limits = self.limits(graph)
        for dim in ("conds", "batch"):
            names = [t.name for t in GRAPHS[graph].inputs if t.shape[:1] == (dim,)]
            size = int(feed[names[0]].shape[0]) if names else 0
            step = limits.get(dim, size)
            if size > step:
                parts = [self._call(graph, {k: v[i:i + step] if k in names else v for k, v in feed.items()})
                         for i in range(0, size, step)]
                return functools.reduce(torch.add, parts) if dim == "conds" else torch.cat(parts)
        return self._run(graph, feed)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens int64 [N, 77] -> CLOOB text embeddings float32 [N, 512]."""
        return self._call("text_encoder", {"tokens": tokens})

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels float32 [N, 3, S, S] in [0, 1] -> L2-normalised embeddings float32 [N, 512]."""
        return self._call("image_encoder", {"pixels": pixels})

    def unet(self, x: torch.Tensor, t: torch.Tensor, conds: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [N, 4, h, w], t [N], conds [C, 512], weights [C] -> v [N, 4, h, w]: unet_cfg."""
        return self._call("unet_cfg", {"x": x, "t": t, "conds": conds, "weights": weights})

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents float32 [N, 4, h, w] (already scaled) -> images float32 [N, 3, 8h, 8w] in about [-1, 1]."""
        return self._call("decoder", {"latents": latents})

    def encode_latents(self, images: torch.Tensor) -> torch.Tensor:
        """images float32 [N, 3, 8h, 8w] in [-1, 1] -> posterior mean float32 [N, 4, h, w] (unscaled): encoder."""
        return self._call("encoder", {"images": images})

"""Dummy inputs of the exported graphs, for tracing and for checking them: random, seeded, and with values as the
pipeline feeds them, so that a check exercises the paths real inputs take."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from ccld_trt.export.graph_specs import EOT_TOKEN, GRAPHS, SOT_TOKEN
from ccld_trt.export.shapes import resolve_dim

# Small sizes keep tracing fast; the latent sides must be multiples of 8 (three 2x downsamplings in the U-Net).
TRACE_DIMS = {"batch": 2, "conds": 2, "height": 8, "width": 16}
CHECK_DIMS = {"batch": 3, "conds": 3, "height": 16, "width": 8}


def random_inputs(graph: str, dims: Mapping[str, int], image_size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Inputs of ``graph`` in graph_specs order, sized by ``dims`` (batch, conds, height, width) and
    ``image_size``, with values as the pipeline feeds them: unit-normal latents, t in [0, 1), embeddings whose
    first row is the all-zero unconditional one, CFG weights [1 - sum(w), w...], CLIP token rows
    (SOT, ids, EOT, zero padding), pixels in [0, 1), images in [-1, 1)."""
    gen = torch.Generator().manual_seed(seed)
    sizes = {**dims, "image_size": image_size}
    return {t.name: _INPUT_VALUES[t.name]([resolve_dim(d, sizes) for d in t.shape], gen)
            for t in GRAPHS[graph].inputs}


def check_feeds(graph: str, image_size: int) -> list[dict[str, torch.Tensor]]:
    """The inputs an exported graph is checked on: at the trace shape and at another one (seeds 0 and 1)."""
    return [random_inputs(graph, dims, image_size, seed) for seed, dims in enumerate((TRACE_DIMS, CHECK_DIMS))]


def _embeddings(shape: list[int], gen: torch.Generator) -> torch.Tensor:
    embed = torch.randn(shape, generator=gen)
    embed[0] = 0
    return embed


def _cfg_weights(shape: list[int], gen: torch.Generator) -> torch.Tensor:
    w = 1 + 3 * torch.rand([shape[0] - 1], generator=gen)
    return torch.cat([1 - w.sum(0, keepdim=True), w])


def _tokens(shape: list[int], gen: torch.Generator) -> torch.Tensor:
    n, length = shape
    tokens = torch.zeros(shape, dtype=torch.int64)
    for i, eot in enumerate(torch.randint(1, length, (n,), generator=gen).tolist()):
        tokens[i, 0] = SOT_TOKEN
        tokens[i, 1:eot] = torch.randint(0, SOT_TOKEN, (eot - 1,), generator=gen)
        tokens[i, eot] = EOT_TOKEN
    return tokens


_INPUT_VALUES: dict[str, Callable[[list[int], torch.Generator], torch.Tensor]] = {
    "x": lambda s, g: torch.randn(s, generator=g),
    "latents": lambda s, g: torch.randn(s, generator=g),
    "t": lambda s, g: torch.rand(s, generator=g),
    "embed": _embeddings,
    "conds": _embeddings,
    "weights": _cfg_weights,
    "tokens": _tokens,
    "pixels": lambda s, g: torch.rand(s, generator=g),
    "images": lambda s, g: torch.rand(s, generator=g) * 2 - 1,
}

"""The backends the bench measures, by name: a module free of torch, so the CLI's parser can offer them as choices
without importing it."""

from __future__ import annotations

from ccld_trt.backend_select import BACKENDS as RUNTIME_BACKENDS

CUDA_GRAPH_BACKEND = "torch-cudagraph"  # torch with CUDA-graph replay, measured as a backend of its own
BACKENDS = (RUNTIME_BACKENDS[0], CUDA_GRAPH_BACKEND, *RUNTIME_BACKENDS[1:])

"""The TensorRT backend: the Backend interface over four engines (unet_cfg, decoder, text_encoder,
image_encoder) built by ``ccld_trt.engines.build`` into one directory.

The engines run on a stream of their own; each call orders it after the caller's current stream and the caller's
stream after it (GPU-side waits, no host sync), and returns fresh tensors, so the sampler never sees a buffer
that the next call overwrites.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ccld_trt.engines.engine import Engine, engine_file, require_tensorrt
from ccld_trt.engines.sidecar import Sidecar, gpu_identity, require_fit
from ccld_trt.export.checkpoints import require_file
from ccld_trt.export.errors import UserError
from ccld_trt.export.graph_specs import BACKEND_GRAPHS, GRAPHS


class TensorRTBackend:
    """Backend protocol over TensorRT engines in ``engine_dir`` (names: engines.engine.engine_file).

    precision: which engines to load ("fp16": ``<graph>.fp16.engine``); cuda_graph: capture the U-Net launch
    once per input shape and replay it afterwards (saves the per-launch CPU cost of many small kernels).
    """

    name = "tensorrt"

    def __init__(self, engine_dir: Path, *, device: str | torch.device = "cuda", precision: str = "fp16",
                 cuda_graph: bool = False) -> None:
        version = require_tensorrt()
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise UserError(f"the tensorrt backend runs on a CUDA device, not {self.device}")
        gpu_name, capability = gpu_identity(self.device)  # UserError without a CUDA GPU
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        current = Sidecar(tensorrt_version=version, gpu_name=gpu_name, compute_capability=capability,
                          precision=precision)
        paths = {graph: engine_file(Path(engine_dir), graph, precision) for graph in BACKEND_GRAPHS}
        for graph, path in paths.items():  # every file checked before any engine loads
            require_fit(require_file(path, f"{graph} TensorRT engine"), current)
        self.engines = {graph: Engine(path, GRAPHS[graph], self.device) for graph, path in paths.items()}
        for engine in self.engines.values():
            engine.activate()
        self.cuda_graph = cuda_graph
        self.stream = torch.cuda.Stream(self.device)

    def _run(self, graph: str, feed: dict[str, torch.Tensor], cuda_graph: bool = False) -> torch.Tensor:
        caller = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(caller)
        out = self.engines[graph].infer(feed, self.stream, cuda_graph=cuda_graph)
        caller.wait_stream(self.stream)
        (result,) = out.values()  # every graph has one output
        return result.clone()  # on the caller's stream, which now waits for the engine

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens int64 [N, 77] -> CLOOB text embeddings float32 [N, 512]."""
        return self._run("text_encoder", {"tokens": tokens})

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels float32 [N, 3, S, S] in [0, 1] -> L2-normalised embeddings float32 [N, 512]."""
        return self._run("image_encoder", {"pixels": pixels})

    def unet(self, x: torch.Tensor, t: torch.Tensor, conds: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [N, 4, h, w], t [N], conds [C, 512], weights [C] -> v [N, 4, h, w]: one launch of unet_cfg."""
        return self._run("unet_cfg", {"x": x, "t": t, "conds": conds, "weights": weights}, self.cuda_graph)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents float32 [N, 4, h, w] (already scaled) -> images float32 [N, 3, 8h, 8w] in about [-1, 1]."""
        return self._run("decoder", {"latents": latents})

"""The OpenVINO backend's int8 graphs: calibration feeds from the project's own sampling trajectories (real
prompts and seeds through the fp32 graphs), handed to ``ccld_trt.export.quantize``, which makes and caches the
int8 files.

Why trajectories: int8 scales are set from the activations the calibration feeds produce, and the U-Net's
activations depend on where in the sampling it is (noise level, how far CFG pushes). Feeding it the inputs it
really sees, from noise to image, covers that range; random inputs would not.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ccld_trt.backends.base import Backend
from ccld_trt.export.quantize import SCHEMES, Feed, quantize_all
from ccld_trt.pipeline import Request, conditions, sample_latents

# Prompts of the kind the model is used with (none of them the benchmark's), each with its CFG weight and seed.
CALIBRATION_PROMPTS: tuple[tuple[str, float, int], ...] = (
    ("a peaceful meadow, pastel crayons", 3.0, 101),
    ("an oil painting of a harbour at dusk with many small boats", 3.0, 102),
    ("a martian landscape painting, oil on canvas", 5.0, 103),
    ("sketch of a 3D printer by Leonardo da Vinci", 1.0, 104),
)
CALIBRATION_STEPS = 15  # PLMS: 24 U-Net evaluations per trajectory, from pure noise to the image
CALIBRATION_METHOD = "plms"


class _Recorder:
    """A Backend that passes every call to ``inner`` and keeps each U-Net/CFG call's inputs as a feed of the
    unet_cfg graph."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.name = inner.name
        self.device = inner.device
        self.unet_feeds: list[Feed] = []

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.inner.encode_text(tokens)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.inner.encode_image(pixels)

    def unet(self, x: torch.Tensor, t: torch.Tensor, conds: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        self.unet_feeds.append({name: np.array(value.detach().cpu().float().numpy())
                                for name, value in (("x", x), ("t", t), ("conds", conds), ("weights", weights))})
        return self.inner.unet(x, t, conds, weights)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.inner.decode(latents)

    def encode_latents(self, images: torch.Tensor) -> torch.Tensor:
        return self.inner.encode_latents(images)


def calibration_description(scale: float, prompts: Sequence[tuple[str, float, int]] = CALIBRATION_PROMPTS,
                            steps: int = CALIBRATION_STEPS) -> dict[str, Any]:
    """What the calibration feeds are made from (part of the int8 files' cache key)."""
    return {"prompts": [list(p) for p in prompts], "steps": steps, "method": CALIBRATION_METHOD, "scale": scale}


def calibration_feeds(backend: Backend, scale: float,
                      prompts: Sequence[tuple[str, float, int]] = CALIBRATION_PROMPTS,
                      steps: int = CALIBRATION_STEPS) -> dict[str, list[Feed]]:
    """Sample one 32x32-latent image per (prompt, weight, seed) of ``prompts`` on ``backend`` (the fp32 graphs)
    -> {"unet_cfg": every U-Net/CFG call's inputs, "decoder": each final latent x ``scale``, [1, 4, 32, 32]}."""
    recorder = _Recorder(backend)
    decoder_feeds: list[Feed] = []
    for text, weight, seed in prompts:
        request = Request(prompts=[(text, weight)], seed=seed, steps=steps, method=CALIBRATION_METHOD)
        conds, weights = conditions(recorder, request, [])
        latents = sample_latents(recorder, request, conds, weights)
        decoder_feeds.append({"latents": (latents * scale).numpy()})
    return {"unet_cfg": recorder.unet_feeds, "decoder": decoder_feeds}


def ensure_int8(onnx_dir: Path, scale: float, progress: bool = True,
                prompts: Sequence[tuple[str, float, int]] = CALIBRATION_PROMPTS,
                steps: int = CALIBRATION_STEPS) -> Mapping[str, Path]:
    """The int8 graphs of ``onnx_dir`` (whose fp32 graphs are exported), quantised unless up to date; the
    calibration trajectories run on the fp32 graphs through OpenVINO, only when a graph needs them.
    ``scale``: the autoencoder scale the pipeline multiplies latents by before decoding."""
    from ccld_trt.backends.openvino_backend import OpenVinoBackend

    def calibrate() -> dict[str, list[Feed]]:
        return calibration_feeds(OpenVinoBackend(onnx_dir, "fp32"), scale, prompts, steps)

    return quantize_all(onnx_dir, calibrate, calibration_description(scale, prompts, steps), tuple(SCHEMES), progress)

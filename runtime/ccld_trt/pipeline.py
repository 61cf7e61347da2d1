"""Prompts and a seed in, latents and pixels out, on any backend: the original ``cfg_sample.py`` flow."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch

from ccld_trt.backends.base import Backend
from ccld_trt.image_prompt import load_image_prompt
from ccld_trt.init_image import encode_init, load_init_image, noised_start
from ccld_trt.outputs import to_pixels
from ccld_trt.request import LATENT_CHANNELS as LATENT_CHANNELS  # its importers' names
from ccld_trt.request import InvalidRequest as InvalidRequest
from ccld_trt.request import Request as Request
from ccld_trt.sampler_names import DEFAULT_AUTOENCODER_SCALE as DEFAULT_AUTOENCODER_SCALE
from ccld_trt.samplers import needs_step_noise, sample
from ccld_trt.tokenizer import tokenize

T = TypeVar("T")


# an image prompt's CLOOB input pixels float32 [1, 3, S, S] in [0, 1] (numpy, or a tensor), and its weight
ImagePrompts = Sequence[tuple[np.ndarray | torch.Tensor, float]]


def load_image_prompts(request: Request, image_size: int) -> list[tuple[np.ndarray, float]]:
    """Each image prompt as CLOOB input pixels [1, 3, S, S] in [0, 1], with its weight (UserError if unreadable)."""
    return [(load_image_prompt(path, image_size), w) for path, w in request.image_prompts]


def conditions(backend: Backend, request: Request, image_prompts: ImagePrompts) -> tuple[torch.Tensor, torch.Tensor]:
    """CFG conditions [C, 512] and weights [C]: [zero, text prompts..., image prompts...], [1 - sum(w), w...].

    ``image_prompts`` are the pixels of ``load_image_prompts``.
    """
    embeds = [torch.zeros([1, 512], device=backend.device)]
    weights = []
    if request.prompts:
        texts = [text for text, _ in request.prompts]
        embeds.append(backend.encode_text(tokenize(texts).to(backend.device)))
        weights += [w for _, w in request.prompts]
    for pixels, w in image_prompts:
        embeds.append(backend.encode_image(torch.as_tensor(pixels).to(backend.device)))
        weights.append(w)
    conds = torch.cat(embeds).float()
    return conds, torch.tensor([1 - sum(weights), *weights], device=backend.device, dtype=torch.float32)


@dataclass
class Noise:
    """The random draws of a job, in the original's order from ``torch.manual_seed(seed)`` on the CPU."""

    x: torch.Tensor             # [n, 4, h, w]
    steps: list[torch.Tensor]   # per step but the last, [n, 4, h, w] each (ddpm and ddim with eta > 0)


def draw_noise(request: Request) -> Noise:
    gen = torch.Generator().manual_seed(request.seed)
    shape = [request.n, LATENT_CHANNELS, *request.latent_size]
    x = torch.randn(shape, generator=gen)
    step_noise = ([torch.randn(shape, generator=gen) for _ in range(len(request.timesteps()) - 1)]
                  if needs_step_noise(request.method, request.eta) else [])
    return Noise(x, step_noise)


def sample_latents(backend: Backend, request: Request, conds: torch.Tensor, weights: torch.Tensor,
                   on_evaluation: Callable[[], object] | None = None,
                   init_latent: torch.Tensor | None = None) -> torch.Tensor:
    """Run the sampler over all n images in batches; latents float32 [n, 4, h, w] on the CPU (unscaled).

    ``init_latent`` [1, 4, h, w] (``init_image.encode_init``; image-to-image): the start is it noised to the
    first of ``request.timesteps()`` with the same first noise draw, as the original. Strength 1 starts from the
    noise alone: text-to-image exactly (the original would add the init at alpha 0.0067, the spliced schedule's
    first timestep, a difference users who ask for "all noise" do not expect)."""
    noise = draw_noise(request)
    timesteps = request.timesteps()
    if init_latent is not None and request.strength < 1.0:
        noise.x = noised_start(init_latent, noise.x, timesteps[0])
    steps = timesteps.to(backend.device)

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        v = backend.unet(x, t, conds, weights)
        if on_evaluation is not None:
            on_evaluation()
        return v

    outs = []
    for rows in request.batches():
        x = noise.x[rows].to(backend.device)
        step_noise = [s[rows].to(backend.device) for s in noise.steps]
        outs.append(sample(model, x, steps, request.method, request.eta, step_noise).float().cpu())
    return torch.cat(outs)


def decode(backend: Backend, latents: torch.Tensor, scale: float, batch_size: int | None = None) -> np.ndarray:
    """latents [n, 4, h, w] (unscaled) -> uint8 pixels [n, 8h, 8w, 3], decoding ``batch_size`` at a time."""
    batch = batch_size or latents.shape[0]
    return np.concatenate([to_pixels(backend.decode(latents[i:i + batch].to(backend.device) * scale).float().cpu()
                                     .numpy())
                           for i in range(0, latents.shape[0], batch)])


@dataclass
class Generation:
    """What one job produced, and how long each stage took (seconds, measured after the device finished)."""

    latents: torch.Tensor  # float32 [n, 4, h, w] on the CPU, before the autoencoder scale
    pixels: np.ndarray     # uint8 [n, 8h, 8w, 3]
    seconds: dict[str, float]  # "conditioning", "sampling", "decoding"


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    # CUDA work is asynchronous: without this a stage's time would land in whichever stage next reads back.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def generate(backend: Backend, request: Request, image_prompts: ImagePrompts, scale: float,
             on_evaluation: Callable[[], object] | None = None,
             on_stage: Callable[[str], None] | None = None, init_pixels: torch.Tensor | None = None) -> Generation:
    """The whole job: conditions, sampling in batches, decoding. ``image_prompts`` from ``load_image_prompts``;
    ``on_stage`` is called with each stage's name as it starts, ``on_evaluation`` after each U-Net evaluation.
    ``init_pixels``: ``request.init`` read by ``init_image.load_init_image`` (read here when not given); it is
    encoded in the conditioning stage."""
    if request.init is not None and init_pixels is None:
        init_pixels = load_init_image(request.init, request.latent_size)
    seconds: dict[str, float] = {}

    def timed(name: str, work: Callable[[], T]) -> T:
        if on_stage is not None:
            on_stage(name)
        start = time.perf_counter()
        out = work()
        synchronize(backend.device)
        seconds[name] = time.perf_counter() - start
        return out

    def condition() -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor | None]:
        init = None if init_pixels is None else encode_init(backend, init_pixels, scale)
        return conditions(backend, request, image_prompts), init

    (conds, weights), init = timed("conditioning", condition)
    latents = timed("sampling", lambda: sample_latents(backend, request, conds, weights, on_evaluation, init))
    pixels = timed("decoding", lambda: decode(backend, latents, scale, request.batch_size))
    return Generation(latents, pixels, seconds)

"""Image-to-image's start: the init image read as image prompts are (same checks), resized and centre-cropped to
the output size as the original's ``resize_and_center_crop``, encoded to the autoencoder's posterior mean, and
noised to the sampler's first timestep (``x = init * alpha + noise * sigma``, v-diffusion ``cfg_sample.py``)."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from ccld_trt.backends.base import Backend
from ccld_trt.image_prompt import open_rgb, resize_and_center_crop, to_array
from ccld_trt.schedule import t_to_alpha_sigma

LATENT_FACTOR = 8  # image pixels per latent pixel (kl-f8)


def load_init_image(path: str | Path, latent_size: tuple[int, int]) -> torch.Tensor:
    """The init image file as the encoder's input (``init_pixels``). UserError (one line, naming the file) when
    it is missing, a URL or not a readable image."""
    return init_pixels(open_rgb(path, "init image"), latent_size)


def init_pixels(image: Image.Image, latent_size: tuple[int, int]) -> torch.Tensor:
    """An image -> the encoder's input float32 [1, 3, 8h, 8w] in [-1, 1] for ``latent_size`` (h, w): RGB,
    resized and centre-cropped to the output size as the original's ``resize_and_center_crop``."""
    height, width = (LATENT_FACTOR * s for s in latent_size)
    return torch.from_numpy(to_array(resize_and_center_crop(image.convert("RGB"), width, height))) * 2 - 1


def encode_init(backend: Backend, pixels: torch.Tensor, scale: float) -> torch.Tensor:
    """pixels [1, 3, 8h, 8w] in [-1, 1] -> the init latent float32 [1, 4, h, w] on the CPU: the posterior mean
    divided by ``scale`` (the one the decoder's input is multiplied by), in the sampler's units."""
    return backend.encode_latents(pixels.to(backend.device)).float().cpu() / scale


def noised_start(init: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The sampler's start at timestep ``t`` (a scalar tensor): ``init * alpha + noise * sigma``; ``init``
    [1 or n, 4, h, w] broadcasts over the n images of ``noise`` [n, 4, h, w]."""
    alpha, sigma = t_to_alpha_sigma(t)
    return init * alpha + noise * sigma

"""What one job may ask for: the limits of every front end (``sample``, the web page, the cluster API and the
Python API), stated once here and sized to what this machine can hold (README, "Limits").

How they were sized (the full-size U-Net, 105 M parameters, fp32 on the CPU; measured peak RSS on a 23 GiB
machine): one U-Net row (one image under one CFG condition) at 32x32 latents takes 13.5 MB of activations
over the 402 MB of weights, and a call's memory grows with rows x latent pixels. MAX_IMAGES x (1 + MAX_PROMPTS)
= 144 rows of 32x32 is about 2 GB, the most one U-Net call may take (MAX_UNET_ROW_PIXELS). Pre-drawn
per-step noise (ddpm, ddim with eta > 0) is n x steps x 16 KiB at 32x32: 0.26 GB at the limits. The
autoencoder decodes a 256x256 image in about 0.2 GB, 3.2 GB for MAX_IMAGES at once. Prompt weights are
bounded so that the CFG sum (weights 1 - sum(w), w...) stays far from float overflow: sum |w| <= 1 + 2 x
MAX_PROMPTS x MAX_WEIGHT = 1601, times U-Net outputs that are at most fp16's 65504, is about 1e8.

Each ``*_problem`` function returns None or the problem as words that follow the name of the value
("must be from 1 to 1000, got 2000000"), so each front end names the value in its own terms.
"""

from __future__ import annotations

import math

MAX_IMAGES = 16  # n: images per job
MAX_STEPS = 1000  # sampler steps (the schedule has no finer structure to resolve)
MAX_PROMPTS = 8  # text and image prompts together: a U-Net call has n x (1 + prompts) rows
MAX_PROMPT_CHARS = 10_000  # per prompt: 77 tokens use at most ~1,900 characters after CLIP's clean-up
MAX_WEIGHT = 100.0  # |weight| of each prompt
MAX_AUTOENCODER_SCALE = 100.0  # latents x scale before decoding (the published demo: 2.55)
MIN_LATENT_SIDE, MAX_LATENT_SIDE = 8, 64  # latent height/width, multiples of 8 (the U-Net halves them 3 times)
MAX_UNET_ROW_PIXELS = MAX_IMAGES * (1 + MAX_PROMPTS) * 32 * 32  # rows x latent pixels of one U-Net call (~2 GB)
MAX_IMAGE_PIXELS = 20_000_000  # an image prompt or init image, read from its header before decoding
MAX_ASPECT_RATIO = 50  # long side / short side: resizing the short side to 224 must not blow up the long one
MAX_UPLOAD_BYTES = 100 * 2**20  # one uploaded image (a 20 MP PNG with little to compress stays well below)
MAX_BODY_BYTES = MAX_UPLOAD_BYTES * 4 // 3 + 2**20  # a /v1/generate body: its images in base64, and the rest
MAX_UNET_WIDTH = 2048  # channels of a U-Net level (base channels x multiplier); the published teacher has 1536


def show(value: float) -> str:
    """A number as a message shows it: "2000000", "3e+38", "nan" (a huge int by its size, which str() refuses)."""
    if isinstance(value, int) and value.bit_length() > 64:  # float() overflows past 1024 bits
        return f"{float(value):g}" if value.bit_length() < 1000 else f"a {value.bit_length()}-bit number"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _finite(value: float) -> bool:
    return isinstance(value, int) or math.isfinite(value)


def range_problem(value: float, low: float, high: float) -> str | None:
    """None if ``value`` is a finite number in [low, high]; else ``out_of_range``'s words."""
    return None if _finite(value) and low <= value <= high else out_of_range(value, low, high)


def out_of_range(value: float, low: float, high: float) -> str:
    """"must be from low to high, got value"."""
    return f"must be from {low:g} to {high:g}, got {show(value)}"


def weight_problem(weight: float) -> str | None:
    """A prompt weight: finite, |w| <= MAX_WEIGHT (so the CFG sum stays finite)."""
    return range_problem(weight, -MAX_WEIGHT, MAX_WEIGHT)


def autoencoder_scale_problem(scale: float) -> str | None:
    """The autoencoder scale: finite, > 0 and <= MAX_AUTOENCODER_SCALE."""
    if _finite(scale) and 0 < scale <= MAX_AUTOENCODER_SCALE:
        return None
    return f"must be positive and at most {MAX_AUTOENCODER_SCALE:g}, got {show(scale)}"


def prompt_text_problem(text: str) -> str | None:
    """A text prompt's length (the tokenizer reads at most MAX_PROMPT_CHARS of it anyway)."""
    if len(text) > MAX_PROMPT_CHARS:
        return f"is {len(text)} characters long; a prompt may have at most {MAX_PROMPT_CHARS}"
    return None


def prompt_count_problem(count: int) -> str | None:
    """How many text and image prompts one job has."""
    if count > MAX_PROMPTS:
        return f"must be at most {MAX_PROMPTS} (text and image prompts together), got {count}"
    return None


def latent_size_problem(size: tuple[int, int]) -> str | None:
    """Latent (height, width): multiples of 8 from MIN_LATENT_SIDE to MAX_LATENT_SIDE."""
    if all(MIN_LATENT_SIDE <= s <= MAX_LATENT_SIDE and s % 8 == 0 for s in size):
        return None
    return (f"must be multiples of 8 from {MIN_LATENT_SIDE} to {MAX_LATENT_SIDE} ({8 * MIN_LATENT_SIDE} to "
            f"{8 * MAX_LATENT_SIDE} pixels), got {tuple(size)}")


def unet_rows_problem(batch: int, conditions: int, size: tuple[int, int]) -> str | None:
    """One U-Net call of ``batch`` images x ``conditions`` CFG conditions at latent ``size``: within
    MAX_UNET_ROW_PIXELS (the memory of MAX_IMAGES images x (1 + MAX_PROMPTS) conditions at 32x32)."""
    rows = batch * conditions
    if rows * size[0] * size[1] <= MAX_UNET_ROW_PIXELS:
        return None
    most = max(1, MAX_UNET_ROW_PIXELS // (conditions * size[0] * size[1]))
    return (f"of {batch} images x {conditions} conditions at {size[0]}x{size[1]} latents is over the memory of "
            f"one U-Net call; at most {most} images per batch at this size")


def image_size_problem(width: int, height: int) -> str | None:
    """An image prompt or init image's size, from its header: at most MAX_IMAGE_PIXELS, sides at most
    MAX_ASPECT_RATIO to 1."""
    if width * height > MAX_IMAGE_PIXELS:
        return (f"is {width}x{height} ({width * height / 1e6:.1f} megapixels); the limit is "
                f"{MAX_IMAGE_PIXELS / 1e6:g} megapixels")
    if min(width, height) < 1 or max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        return f"is {width}x{height}; its long side may be at most {MAX_ASPECT_RATIO} times its short side"
    return None


def unet_shape_problem(base_channels: int | None, multipliers: tuple[int, ...] | None) -> str | None:
    """Base channels / channel multipliers given for a U-Net (None: read from the checkpoint): every level's
    width (base x multiplier) at most MAX_UNET_WIDTH; without multipliers, the base alone."""
    if base_channels is not None and not 1 <= base_channels <= MAX_UNET_WIDTH:
        return f"base channels must be from 1 to {MAX_UNET_WIDTH}, got {base_channels}"
    if multipliers is not None:
        if any(m < 1 for m in multipliers):
            return f"channel multipliers must be >= 1, got {list(multipliers)}"
        widest = (base_channels or 1) * max(multipliers, default=1)
        if widest > MAX_UNET_WIDTH:
            return f"level width {widest} (base channels x multiplier) must be at most {MAX_UNET_WIDTH}"
    return None

"""Prompt strings (``text:weight``) and image prompts, preprocessed exactly as ``cfg_sample.py`` does."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ccld_trt.export.errors import UserError

_URL_SCHEMES = ("http://", "https://")


def parse_prompt(prompt: str, default_weight: float = 3.0) -> tuple[str, float]:
    """Split ``"text:weight"`` on the last colon; no colon means ``default_weight``.

    As in the original, an http(s) URL's scheme colon is not a separator, and any other colon must be followed
    by a number (``"style: oil"`` is an error, as is a URL with a port but no weight). Unlike the original,
    a NaN or infinite weight is refused too, since it would turn every sample into NaN.
    """
    if prompt.startswith(_URL_SCHEMES):
        scheme, rest = prompt.split(":", 1)
        text, sep, weight = rest.rpartition(":")
        text, sep, weight = (scheme + ":" + text, sep, weight) if sep else (scheme + ":" + rest, "", "")
    else:
        text, sep, weight = prompt.rpartition(":")
        if not sep:
            text = prompt
    if not sep:
        return text, float(default_weight)
    try:
        value = float(weight)
    except ValueError:
        raise UserError(f"prompt {prompt!r}: the part after the last ':' ({weight!r}) is not a number; "
                        "write 'text:weight', e.g. 'a red house:3'") from None
    if not math.isfinite(value):
        raise UserError(f"prompt {prompt!r}: weight {weight!r} is not a finite number")
    return text, value


def _crop_offset(dim: int, crop: int) -> int:
    if dim >= crop:
        # torchvision's center_crop rounds half to even here (Python's round).
        return round((dim - crop) / 2.0)
    # torchvision first zero-pads a too-small side, floor(deficit / 2) before it.
    return -((crop - dim) // 2)


def load_image_prompt(path: str | Path, size: int) -> torch.Tensor:
    """An image prompt as the CLOOB image encoder's input.

    The image is converted to RGB, LANCZOS-resized so its short side is ``size`` (sides truncated to int as
    in the original) and centre-cropped to ``size``×``size`` with torchvision's rounding (and zero fill when
    float rounding left a side one pixel short).

    Returns:
        float32 tensor [1, 3, size, size] in [0, 1]. The CLOOB mean/std normalisation is left to the encoder.
    """
    if str(path).startswith(_URL_SCHEMES):
        raise UserError(f"image prompt {path}: URLs are not fetched; download the image and give its path")
    path = Path(path)
    if not path.is_file():
        raise UserError(f"image prompt not found (or not a file): {path}")
    try:
        with Image.open(path) as opened:
            image = opened.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise UserError(f"image prompt {path}: not a readable image: {e}") from e
    width, height = image.size
    fac = max(size / width, size / height)
    image = image.resize((int(fac * width), int(fac * height)), Image.Resampling.LANCZOS)
    left, top = _crop_offset(image.width, size), _crop_offset(image.height, size)
    # PIL fills the area outside the image with zeros, which is torchvision's padding.
    image = image.crop((left, top, left + size, top + size))
    pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())
    return pixels.permute(2, 0, 1).unsqueeze(0).float().div(255)

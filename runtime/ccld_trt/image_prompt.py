"""Image prompts, preprocessed exactly as ``cfg_sample.py`` does (prompt strings: ``request.parse_prompt``), without
torch: a ``sample`` run with image prompts on a graph backend may not import it (graph_sample)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from ccld_trt.export.errors import UserError
from ccld_trt.limits import MAX_IMAGE_PIXELS, image_size_problem
from ccld_trt.request import URL_SCHEMES
from ccld_trt.request import parse_prompt as parse_prompt  # its importers' name


def _crop_offset(dim: int, crop: int) -> int:
    if dim >= crop:
        # torchvision's center_crop rounds half to even here (Python's round).
        return round((dim - crop) / 2.0)
    # torchvision first zero-pads a too-small side, floor(deficit / 2) before it.
    return -((crop - dim) // 2)


def open_rgb(path: str | Path, what: str = "image prompt") -> Image.Image:
    """The image file at ``path`` converted to RGB; UserError naming ``what`` and the file when it is a URL, is
    missing, is not a readable image or is past the limits (``limits.image_size_problem``: pixels and aspect
    ratio, read from the header before anything is decoded). Shared by image prompts and image-to-image's init
    image."""
    if str(path).startswith(URL_SCHEMES):
        raise UserError(f"{what} {path}: URLs are not fetched; download the image and give its path")
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} not found (or not a file): {path}")
    try:
        with Image.open(path) as opened:  # lazy: only the header is read so far
            problem = image_size_problem(*opened.size)
            if problem is None:
                return opened.convert("RGB")
    except Image.DecompressionBombError:  # a header far past PIL's own limit: refused in open()
        raise UserError(f"{what} {path} is too large; the limit is {MAX_IMAGE_PIXELS / 1e6:g} megapixels") from None
    except (OSError, ValueError) as e:
        raise UserError(f"{what} {path}: not a readable image: {e}") from e
    raise UserError(f"{what} {path} {problem}")


def resize_and_center_crop(image: Image.Image, width: int, height: int) -> Image.Image:
    """The original's ``resize_and_center_crop``: LANCZOS-resize so the image covers ``width``×``height`` (sides
    truncated to int as in the original), then centre-crop with torchvision's rounding (and zero fill when float
    rounding left a side one pixel short)."""
    fac = max(width / image.width, height / image.height)
    image = image.resize((int(fac * image.width), int(fac * image.height)), Image.Resampling.LANCZOS)
    left, top = _crop_offset(image.width, width), _crop_offset(image.height, height)
    # PIL fills the area outside the image with zeros, which is torchvision's padding.
    return image.crop((left, top, left + width, top + height))


def to_array(image: Image.Image) -> np.ndarray:
    """An RGB image -> float32 [1, 3, H, W] in [0, 1]: torchvision's ``to_tensor``, the same float32 values (the
    bytes over 255, each division rounded once)."""
    pixels = np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)[None]
    return np.ascontiguousarray(pixels, dtype=np.float32) / np.float32(255)


def load_image_prompt(path: str | Path, size: int) -> np.ndarray:
    """An image prompt as the CLOOB image encoder's input: ``open_rgb``, then ``resize_and_center_crop`` to
    ``size``×``size``.

    Returns:
        float32 array [1, 3, size, size] in [0, 1]. The CLOOB mean/std normalisation is left to the encoder.
    """
    return to_array(resize_and_center_crop(open_rgb(path), size, size))

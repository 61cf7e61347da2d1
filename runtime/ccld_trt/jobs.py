"""The one way a job is assembled: prompts, image prompts and sampler settings in, a validated ``Request`` with
the image prompts' pixels out. The command line, the web page, the cluster API and the Python API all call
``assemble``, so none of them pairs a weight with an image, parses a prompt or checks a limit by itself.

Errors are ``InvalidRequest`` naming the field as the library does (``steps``, ``prompts[1]``,
``image_prompts[0].weight``, ``autoencoder_scale``); each front end says it in its own words.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

from PIL import Image, UnidentifiedImageError

from ccld_trt import limits
from ccld_trt.export.errors import UserError
from ccld_trt.export.graph_specs import EAGER_GRAPHS
from ccld_trt.request import InvalidRequest, Request, parse_prompt
from ccld_trt.sampler_names import DEFAULT_AUTOENCODER_SCALE

if TYPE_CHECKING:  # torch is imported where an init image is read or a job runs: a job is assembled without it
    import numpy as np
    import torch

    from ccld_trt.backends.base import Backend
    from ccld_trt.pipeline import Generation

# The limits are every front end's, stated once in ccld_trt.limits (Request.validate checks them); these names
# stay importable from here.
MAX_STEPS, MAX_IMAGES, MAX_UPLOAD_BYTES = limits.MAX_STEPS, limits.MAX_IMAGES, limits.MAX_UPLOAD_BYTES
MAX_UPLOAD_PIXELS = limits.MAX_IMAGE_PIXELS
# Formats a browser would upload. Others that PIL opens (EPS runs Ghostscript, for one) are refused.
UPLOAD_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
DEFAULT_WEIGHT = 3.0

# An image prompt: a file, its encoded bytes (PNG, JPEG, ...) or a PIL image, optionally with its weight.
ImageSource = str | os.PathLike[str] | bytes | Image.Image
ImagePromptInput = ImageSource | tuple[ImageSource, float]
# A text prompt: "text" or "text:weight", or (text, weight).
PromptInput = str | tuple[str, float]


class RequestFields(TypedDict, total=False):
    """The sampler settings of a Request that front ends pass through unchanged (see ``Request``). A new
    Request setting is one line here (tests/test_api.py checks that the two agree)."""

    n: int
    batch_size: int | None
    seed: int
    steps: int
    method: str
    eta: float
    strength: float  # image-to-image (with ``init``): the starting timestep


@dataclass(frozen=True)
class Job:
    """A validated job. ``image_pixels``: each image prompt as CLOOB input float32 [1, 3, S, S] in [0, 1] (numpy)
    with the weight of the same entry of ``request.image_prompts`` (assemble takes both from one list)."""

    request: Request
    image_pixels: list[tuple[np.ndarray, float]]
    autoencoder_scale: float
    init_pixels: torch.Tensor | None = None  # image-to-image: float32 [1, 3, 8h, 8w] in [-1, 1] (init_image)


def graphs_run(job: Job) -> tuple[str, ...]:
    """The backend graphs ``job`` runs (graph_specs.BACKEND_GRAPHS): a text-only job's, the CLOOB image encoder
    for image prompts, the autoencoder's encoder for an init image."""
    return (*EAGER_GRAPHS, *(["image_encoder"] if job.image_pixels else []),
            *(["encoder"] if job.init_pixels is not None else []))


def check_image_upload(path: Path, what: str = "the image prompt") -> None:
    """UserError unless ``path`` is an image in a browser format of at most MAX_UPLOAD_PIXELS.

    Only the header is read, so an oversized upload costs no memory; a file that is cut short after its header
    is reported when it is loaded.
    """
    limit = f"the limit is {MAX_UPLOAD_PIXELS / 1e6:g} megapixels"
    try:
        with Image.open(path, formats=UPLOAD_FORMATS) as image:
            width, height = image.size
            if width * height > MAX_UPLOAD_PIXELS:
                raise UserError(f"{what} is {width}x{height} ({width * height / 1e6:.1f} megapixels); "
                                f"{limit}")
    except Image.DecompressionBombError:  # over twice MAX_IMAGE_PIXELS: PIL refuses it in open()
        raise UserError(f"{what} is too large; {limit}") from None
    except UnidentifiedImageError:
        raise UserError(f"{what} is not an image in a supported format ({', '.join(UPLOAD_FORMATS)})"
                        ) from None


def _weight(value: Any, field: str) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        raise InvalidRequest(field, f"must be a finite number, got {value!r}")
    return float(value)


def _weighted(value: Any, kinds: Any) -> bool:
    """Whether ``value`` is one (item, weight) pair rather than a sequence of items."""
    return (isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], kinds)
            and isinstance(value[1], int | float) and not isinstance(value[1], bool))


def text_prompts(prompts: PromptInput | Sequence[PromptInput]) -> list[tuple[str, float]]:
    """"text[:weight]" strings (weight 3 when absent; see ``parse_prompt``) or (text, weight) pairs ->
    (text, weight) pairs. A lone string or pair is one prompt."""
    single = isinstance(prompts, str) or _weighted(prompts, str)
    items: list[Any] = [prompts] if single else list(prompts)
    out = []
    for i, prompt in enumerate(items):
        if isinstance(prompt, str):
            text, weight = parse_prompt(prompt)
        elif isinstance(prompt, tuple) and len(prompt) == 2 and isinstance(prompt[0], str):
            text, weight = prompt[0], _weight(prompt[1], f"prompts[{i}].weight")
        else:
            raise InvalidRequest(f"prompts[{i}]", f"must be \"text:weight\" or (text, weight), got {prompt!r}")
        if not text.strip():
            raise InvalidRequest(f"prompts[{i}]", f"has no text: {prompt!r}")
        out.append((text, weight))
    return out


def _image_prompts(prompts: ImagePromptInput | Sequence[ImagePromptInput]
                   ) -> list[tuple[ImageSource, float, str]]:
    """Image prompts -> (source, weight, name); ``name`` is the path, or "image_prompts[i]" for bytes/images."""
    kinds = (str, bytes, os.PathLike, Image.Image)
    single = isinstance(prompts, kinds) or _weighted(prompts, kinds)
    items: list[Any] = [prompts] if single else list(prompts)  # type: ignore[arg-type]
    out = []
    for i, item in enumerate(items):
        source, weight = item if isinstance(item, tuple) and len(item) == 2 else (item, DEFAULT_WEIGHT)
        if not isinstance(source, str | bytes | os.PathLike | Image.Image):
            raise InvalidRequest(f"image_prompts[{i}]", "must be a path, image bytes or a PIL image, optionally "
                                                        f"with a weight, got {type(source).__name__}")
        weight = _weight(weight, f"image_prompts[{i}].weight")
        name = os.fspath(source) if isinstance(source, str | os.PathLike) else f"image_prompts[{i}]"
        out.append((source, weight, str(name)))
    return out


def _load_image(source: ImageSource, name: str, image_size: int, untrusted: bool) -> np.ndarray:
    """One image prompt -> float32 [1, 3, S, S] in [0, 1], preprocessed as a file given to ``sample`` is."""
    from ccld_trt.image_prompt import load_image_prompt, resize_and_center_crop, to_array

    if isinstance(source, str | os.PathLike):
        if untrusted:
            check_image_upload(Path(source))
        return load_image_prompt(os.fspath(source), image_size)
    if isinstance(source, Image.Image):  # what load_image_prompt does after opening a file
        return to_array(resize_and_center_crop(source.convert("RGB"), image_size, image_size))
    # encoded bytes go through a file: the same checks and decoding as a file given to `sample`
    with tempfile.TemporaryDirectory(prefix="ccld-trt-prompt-") as tmp:
        path = Path(tmp) / "image"
        path.write_bytes(source)
        try:
            if untrusted:
                check_image_upload(path)
            return load_image_prompt(path, image_size)
        except UserError as e:
            raise UserError(f"{name}: {str(e).replace(str(path), 'the image')}") from None


def _load_init(source: ImageSource, latent_size: tuple[int, int], untrusted: bool) -> torch.Tensor:
    """The init image -> float32 [1, 3, 8h, 8w] in [-1, 1] (init_image.init_pixels), read and checked as an
    image prompt is."""
    from ccld_trt.init_image import init_pixels, load_init_image

    what = "the init image"
    if isinstance(source, Image.Image):
        return init_pixels(source, latent_size)
    if isinstance(source, str | os.PathLike):
        if untrusted:
            check_image_upload(Path(source), what)
        return load_init_image(os.fspath(source), latent_size)
    with tempfile.TemporaryDirectory(prefix="ccld-trt-init-") as tmp:
        path = Path(tmp) / "image"
        path.write_bytes(source)
        try:
            if untrusted:
                check_image_upload(path, what)
            return load_init_image(path, latent_size)
        except UserError as e:  # name the upload, not the temporary file
            raise UserError(str(e).replace(f"'{path}'", "the upload").replace(f" {path}", "")) from None


def assemble(prompts: PromptInput | Sequence[PromptInput] = (),
             image_prompts: ImagePromptInput | Sequence[ImagePromptInput] = (), *, image_size: int,
             autoencoder_scale: float = DEFAULT_AUTOENCODER_SCALE, untrusted: bool = False,
             init: ImageSource | None = None, **fields: Any) -> Job:
    """Prompts, image prompts and ``fields`` (those of RequestFields: n, batch_size, seed, steps, method, eta)
    -> a validated Job, its image prompts loaded and preprocessed to ``image_size`` (the CLOOB input side).

    Image prompts are paths, encoded image bytes or PIL images, each alone (weight 3) or as (image, weight).
    ``init``: image-to-image's init image (the same kinds), started from at the ``strength`` field's timestep.
    ``untrusted``: the request comes from other people (page, cluster): steps and n are limited and every
    image must be a browser format within MAX_UPLOAD_PIXELS. Everything is validated before any image is
    decoded; InvalidRequest (or UserError for an unreadable image) names the first problem.
    """
    unknown = sorted(set(fields) - set(RequestFields.__annotations__))
    if unknown:
        raise TypeError(f"unknown request field(s) {', '.join(unknown)}")
    texts = text_prompts(prompts)
    images = _image_prompts(image_prompts)
    if init is None and "strength" in fields:
        raise InvalidRequest("strength", "is for image to image: give the image to start from (init)")
    if init is not None and not isinstance(init, str | bytes | os.PathLike | Image.Image):
        raise InvalidRequest("init", f"must be a path, image bytes or a PIL image, got {type(init).__name__}")
    init_name = None if init is None else Path(os.fspath(init) if isinstance(init, str | os.PathLike) else "init")
    request = Request(prompts=texts, image_prompts=[(Path(name), weight) for _, weight, name in images],
                      init=init_name, **fields)
    request.validate()  # the limits of every front end included
    scale = _weight(autoencoder_scale, "autoencoder_scale")
    if problem := limits.autoencoder_scale_problem(scale):
        raise InvalidRequest("autoencoder_scale", problem)
    # each weight is read once, from the same entry as its image: the pixels and the Request cannot disagree
    pixels = [(_load_image(source, name, image_size, untrusted), weight) for source, weight, name in images]
    start = None if init is None else _load_init(init, request.latent_size, untrusted)
    return Job(request, pixels, scale, start)


def run(backend: Backend, job: Job, on_evaluation: Callable[[], object] | None = None,
        on_stage: Callable[[str], None] | None = None) -> Generation:
    """Generate ``job`` on ``backend`` (see ``pipeline.generate``)."""
    from ccld_trt.pipeline import generate

    return generate(backend, job.request, job.image_pixels, job.autoencoder_scale, on_evaluation, on_stage,
                    init_pixels=job.init_pixels)

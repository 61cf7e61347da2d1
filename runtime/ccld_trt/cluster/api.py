"""The cluster's HTTP JSON: a /v1/generate body -> a validated pipeline Request, and images -> the response.

Validation is the library's (``parse_prompt``, ``Request.validate``, the page's image and size limits) plus
JSON types; every problem is one line naming the JSON field.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ccld_trt.export.errors import UserError, first_line
from ccld_trt.image_prompt import load_image_prompt, parse_prompt
from ccld_trt.limits import MAX_BODY_BYTES
from ccld_trt.pipeline import DEFAULT_AUTOENCODER_SCALE, InvalidRequest, Request
from ccld_trt.serve import MAX_IMAGES, MAX_STEPS, MAX_UPLOAD_BYTES, check_image_upload

FIELDS = ("prompts", "image_prompts", "seed", "steps", "method", "eta", "n", "batch_size", "autoencoder_scale",
          "timeout_s", "return_latents")
DEFAULT_TIMEOUT_S = 600.0


class BadRequest(UserError):
    """A /v1/generate body that cannot run, in one line naming the JSON field (HTTP 400)."""


@dataclass(frozen=True)
class Job:
    """A validated /v1/generate body. ``image_pixels``: each image prompt as CLOOB input [1, 3, S, S] in [0, 1]
    with its weight (the Request's image prompt paths are only their names in the body)."""

    request: Request
    image_pixels: list[tuple[torch.Tensor, float]]
    autoencoder_scale: float
    timeout_s: float
    return_latents: bool = False  # also answer the final latents (float32, before the autoencoder scale)


def _integer(body: dict[str, Any], name: str, default: int | None) -> int | None:
    value = body.get(name, default)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise BadRequest(f"{name} must be a whole number, got {value!r}")
    return value


def _number(body: dict[str, Any], name: str, default: float, label: str | None = None) -> float:
    """body[name] as a finite float (``default`` when absent); errors name the field as ``label`` (default name)."""
    value = body.get(name, default)
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        raise BadRequest(f"{label or name} must be a finite number, got {value!r}")
    return float(value)


def _text_prompts(value: Any) -> list[tuple[str, float]]:
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        raise BadRequest(f"prompts must be a list of \"text:weight\" strings, got {value!r}")
    prompts = []
    for i, prompt in enumerate(value):
        try:
            text, weight = parse_prompt(prompt)
        except UserError as e:
            raise BadRequest(f"prompts[{i}]: {e}") from None
        if not text:
            raise BadRequest(f"prompts[{i}] has no text: {prompt!r}")
        prompts.append((text, weight))
    return prompts


def _image_prompts(value: Any, image_size: int) -> list[tuple[torch.Tensor, float]]:
    """[{"image": base64 PNG/JPEG, "weight": w}, ...] -> CLOOB input pixels with weights."""
    if not isinstance(value, list):
        raise BadRequest(f"image_prompts must be a list of {{\"image\": base64, \"weight\": number}}, got {value!r}")
    out = []
    for i, item in enumerate(value):
        name = f"image_prompts[{i}]"
        if not isinstance(item, dict) or not isinstance(item.get("image"), str) or set(item) - {"image", "weight"}:
            raise BadRequest(f"{name} must be {{\"image\": base64 PNG/JPEG, \"weight\": number}}")
        weight = _number(item, "weight", 3.0, f"{name}.weight")
        if len(item["image"]) > MAX_UPLOAD_BYTES * 4 // 3 + 4:
            raise BadRequest(f"{name} is over {MAX_UPLOAD_BYTES // 2**20} MiB")
        try:
            data = base64.b64decode(item["image"], validate=True)
        except (binascii.Error, ValueError):
            raise BadRequest(f"{name}.image is not valid base64") from None
        # the image goes through the same checks and preprocessing as a file given to `sample` or the page
        with tempfile.TemporaryDirectory(prefix="ccld-trt-prompt-") as tmp:
            path = Path(tmp) / "image"
            path.write_bytes(data)
            try:
                check_image_upload(path)
                pixels = load_image_prompt(path, image_size)
            except UserError as e:
                raise BadRequest(f"{name}: {str(e).replace(str(path), 'the image')}") from None
        out.append((pixels, weight))
    return out


def parse_generate(raw: bytes, image_size: int) -> Job:
    """A /v1/generate body -> a Job, or BadRequest naming the first bad field.

    ``image_size``: the CLOOB image encoder's input side (image prompts are preprocessed to it).
    """
    if len(raw) > MAX_BODY_BYTES:
        raise BadRequest(f"the body is {len(raw) / 2**20:.0f} MiB; the limit is {MAX_BODY_BYTES / 2**20:.0f} MiB")
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as e:  # not JSON, nested too deep, an integer of too many digits
        raise BadRequest(f"the body is not valid JSON: {first_line(e)}") from None
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        raise BadRequest(f"unknown field(s) {', '.join(unknown)}; the fields are {', '.join(FIELDS)}")
    prompts = _text_prompts(body.get("prompts", []))
    images = _image_prompts(body.get("image_prompts", []), image_size)
    method = body.get("method", "plms")
    if not isinstance(method, str):
        raise BadRequest(f"method must be a string, got {method!r}")
    steps, n = _integer(body, "steps", 50), _integer(body, "n", 1)
    assert steps is not None and n is not None  # they have defaults
    if steps > MAX_STEPS:
        raise BadRequest(f"steps must be <= {MAX_STEPS}, got {steps}")
    if n > MAX_IMAGES:
        raise BadRequest(f"n must be <= {MAX_IMAGES}, got {n}")
    scale = _number(body, "autoencoder_scale", DEFAULT_AUTOENCODER_SCALE)
    if scale <= 0:
        raise BadRequest(f"autoencoder_scale must be positive, got {scale}")
    timeout = _number(body, "timeout_s", DEFAULT_TIMEOUT_S)
    if timeout <= 0:
        raise BadRequest(f"timeout_s must be positive, got {timeout}")
    request = Request(prompts=prompts, image_prompts=[(Path(f"image_prompts[{i}]"), w) for i, (_, w) in
                                                      enumerate(images)],
                      n=n, batch_size=_integer(body, "batch_size", None), seed=_integer(body, "seed", 0) or 0,
                      steps=steps, method=method, eta=_number(body, "eta", 0.0))
    try:
        request.validate()
    except InvalidRequest as e:
        if e.field == "prompts":
            raise BadRequest("prompts and image_prompts are both empty: give a text or an image prompt") from e
        raise BadRequest(str(e)) from e
    latents = body.get("return_latents", False)
    if not isinstance(latents, bool):
        raise BadRequest(f"return_latents must be true or false, got {latents!r}")
    return Job(request, images, scale, timeout, latents)


def png_base64(pixels: np.ndarray) -> list[str]:
    """uint8 [N, H, W, 3] -> one base64 PNG per image (lossless: decoding gives the same pixels)."""
    out = []
    for image in pixels:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        out.append(base64.b64encode(buffer.getvalue()).decode("ascii"))
    return out


def latents_json(latents: torch.Tensor) -> dict[str, Any]:
    """float32 latents -> {"shape": [...], "float32": base64 of the little-endian bytes, C order}."""
    array = latents.detach().cpu().numpy().astype("<f4")
    return {"shape": list(array.shape), "float32": base64.b64encode(array.tobytes()).decode("ascii")}


def latents_from_json(value: dict[str, Any]) -> np.ndarray:
    """The inverse of ``latents_json``."""
    return np.frombuffer(base64.b64decode(value["float32"]), dtype="<f4").reshape(value["shape"])


def decode_png(data: str) -> np.ndarray:
    """A base64 PNG of the response -> uint8 [H, W, 3] (for clients and tests)."""
    with Image.open(io.BytesIO(base64.b64decode(data))) as image:
        return np.asarray(image.convert("RGB"))

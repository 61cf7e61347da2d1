"""The cluster's HTTP JSON: a /v1/generate body -> a validated Job, and images -> the response.

The body's JSON types are checked here; the rest is the shared assembly's (``jobs.assemble``: prompts, weights,
``Request.validate``, the limits on requests from other people, image checks). Every problem is one line naming
the JSON field.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from ccld_trt import jobs
from ccld_trt.export.errors import UserError, first_line
from ccld_trt.jobs import MAX_UPLOAD_BYTES
from ccld_trt.limits import MAX_BODY_BYTES
from ccld_trt.pipeline import DEFAULT_AUTOENCODER_SCALE, InvalidRequest
from ccld_trt.sampler_names import PRESETS, chosen_preset

FIELDS = ("prompts", "image_prompts", "seed", "steps", "method", "eta", "n", "batch_size", "autoencoder_scale",
          "timeout_s", "return_latents", "init_image", "strength", "fast", "preset")
DEFAULT_TIMEOUT_S = 600.0


class BadRequest(UserError):
    """A /v1/generate body that cannot run, in one line naming the JSON field (HTTP 400)."""


@dataclass(frozen=True)
class Job(jobs.Job):
    """A validated /v1/generate body: the shared assembly's Job (request, image prompt pixels with their
    weights, autoencoder scale) and the API's own settings."""

    timeout_s: float = DEFAULT_TIMEOUT_S
    return_latents: bool = False  # also answer the final latents (float32, before the autoencoder scale)


def _integer(body: dict[str, Any], name: str, default: int | None) -> int | None:
    """body[name] as an int (``default`` when absent); null only where the default is null."""
    value = body.get(name, default)
    if value is None and default is None:
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


def _text_prompts(value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        raise BadRequest(f"prompts must be a list of \"text:weight\" strings, got {value!r}")
    return value


def _image_prompts(value: Any) -> list[tuple[bytes, float]]:
    """[{"image": base64 PNG/JPEG, "weight": w}, ...] -> (encoded image, weight) for the shared assembly."""
    if not isinstance(value, list):
        raise BadRequest(f"image_prompts must be a list of {{\"image\": base64, \"weight\": number}}, got {value!r}")
    out = []
    for i, item in enumerate(value):
        name = f"image_prompts[{i}]"
        if not isinstance(item, dict) or not isinstance(item.get("image"), str) or set(item) - {"image", "weight"}:
            raise BadRequest(f"{name} must be {{\"image\": base64 PNG/JPEG, \"weight\": number}}")
        weight = _number(item, "weight", jobs.DEFAULT_WEIGHT, f"{name}.weight")
        out.append((_image_bytes(item["image"], name, f"{name}.image"), weight))
    return out


def _image_bytes(value: str, name: str, field: str) -> bytes:
    """A base64 image of the body -> its bytes, within MAX_UPLOAD_BYTES; BadRequest naming ``field``."""
    if len(value) > MAX_UPLOAD_BYTES * 4 // 3 + 4:
        raise BadRequest(f"{name} is over {MAX_UPLOAD_BYTES // 2**20} MiB")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"{field} is not valid base64") from None


def _init_fields(body: dict[str, Any]) -> dict[str, Any]:
    """``init_image`` (base64 PNG/JPEG) and ``strength`` -> the shared assembly's ``init`` / ``strength``."""
    if body.get("init_image") is None:
        if "strength" in body:
            raise BadRequest("strength is for image-to-image: give the image to start from as init_image")
        return {}
    if not isinstance(body["init_image"], str):
        raise BadRequest("init_image must be a base64 PNG/JPEG string")
    fields: dict[str, Any] = {"init": _image_bytes(body["init_image"], "init_image", "init_image")}
    if "strength" in body:
        fields["strength"] = _number(body, "strength", 0.0)
    return fields


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
    method = body.get("method", "plms")
    if not isinstance(method, str):
        raise BadRequest(f"method must be a string, got {method!r}")
    steps, n = _integer(body, "steps", 50), _integer(body, "n", 1)
    fast = body.get("fast", False)
    if not isinstance(fast, bool):
        raise BadRequest(f"fast must be true or false, got {fast!r}")
    try:
        preset = chosen_preset(fast, body.get("preset"))
    except UserError as e:
        raise BadRequest(str(e)) from e
    if preset is not None:  # as `ccld-trt sample --preset`: it overrides method and steps
        method, steps = PRESETS[preset]
    timeout = _number(body, "timeout_s", DEFAULT_TIMEOUT_S)
    if timeout <= 0:
        raise BadRequest(f"timeout_s must be positive, got {timeout}")
    latents = body.get("return_latents", False)
    if not isinstance(latents, bool):
        raise BadRequest(f"return_latents must be true or false, got {latents!r}")
    try:
        job = jobs.assemble(
            _text_prompts(body.get("prompts", [])), _image_prompts(body.get("image_prompts", [])),
            image_size=image_size, untrusted=True,
            autoencoder_scale=_number(body, "autoencoder_scale", DEFAULT_AUTOENCODER_SCALE),
            n=n, batch_size=_integer(body, "batch_size", None), seed=_integer(body, "seed", 0), steps=steps,
            method=method, eta=_number(body, "eta", 0.0), **_init_fields(body))
    except InvalidRequest as e:
        if e.field == "prompts":
            raise BadRequest("prompts and image_prompts are both empty: give a text or an image prompt") from e
        raise BadRequest(str(e)) from e
    except BadRequest:
        raise
    except UserError as e:  # a prompt that does not parse, an image that does not load
        raise BadRequest(str(e)) from e
    shared = {f.name: getattr(job, f.name) for f in dataclasses.fields(jobs.Job)}
    return Job(**shared, timeout_s=timeout, return_latents=latents)


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

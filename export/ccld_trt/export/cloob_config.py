"""CLOOB configs: the built-in one and JSON files, validated against cloob-training's schema; read without torch
(the networks themselves are in ``cloob``)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ccld_trt.export.errors import UserError
from ccld_trt.export.graph_specs import CONTEXT_LENGTH, EOT_TOKEN

DEFAULT_CLOOB_CONFIG = "cloob_laion_400m_vit_b_16_16_epochs"
_BUILTIN_DIR = Path(__file__).resolve().parent
_BUILTIN_CONFIGS = (DEFAULT_CLOOB_CONFIG,)

# key -> expected type, per section of the config (same schema as cloob-training's pretrained configs).
_SCHEMA: dict[str, dict[str, type]] = {
    "": {"d_embed": int, "image_encoder": dict, "text_encoder": dict},
    "image_encoder": {"type": str, "image_size": int, "input_channels": int, "normalize": dict,
                      "patch_size": int, "n_layers": int, "d_model": int, "n_heads": int},
    "image_encoder.normalize": {"mean": list, "std": list},
    "text_encoder": {"type": str, "tokenizer": str, "text_size": int, "vocab_size": int,
                     "n_layers": int, "d_model": int, "n_heads": int},
}


def _validate_config(config: Any, source: str) -> dict[str, Any]:
    """Check keys, types and the constraints the original model silently assumes; UserError names ``source``."""
    if not isinstance(config, dict):
        raise UserError(f"CLOOB config {source}: expected a JSON object, got {type(config).__name__}")
    for section, keys in _SCHEMA.items():
        node: Any = config
        for part in filter(None, section.split(".")):
            node = node[part]
        for key, kind in keys.items():
            where = f"{section}.{key}" if section else key
            if key not in node:
                raise UserError(f"CLOOB config {source}: missing key {where!r}")
            value = node[key]
            if kind is int:  # bool is an int subclass, and sizes must be positive
                ok = isinstance(value, int) and not isinstance(value, bool) and value > 0
            else:
                ok = isinstance(value, kind)
            if not ok:
                raise UserError(f"CLOOB config {source}: {where!r} must be a "
                                f"{'positive integer' if kind is int else kind.__name__}, got {value!r}")
    image, text = config["image_encoder"], config["text_encoder"]
    checks = [
        (image["type"] == "ViT", f"image_encoder.type {image['type']!r} is not supported (only 'ViT')"),
        (text["type"] == "transformer",
         f"text_encoder.type {text['type']!r} is not supported (only 'transformer')"),
        (text["tokenizer"] == "clip", f"text_encoder.tokenizer {text['tokenizer']!r} is not supported (only 'clip')"),
        (text["text_size"] == CONTEXT_LENGTH and text["vocab_size"] == EOT_TOKEN + 1,
         f"the CLIP tokenizer needs text_size {CONTEXT_LENGTH} and vocab_size {EOT_TOKEN + 1}"),
        # The haiku original embeds tokens at d_embed width, the torch port at d_model: they must agree.
        (text["d_model"] == config["d_embed"], "text_encoder.d_model must equal d_embed"),
        (image["d_model"] % image["n_heads"] == 0, "image_encoder.d_model must be divisible by n_heads"),
        (text["d_model"] % text["n_heads"] == 0, "text_encoder.d_model must be divisible by n_heads"),
        (image["patch_size"] <= image["image_size"], "image_encoder.patch_size exceeds image_size"),
        (all(len(image["normalize"][k]) == image["input_channels"]
             and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in image["normalize"][k])
             for k in ("mean", "std")),
         "image_encoder.normalize mean/std need one number per input channel"),
        (all(v != 0 for v in image["normalize"]["std"]), "image_encoder.normalize.std must not contain 0"),
    ]
    for ok, problem in checks:
        if not ok:
            raise UserError(f"CLOOB config {source}: {problem}")
    return config


def cloob_image_size(config: Mapping[str, Any]) -> int:
    """The side of the square images the CLOOB image encoder takes (224 for ViT-B/16)."""
    return int(config["image_encoder"]["image_size"])


def load_cloob_config(value: str | Path) -> dict[str, Any]:
    """A CLOOB config from a JSON file, or the built-in ``cloob_laion_400m_vit_b_16_16_epochs``.

    Raises UserError naming the file when it is missing, not JSON, or lacks/mistypes a required key.
    """
    if str(value) in _BUILTIN_CONFIGS:
        path = _BUILTIN_DIR / f"{value}.json"
    else:
        path = Path(value)
        if not path.is_file():
            raise UserError(f"CLOOB config not found: {value} (give a JSON file or the built-in name "
                            f"{DEFAULT_CLOOB_CONFIG!r})")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"CLOOB config {path}: not readable JSON: {e}") from e
    return _validate_config(config, str(path))

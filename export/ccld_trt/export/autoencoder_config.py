"""ldm's autoencoder YAML config, read and checked without torch (the manifest's graph keys read it at every start;
the networks themselves are in ``autoencoder``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeGuard

import yaml

from ccld_trt.export.errors import UserError, first_line, require_file

_WHAT_CONFIG = "autoencoder config"

# ddconfig keys ldm's Encoder/Decoder require, by type.
_INT_KEYS = ("ch", "out_ch", "num_res_blocks", "in_channels", "resolution", "z_channels")
_INT_LIST_KEYS = ("ch_mult", "attn_resolutions")
# ddconfig options this reimplementation does not cover, with the only value it accepts.
_FIXED_OPTIONS = {"double_z": True, "resamp_with_conv": True, "give_pre_end": False, "tanh_out": False,
                  "use_linear_attn": False, "attn_type": "vanilla"}


def _is_int(v: object) -> TypeGuard[int]:
    return isinstance(v, int) and not isinstance(v, bool)


def load_autoencoder_config(yaml_path: Path) -> tuple[int, dict[str, Any]]:
    """Read an ldm-style autoencoder YAML -> (``model.params.embed_dim``, ``model.params.ddconfig``).

    Raises UserError naming the file for unreadable or malformed YAML, missing or mistyped keys, and options
    this decoder does not implement.
    """
    path = require_file(yaml_path, _WHAT_CONFIG)
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError, OSError) as e:
        raise UserError(f"{_WHAT_CONFIG} {path}: not readable YAML: {first_line(e)}") from e
    section = doc.get("model") if isinstance(doc, dict) else None
    params = section.get("params") if isinstance(section, dict) else None
    if not isinstance(params, dict):
        raise UserError(f"{_WHAT_CONFIG} {path}: missing model.params")
    embed_dim, ddconfig = params.get("embed_dim"), params.get("ddconfig")
    if not _is_int(embed_dim):
        raise UserError(f"{_WHAT_CONFIG} {path}: model.params.embed_dim must be an integer, got {embed_dim!r}")
    if not isinstance(ddconfig, dict):
        raise UserError(f"{_WHAT_CONFIG} {path}: missing model.params.ddconfig")
    for key in _INT_KEYS:
        if not _is_int(ddconfig.get(key)):
            raise UserError(f"{_WHAT_CONFIG} {path}: model.params.ddconfig.{key} must be an integer, "
                            f"got {ddconfig.get(key)!r}")
    for key in _INT_LIST_KEYS:
        value = ddconfig.get(key)
        if not isinstance(value, list) or not all(_is_int(v) for v in value):
            raise UserError(f"{_WHAT_CONFIG} {path}: model.params.ddconfig.{key} must be a list of integers, "
                            f"got {value!r}")
    widths = [ddconfig["ch"] * m for m in ddconfig["ch_mult"]]
    if not widths or any(w <= 0 or w % 32 for w in widths):
        raise UserError(f"{_WHAT_CONFIG} {path}: model.params.ddconfig ch × ch_mult gives widths {widths}; "
                        "ldm's GroupNorm needs positive multiples of 32")
    for key, accepted in _FIXED_OPTIONS.items():
        if ddconfig.get(key, accepted) != accepted:
            raise UserError(f"{_WHAT_CONFIG} {path}: model.params.ddconfig.{key}={ddconfig[key]!r} is not "
                            f"supported (only {accepted!r})")
    return embed_dim, dict(ddconfig)

"""Synthetic checkpoints in the original file formats, so the whole pipeline runs without real weights.

The weights are random (numpy's legacy ``RandomState``, a stream numpy keeps stable across releases), seeded per
tensor from the seed and the tensor's name, and scaled by fan-in so activations stay O(1) through deep stacks.
This is the same scheme as the reference kit's synthetic checkpoints, so seed 3 at the ``small`` size gives the
files the golden outputs were computed from. The images they make are noise-like patterns, not paintings.
"""

from __future__ import annotations

import json
import pickle
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ccld_trt.export.autoencoder import autoencoder_state_shapes
from ccld_trt.export.cloob import cloob_param_shapes
from ccld_trt.export.cloob_config import load_cloob_config
from ccld_trt.export.errors import UserError
from ccld_trt.export.models import DEMO_MARKER
from ccld_trt.export.unet import unet_state_shapes

Shape = tuple[int, ...]

SMALL_AE: dict[str, Any] = {
    "double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 32,
    "ch_mult": [1, 2, 4, 4], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}
KL_F8_AE = {**SMALL_AE, "ch": 128, "num_res_blocks": 2}
SMALL_CLOOB: dict[str, Any] = {
    "d_embed": 512, "inv_tau": 30.0, "scale_hopfield": 15.0,
    "image_encoder": {"type": "ViT", "image_size": 64, "input_channels": 3,
                      "normalize": {"mean": [0.48145466, 0.4578275, 0.40821073],
                                    "std": [0.26862954, 0.26130258, 0.27577711]},
                      "patch_size": 16, "n_layers": 1, "d_model": 64, "n_heads": 2},
    "text_encoder": {"type": "transformer", "tokenizer": "clip", "text_size": 77, "vocab_size": 49408,
                     "n_layers": 1, "d_model": 512, "n_heads": 8},
}
# per size: U-Net width and multipliers, autoencoder ddconfig
SIZES: dict[str, tuple[int, list[int], dict[str, Any]]] = {
    "small": (64, [1, 1, 2, 2], SMALL_AE),
    "full": (192, [1, 1, 2, 2], KL_F8_AE),
}

AE_YAML = """\
model:
  target: ldm.models.autoencoder.AutoencoderKL
  params:
    embed_dim: 4
    lossconfig:
      target: torch.nn.Identity
    ddconfig:
{ddconfig}
"""


def init_tensor(name: str, shape: Shape, seed: int) -> np.ndarray:
    """Deterministic random values for the tensor ``name`` (torch 'a.b.weight' or haiku 'mod.sub.w' style)."""
    rng = np.random.RandomState((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**32)
    leaf = name.rsplit(".", 1)[-1]
    if len(shape) == 0:
        return np.array(1.0, dtype=np.float32)
    if leaf == "scale" or (leaf == "weight" and len(shape) == 1):  # norm gains
        return (1.0 + 0.05 * rng.standard_normal(shape)).astype(np.float32)
    if leaf in ("bias", "b", "offset", "embeddings") or "pos_embed" in name or "class_embed" in name:
        return (0.02 * rng.standard_normal(shape)).astype(np.float32)
    if "timestep_embed" in name:  # Fourier features: std 1, as the original initialises them
        return rng.standard_normal(shape).astype(np.float32)
    # haiku 'w' is [in, out] or HWIO; torch weights are [out, in, ...]
    fan_in = int(np.prod(shape[:-1])) if leaf == "w" else (int(np.prod(shape[1:])) if len(shape) > 1 else shape[0])
    return (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)


def _torch_state(shapes: Mapping[str, Shape], seed: int) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(init_tensor(k, tuple(s), seed)) for k, s in shapes.items()}


def _haiku_params(spec: Mapping[str, Mapping[str, Shape]], seed: int) -> dict[str, dict[str, np.ndarray]]:
    return {mod: {p: init_tensor(f"{mod}/{p}".replace("/", "."), tuple(s), seed) for p, s in ps.items()}
            for mod, ps in spec.items()}


def _yaml_ddconfig(ddconfig: Mapping[str, object]) -> str:
    def fmt(v: object) -> str:
        return str(v).lower() if isinstance(v, bool) else str(v)
    return "\n".join(f"      {k}: {fmt(v)}" for k, v in ddconfig.items())


def write_demo_weights(out_dir: Path, size: str = "small", seed: int = 0) -> list[Path]:
    """Write model_student.ckpt, ae_model.ckpt/.yaml, cloob_config.json and cloob.pkl into ``out_dir``.

    Refuses to overwrite existing files. Returns the paths written.
    """
    if size not in SIZES:
        raise UserError(f"unknown demo size {size!r}; choose from {', '.join(SIZES)}")
    out_dir = Path(out_dir)
    names = ["model_student.ckpt", "ae_model.ckpt", "ae_model.yaml", "cloob_config.json", "cloob.pkl", DEMO_MARKER]
    existing = [n for n in names if (out_dir / n).exists()]
    if existing:
        raise UserError(f"{out_dir} already holds {', '.join(existing)}; refusing to overwrite (choose another DIR)")
    out_dir.mkdir(parents=True, exist_ok=True)
    base, mults, ddconfig = SIZES[size]
    unet = _torch_state(unet_state_shapes(base, mults), seed)
    unet["autoencoder_scale"] = torch.tensor(2.55)  # what the published student stores
    torch.save(unet, out_dir / "model_student.ckpt")
    ae = _torch_state(autoencoder_state_shapes(4, ddconfig), seed)
    torch.save({"state_dict": ae}, out_dir / "ae_model.ckpt")
    (out_dir / "ae_model.yaml").write_text(AE_YAML.format(ddconfig=_yaml_ddconfig(ddconfig)), encoding="utf-8")
    cloob_cfg = SMALL_CLOOB if size == "small" else {
        k: v for k, v in load_cloob_config("cloob_laion_400m_vit_b_16_16_epochs").items() if k != "url"}
    (out_dir / "cloob_config.json").write_text(json.dumps(cloob_cfg, indent=1), encoding="utf-8")
    image_spec, text_spec = cloob_param_shapes(cloob_cfg)
    params = (_haiku_params(image_spec, seed), _haiku_params(text_spec, seed))
    with open(out_dir / "cloob.pkl", "wb") as f:
        pickle.dump({"params": params, "epoch": 16}, f)
    (out_dir / DEMO_MARKER).write_text(
        f"RANDOM DEMO WEIGHTS (size {size}, seed {seed}) written by `ccld-trt demo-weights`.\n"
        "They exercise the whole pipeline but make noise-like images, not paintings.\n"
        "Run `ccld-trt download` for the real huggan/distill-ccld-wa weights.\n", encoding="utf-8")
    return [out_dir / n for n in names]

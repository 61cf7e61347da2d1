"""CLOOB text and image encoders (torch), numerically matching cloob-training's ``model_pt`` port.

Both are pre-LayerNorm transformers whose first token, projected to ``d_embed``, is L2-normalised. The
modules are written for ``torch.onnx.export`` with a dynamic batch dimension: nothing depends on the batch
size as a Python int.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ccld_trt.export.checkpoints import standard_normal
from ccld_trt.export.cloob_pickle import WHAT, ParamShapes, haiku_to_torch, read_cloob_params


def cloob_param_shapes(config: Mapping[str, Any]) -> tuple[ParamShapes, ParamShapes]:
    """Haiku parameter shapes of a CLOOB checkpoint: (image_params, text_params) as {module: {param: shape}}.

    Module paths and layouts are the original's: linear ``w`` [in, out] with ``b`` [out], patch conv ``w``
    HWIO, LayerNorm ``scale``/``offset``, the ViT class embedding at the encoder's root module.
    """
    d_embed = config["d_embed"]

    def encoder(base: str, n_layers: int, d: int) -> ParamShapes:
        shapes: ParamShapes = {}
        for i in range(n_layers):
            layer = f"{base}/layer_{i}"
            shapes[f"{layer}/self_attention/layer_norm"] = {"scale": (d,), "offset": (d,)}
            shapes[f"{layer}/feed_forward/layer_norm"] = {"scale": (d,), "offset": (d,)}
            for proj in ("query", "key", "value", "linear"):
                shapes[f"{layer}/self_attention/multi_head_attention/{proj}"] = {"w": (d, d), "b": (d,)}
            shapes[f"{layer}/feed_forward/linear_0"] = {"w": (d, 4 * d), "b": (4 * d,)}
            shapes[f"{layer}/feed_forward/linear_1"] = {"w": (4 * d, d), "b": (d,)}
        shapes[f"{base}/proj"] = {"w": (d, d_embed), "b": (d_embed,)}
        return shapes

    img = config["image_encoder"]
    d_img, patch = img["d_model"], img["patch_size"]
    n_patches = (img["image_size"] // patch) ** 2
    image: ParamShapes = {
        "vi_t_image_encoder": {"class_embed": (d_img,)},
        "vi_t_image_encoder/embed": {"w": (patch, patch, img["input_channels"], d_img)},
        "vi_t_image_encoder/pos_embed": {"w": (n_patches + 1, d_img)},
        **encoder("vi_t_image_encoder", img["n_layers"], d_img),
    }
    txt = config["text_encoder"]
    text: ParamShapes = {
        "text_encoder/embed": {"embeddings": (txt["vocab_size"], d_embed)},
        "text_encoder/pos_embed": {"w": (txt["text_size"], txt["d_model"])},
        **encoder("text_encoder", txt["n_layers"], txt["d_model"]),
    }
    return image, text


class PositionalEmbedding(nn.Module):
    """Learned absolute positions added to a [N, S, D] sequence (parameter ``weight`` [S, D])."""

    def __init__(self, seq_len: int, d_model: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(seq_len, d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.weight


class SelfAttention(nn.Module):
    """Pre-norm multi-head self-attention with CLOOB's query-axis padding mask."""

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.query = nn.Linear(d_model, d_model)
        self.key = nn.Linear(d_model, d_model)
        self.value = nn.Linear(d_model, d_model)
        self.out = nn.Linear(d_model, d_model)
        self.n_heads = n_heads
        self.head_size = d_model // n_heads

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """x: float [N, S, D]; keep: bool [N, S], the positions up to and including the first EOT."""
        x = self.norm(x)
        # [N, S, D] -> [N, heads, S, head_size]
        q, k, v = (proj(x).unflatten(-1, (self.n_heads, self.head_size)).transpose(1, 2)
                   for proj in (self.query, self.key, self.value))
        logits = q @ k.transpose(-1, -2) / math.sqrt(self.head_size)
        if keep is not None:
            # The original masks the QUERY axis (a known bug, kept for fidelity): rows of positions after
            # the first EOT are set to -1e30, so they attend uniformly to every position, while the kept
            # rows still attend to the padding. Any constant row gives exactly the same uniform softmax; 0
            # also stays finite in fp16, where -1e30 would turn into -inf and the softmax into NaN.
            logits = torch.where(keep[:, None, :, None], logits, torch.zeros((), dtype=logits.dtype))
        attn = logits.softmax(-1) @ v
        return self.out(attn.transpose(1, 2).flatten(2))


class FeedForward(nn.Module):
    """Pre-norm MLP with exact (erf) GELU, as the torch port uses (the haiku original used tanh GELU)."""

    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.linear_0 = nn.Linear(d_model, d_ff)
        self.linear_1 = nn.Linear(d_ff, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_1(F.gelu(self.linear_0(self.norm(x))))


class EncoderLayer(nn.Module):
    """Residual pre-norm transformer block."""

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.attn = SelfAttention(d_model, n_heads)
        self.ff = FeedForward(d_model, 4 * d_model)

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(x, keep)
        return x + self.ff(x)


class CLOOBTextEncoder(nn.Module):
    """CLOOB text tower: CLIP token ids -> unit-norm text embedding.

    forward: tokens int64 [N, 77] (``ccld_trt.tokenizer.tokenize``) -> float32 [N, d_embed], L2-normalised
    (the original ``text_encoder`` normalises its output itself).
    """

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__()
        cfg = config["text_encoder"]
        self.context_length: int = cfg["text_size"]
        self.eot_token: int = cfg["vocab_size"] - 1
        self.embed = nn.Embedding(cfg["vocab_size"], cfg["d_model"],
                                  _weight=standard_normal(cfg["vocab_size"], cfg["d_model"]))  # its own init
        self.pos_embed = PositionalEmbedding(cfg["text_size"], cfg["d_model"])
        self.layers = nn.ModuleList(EncoderLayer(cfg["d_model"], cfg["n_heads"]) for _ in range(cfg["n_layers"]))
        self.proj = nn.Linear(cfg["d_model"], config["d_embed"])

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(self.context_length, device=tokens.device)
        # Index of the first EOT, or the sequence length when there is none (then every position is kept,
        # as in the original's cumsum-based mask).
        first_eot = torch.where(tokens == self.eot_token, positions, self.context_length).amin(-1, keepdim=True)
        keep = positions <= first_eot
        x = self.pos_embed(self.embed(tokens))
        for layer in self.layers:
            x = layer(x, keep)
        return F.normalize(self.proj(x[:, 0]), dim=-1)


class CLOOBImageEncoder(nn.Module):
    """CLOOB ViT image tower, with the CLOOB pixel normalisation built in.

    forward: pixels float32 [N, C, S, S] in [0, 1], S = config image_size -> float32 [N, d_embed], L2-normalised.
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__()
        cfg = config["image_encoder"]
        d, patch = cfg["d_model"], cfg["patch_size"]
        self.image_size: int = cfg["image_size"]
        self.register_buffer("mean", torch.empty(1, len(cfg["normalize"]["mean"]), 1, 1), persistent=False)
        self.register_buffer("std", torch.empty(1, len(cfg["normalize"]["std"]), 1, 1), persistent=False)
        self.set_normalization(config)
        self.embed = nn.Conv2d(cfg["input_channels"], d, patch, stride=patch, bias=False)
        self.class_embed = nn.Parameter(torch.zeros(d))
        self.pos_embed = PositionalEmbedding((cfg["image_size"] // patch) ** 2 + 1, d)
        self.layers = nn.ModuleList(EncoderLayer(d, cfg["n_heads"]) for _ in range(cfg["n_layers"]))
        self.proj = nn.Linear(d, config["d_embed"])

    def set_normalization(self, config: Mapping[str, Any]) -> None:
        """The pixel mean/std buffers [1, C, 1, 1] from ``config`` (not in the state dict), on the CPU: also for a
        tower built on the meta device and given its tensors by ``load_state_dict(assign=True)``."""
        norm = config["image_encoder"]["normalize"]
        self.mean = torch.tensor(norm["mean"], device="cpu").view(1, -1, 1, 1)
        self.std = torch.tensor(norm["std"], device="cpu").view(1, -1, 1, 1)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.embed((pixels - self.mean) / self.std)
        x = x.flatten(2).transpose(1, 2)  # [N, D, h, w] -> [N, h*w, D]
        cls = self.class_embed.expand(x.shape[0], 1, -1)
        x = self.pos_embed(torch.cat([cls, x], dim=1))
        for layer in self.layers:
            x = layer(x)
        # The ViT normalises its output and cfg_sample normalises it again; doing both keeps the result
        # bit-identical to the pipeline's (a single pass differs by ~1e-7).
        return F.normalize(F.normalize(self.proj(x[:, 0]), dim=-1), dim=-1)


def load_cloob(pkl_path: str | Path,
               config: Mapping[str, Any]) -> tuple[CLOOBTextEncoder, CLOOBImageEncoder]:
    """Both CLOOB towers from a haiku pickle, in eval mode, fp32, without gradients.

    ``config`` is a validated dict from ``load_cloob_config``. Raises UserError for a missing, corrupt,
    hostile or mismatched checkpoint (see ``cloob_pickle.read_cloob_params``). The towers' tensors come from the
    pickle's converted safetensors copy (weights_cache: made on the first load, used while the pickle's SHA-256 is
    the one it records), mapped, not copied; the modules are built without random init.
    """
    from ccld_trt.export.weights_cache import converted

    path = Path(pkl_path)

    def convert() -> dict[str, torch.Tensor]:
        image_params, text_params = read_cloob_params(path, cloob_param_shapes(config))
        image_state, text_state = haiku_to_torch(image_params, text_params)
        return {**{f"{_IMAGE}{k}": v for k, v in image_state.items()},
                **{f"{_TEXT}{k}": v for k, v in text_state.items()}}

    state = converted(path, WHAT, convert)
    with torch.device("meta"):
        text, image = CLOOBTextEncoder(config), CLOOBImageEncoder(config)
    for prefix, tower in ((_TEXT, text), (_IMAGE, image)):
        tower_state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        tower.load_state_dict(tower_state, strict=True, assign=True)
    image.set_normalization(config)  # not in the state dict: from the config
    return text.eval().requires_grad_(False), image.eval().requires_grad_(False)


_TEXT, _IMAGE = "text.", "image."

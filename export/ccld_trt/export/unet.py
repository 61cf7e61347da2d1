"""The CCLD latent diffusion U-Net (JD-P's ``DiffusionModel``), rebuilt so its state dict loads unchanged.

Module nesting mirrors the original exactly, because the checkpoint's key names (``net.4.main.9.main.1...``)
are the module path. Two things differ from the original code, neither changing the math:

* the conditioning vector is passed down explicitly instead of through a shared mutable dict, and
* tensor shapes stay symbolic (``expand``/``flatten``/``reshape_as`` instead of ``repeat``/``view`` with
  Python ints), so the module exports to ONNX with dynamic batch, height and width.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ccld_trt.export.checkpoints import load_state_into, standard_normal
from ccld_trt.export.errors import UserError
from ccld_trt.export.weights_cache import load_weights

EMBED_DIM = 512  # CLOOB embedding width
COND_DIM = 1024  # output width of the mapping network, fed to every Modulation2d
HEAD_DIM = 64  # the original gives every attention layer width // 64 heads
_WHAT = "U-Net checkpoint"

# Both published models (student and teacher) are described with base 192; see infer_unet_config.
_PUBLISHED_BASE = 192

# The first conv weight of each of the four U-Net levels; its output width is the level's channel count.
_LEVEL_CONV_KEYS = (
    "net.0.main.0.weight",
    "net.4.main.1.main.0.weight",
    "net.4.main.9.main.1.main.0.weight",
    "net.4.main.9.main.9.main.1.main.0.weight",
)


class Conditioned(nn.Module):
    """Marker base class: ``forward(x, cond)`` takes the mapping network's output ``cond`` [N, 1024]."""


class CondSequential(nn.Sequential):
    """``nn.Sequential`` that hands ``cond`` to the layers that need it (same child indices, same keys)."""

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, cond) if isinstance(layer, Conditioned) else layer(x)
        return x


class ResLinearBlock(nn.Module):
    """Residual MLP block of the mapping network: ``main`` (Linear, ReLU, Linear, ReLU?) plus a skip."""

    def __init__(self, f_in: int, f_mid: int, f_out: int, is_last: bool = False) -> None:
        super().__init__()
        self.main = nn.Sequential(
            nn.Linear(f_in, f_mid),
            nn.ReLU(),
            nn.Linear(f_mid, f_out),
            nn.Identity() if is_last else nn.ReLU(),
        )
        self.skip = nn.Identity() if f_in == f_out else nn.Linear(f_in, f_out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x) + self.skip(x)


class Modulation2d(Conditioned):
    """FiLM: ``x * (1 + scale) + shift`` with per-channel scale and shift projected from ``cond``."""

    def __init__(self, c_out: int) -> None:
        super().__init__()
        self.layer = nn.Linear(COND_DIM, c_out * 2, bias=False)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        scales, shifts = self.layer(cond).chunk(2, dim=-1)
        # addcmul rather than a multiply and an add, as the original, so the kernel and its rounding match.
        return torch.addcmul(shifts[..., None, None], x, scales[..., None, None] + 1)


class ResModConvBlock(Conditioned):
    """Two 3x3 convs, each followed by GroupNorm(1) without affine, modulation and ReLU (the last block of
    the U-Net drops those three after its second conv); 1x1 conv skip when the width changes."""

    def __init__(self, c_in: int, c_mid: int, c_out: int, is_last: bool = False) -> None:
        super().__init__()
        self.main = CondSequential(
            nn.Conv2d(c_in, c_mid, 3, padding=1),
            nn.GroupNorm(1, c_mid, affine=False),
            Modulation2d(c_mid),
            nn.ReLU(),
            nn.Conv2d(c_mid, c_out, 3, padding=1),
            nn.Identity() if is_last else nn.GroupNorm(1, c_out, affine=False),
            nn.Identity() if is_last else Modulation2d(c_out),
            nn.Identity() if is_last else nn.ReLU(),
        )
        self.skip = nn.Identity() if c_in == c_out else nn.Conv2d(c_in, c_out, 1, bias=False)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.main(x, cond) + self.skip(x)


class SkipBlock(Conditioned):
    """One U-Net level below the current one: ``cat([main(x), x], dim=1)``."""

    def __init__(self, *layers: nn.Module) -> None:
        super().__init__()
        self.main = CondSequential(*layers)
        self.skip = nn.Identity()

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.main(x, cond), self.skip(x)], dim=1)


class FourierFeatures(nn.Module):
    """Random Fourier features of ``t``: [N, 1] -> [N, out_features] = cat(cos, sin) of 2π t Wᵀ."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        # A parameter (not a buffer) in the original, so it is in the state dict; it is never trained.
        self.weight = nn.Parameter(standard_normal(out_features // 2, in_features), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = 2 * math.pi * x @ self.weight.T
        return torch.cat([f.cos(), f.sin()], dim=-1)


class SelfAttention2d(nn.Module):
    """Multi-head self-attention over all pixels, pre-norm (GroupNorm(1)), residual."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.n_head = channels // HEAD_DIM
        self.head_dim = channels // self.n_head
        self.norm = nn.GroupNorm(1, channels)
        self.qkv_proj = nn.Conv2d(channels, channels * 3, 1)
        self.out_proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv_proj(self.norm(x))
        # [N, 3C, H, W] -> [N, 3 * heads, H*W, head_dim]; q, k, v are consecutive groups of heads.
        qkv = qkv.flatten(2).unflatten(1, (3 * self.n_head, self.head_dim)).transpose(2, 3)
        q, k, v = qkv.chunk(3, dim=1)
        # The original scales q and k by head_dim ** -0.25 each rather than the product once.
        scale = self.head_dim**-0.25
        att = ((q * scale) @ (k.transpose(2, 3) * scale)).softmax(3)
        y = (att @ v).transpose(2, 3).reshape_as(x)
        return x + self.out_proj(y)


def level_widths(base_channels: int, channel_multipliers: Sequence[int]) -> list[int]:
    """Channel count of each of the 4 levels; ValueError if the original could not build them."""
    if len(channel_multipliers) != 4:
        raise ValueError(f"need 4 channel multipliers, got {len(channel_multipliers)}")
    widths = [base_channels * m for m in channel_multipliers]
    for w in widths:
        # Attention uses w // 64 heads, which must be at least one and divide w.
        if w < HEAD_DIM or w % (w // HEAD_DIM):
            raise ValueError(f"level width {w} (base_channels × multiplier) does not split into "
                             f"{HEAD_DIM}-wide attention heads")
    return widths


class DiffusionModel(nn.Module):
    """The CCLD U-Net: ``forward(x, t, embed) -> v``.

    ``channel_multipliers`` (4 of them) times ``base_channels`` give the widths of the four levels
    (student: 192, [1, 1, 2, 2]; teacher: 192, [4, 4, 8, 8]). Weights start untrained: load a checkpoint.
    """

    autoencoder_scale: torch.Tensor

    def __init__(self, base_channels: int, channel_multipliers: Sequence[int]) -> None:
        super().__init__()
        c0, c1, c2, c3 = level_widths(base_channels, channel_multipliers)
        self.mapping_timestep_embed = FourierFeatures(1, 128)
        self.mapping = nn.Sequential(
            ResLinearBlock(EMBED_DIM + 128, 1024, COND_DIM),
            ResLinearBlock(COND_DIM, 1024, COND_DIM, is_last=True),
        )
        # The latent scale the model was trained with; the original demo ignores it and decodes with 2.55.
        self.register_buffer("autoencoder_scale", torch.tensor(1.0))
        self.timestep_embed = FourierFeatures(1, 16)

        block = ResModConvBlock
        down = nn.AvgPool2d(2)
        up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)

        def attn_blocks(c_in: int, c_out: int, n: int) -> list[nn.Module]:
            """n (conv block, attention) pairs at width c_in, the last one ending at c_out."""
            layers: list[nn.Module] = []
            for i in range(n):
                c = c_out if i == n - 1 else c_in
                layers += [block(c_in, c_in, c), SelfAttention2d(c)]
            return layers

        level3 = SkipBlock(down, block(c2, c3, c3), SelfAttention2d(c3), *attn_blocks(c3, c2, 7), up)
        level2 = SkipBlock(down, block(c1, c2, c2), SelfAttention2d(c2), *attn_blocks(c2, c2, 3),
                           level3, block(c2 * 2, c2, c2), SelfAttention2d(c2), *attn_blocks(c2, c1, 3), up)
        level1 = SkipBlock(down, block(c0, c1, c1), SelfAttention2d(c1), *attn_blocks(c1, c1, 3),
                           level2, block(c1 * 2, c1, c1), SelfAttention2d(c1), *attn_blocks(c1, c0, 3), up)
        self.net = CondSequential(
            block(4 + 16, c0, c0), block(c0, c0, c0), block(c0, c0, c0), block(c0, c0, c0),
            level1,
            block(c0 * 2, c0, c0), block(c0, c0, c0), block(c0, c0, c0), block(c0, c0, 4, is_last=True),
        )

    def forward(self, x: torch.Tensor, t: torch.Tensor, embed: torch.Tensor) -> torch.Tensor:
        """x float32 [N, 4, H, W] (H, W divisible by 8), t float32 [N] in [0, 1], embed float32 [N, 512]
        (any norm; all-zero for the unconditional branch) -> predicted velocity v float32 [N, 4, H, W]."""
        embed = F.normalize(embed, dim=-1) * EMBED_DIM**0.5
        cond = self.mapping(torch.cat([embed, self.mapping_timestep_embed(t[:, None])], dim=1))
        planes = self.timestep_embed(t[:, None])[..., None, None].expand(-1, -1, x.shape[2], x.shape[3])
        return self.net(torch.cat([x, planes], dim=1), cond)


def _meta_model(base_channels: int, channel_multipliers: Sequence[int]) -> DiffusionModel:
    with torch.device("meta"):
        return DiffusionModel(base_channels, channel_multipliers)


def unet_state_shapes(base_channels: int, channel_multipliers: Sequence[int]) -> dict[str, tuple[int, ...]]:
    """State-dict key -> shape of ``DiffusionModel(base_channels, channel_multipliers)``, without allocating."""
    model = _meta_model(base_channels, channel_multipliers)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def infer_unet_config(state: Mapping[str, torch.Tensor]) -> tuple[int, list[int]]:
    """(base_channels, channel_multipliers) of the U-Net whose state dict is ``state``, from tensor shapes.

    Only the products base × multiplier (the level widths) are recorded in the weights. The base is taken as
    192 when 192 divides every width (so the published student and teacher come out as (192, [1, 1, 2, 2])
    and (192, [4, 4, 8, 8])), else the greatest common divisor of the widths.
    Raises UserError (without a file name: the caller adds it) if the tensors do not look like this U-Net.
    """
    widths: list[int] = []
    for key in _LEVEL_CONV_KEYS:
        if key not in state:
            raise UserError(f"not a CCLD U-Net state dict: missing tensor {key}")
        shape = tuple(state[key].shape)
        if len(shape) != 4 or shape[2:] != (3, 3):
            raise UserError(f"not a CCLD U-Net state dict: tensor {key} has shape {list(shape)}, "
                            "expected a 3x3 conv weight")
        widths.append(shape[0])
    base = _PUBLISHED_BASE if all(w % _PUBLISHED_BASE == 0 for w in widths) else math.gcd(*widths)
    multipliers = [w // base for w in widths]
    try:
        level_widths(base, multipliers)
    except ValueError as e:
        raise UserError(f"not a CCLD U-Net state dict: {e}") from e
    return base, multipliers


def load_unet(path: Path, base_channels: int | None = None,
              channel_multipliers: Sequence[int] | None = None) -> tuple[DiffusionModel, float]:
    """Load a U-Net checkpoint (a plain state dict) -> (eval-mode float32 CPU model, stored autoencoder_scale).

    ``base_channels`` / ``channel_multipliers`` override what the tensor shapes imply; a checkpoint that does
    not match them is reported tensor by tensor (UserError).
    """
    state = load_weights(path, _WHAT)
    if base_channels is None or channel_multipliers is None:
        try:
            inferred_base, inferred_multipliers = infer_unet_config(state)
        except UserError as e:
            raise UserError(f"{_WHAT} {path}: {e}") from e
        base_channels = inferred_base if base_channels is None else base_channels
        channel_multipliers = inferred_multipliers if channel_multipliers is None else channel_multipliers
    try:
        model = _meta_model(base_channels, channel_multipliers)
    except ValueError as e:
        raise UserError(f"U-Net base channels {base_channels} × multipliers {list(channel_multipliers)}: {e}") \
            from e
    load_state_into(model, state, path, _WHAT)  # the meta model takes the checkpoint's tensors themselves
    return model.eval().requires_grad_(False), float(model.autoencoder_scale)

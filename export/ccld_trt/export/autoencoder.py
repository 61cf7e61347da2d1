"""ldm's ``AutoencoderKL`` as two modules: the decoding half (``post_quant_conv`` then ``Decoder``) and the
encoding half (``Encoder`` then ``quant_conv``, to the posterior mean: image-to-image's start), loading the
original checkpoints unchanged (their YAML config is read by ``autoencoder_config``).

Sub-module names mirror ldm's (``decoder.up.3.block.0.nin_shortcut``...) because they are the state-dict keys.
Shapes stay symbolic in ``forward`` so both halves export to ONNX with dynamic batch, height and width.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ccld_trt.export.autoencoder_config import load_autoencoder_config as load_autoencoder_config
from ccld_trt.export.checkpoints import load_state_into
from ccld_trt.export.weights_cache import load_weights

_WHAT = "autoencoder checkpoint"


def swish(x: torch.Tensor) -> torch.Tensor:
    """ldm's nonlinearity, written as it does (x * sigmoid(x)) so the rounding matches."""
    return x * torch.sigmoid(x)


def group_norm(channels: int) -> nn.GroupNorm:
    """ldm's ``Normalize``: 32 groups, eps 1e-6, affine."""
    return nn.GroupNorm(32, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """norm, swish, 3x3 conv, twice, plus a skip (1x1 ``nin_shortcut`` when the width changes).

    ldm's dropout sits between the second swish and conv; it is the identity at inference, so it is left out.
    """

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.norm1 = group_norm(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = group_norm(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(swish(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels (ldm's "vanilla" attention), residual."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = group_norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)
        self.scale = channels**-0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        q = self.q(h).flatten(2).transpose(1, 2)  # [N, HW, C]
        k = self.k(h).flatten(2)  # [N, C, HW]
        v = self.v(h).flatten(2)  # [N, C, HW]
        # Scaled after the product, as ldm does.
        w = torch.softmax(torch.bmm(q, k) * self.scale, dim=2)  # [N, HW (query), HW (key)]
        h = torch.bmm(v, w.transpose(1, 2)).reshape_as(x)
        return x + self.proj_out(h)


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(nn.functional.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Mid(nn.Module):
    """The middle of the encoder and decoder: resnet block, attention, resnet block."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class _Level(nn.Module):
    """One resolution level: ``block`` (resnet blocks) and ``attn`` (one after each block, or none)."""

    def __init__(self, blocks: list[ResnetBlock], attn: bool) -> None:
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList([AttnBlock(b.conv2.out_channels) for b in blocks] if attn else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            x = block(x)
            if self.attn:
                x = self.attn[i](x)
        return x


class _UpLevel(_Level):
    """A decoder level, then ``upsample`` (the identity, without parameters, at full resolution)."""

    def __init__(self, blocks: list[ResnetBlock], attn: bool, upsample: nn.Module) -> None:
        super().__init__(blocks, attn)
        self.upsample = upsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.upsample(super().forward(x))


class Downsample(nn.Module):
    """ldm's ``Downsample``: pad right and bottom by one (zeros), then a stride-2 3x3 conv: [N, C, H, W] ->
    [N, C, H/2, W/2] for even H, W."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(nn.functional.pad(x, (0, 1, 0, 1)))


class Decoder(nn.Module):
    """ldm's ``Decoder``: z [N, z_channels, h, w] -> image [N, out_ch, h·2^(L-1), w·2^(L-1)], L = len(ch_mult).

    The middle block always has an attention layer; ``attn_resolutions`` adds more (none for kl-f8).
    """

    def __init__(self, ddconfig: Mapping[str, Any]) -> None:
        super().__init__()
        ch, ch_mult, n_blocks = ddconfig["ch"], list(ddconfig["ch_mult"]), ddconfig["num_res_blocks"]
        c = ch * ch_mult[-1]
        res = ddconfig["resolution"] // 2 ** (len(ch_mult) - 1)
        self.conv_in = nn.Conv2d(ddconfig["z_channels"], c, 3, padding=1)
        self.mid = _Mid(c)
        levels: list[_Level] = []
        # Built from the lowest resolution up, but indexed by level (up.0 is the full resolution), as ldm.
        for i in reversed(range(len(ch_mult))):
            c_out = ch * ch_mult[i]
            blocks = [ResnetBlock(c if j == 0 else c_out, c_out) for j in range(n_blocks + 1)]
            upsample = Upsample(c_out) if i != 0 else nn.Identity()
            levels.insert(0, _UpLevel(blocks, res in ddconfig["attn_resolutions"], upsample))
            c = c_out
            if i != 0:
                res *= 2
        self.up = nn.ModuleList(levels)
        self.norm_out = group_norm(c)
        self.conv_out = nn.Conv2d(c, ddconfig["out_ch"], 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(swish(self.norm_out(h)))


class Encoder(nn.Module):
    """ldm's ``Encoder``: image [N, in_channels, H, W] -> moments [N, 2·z_channels, H/2^(L-1), W/2^(L-1)],
    L = len(ch_mult) (double_z: mean and log-variance stacked on the channel axis)."""

    def __init__(self, ddconfig: Mapping[str, Any]) -> None:
        super().__init__()
        ch, ch_mult, n_blocks = ddconfig["ch"], list(ddconfig["ch_mult"]), ddconfig["num_res_blocks"]
        self.conv_in = nn.Conv2d(ddconfig["in_channels"], ch, 3, padding=1)
        c, res = ch, ddconfig["resolution"]
        levels: list[_Level] = []
        for i, m in enumerate(ch_mult):
            blocks = [ResnetBlock(c if j == 0 else ch * m, ch * m) for j in range(n_blocks)]
            c = ch * m
            level = _Level(blocks, res in ddconfig["attn_resolutions"])
            if i != len(ch_mult) - 1:
                level.downsample = Downsample(c)
                res //= 2
            levels.append(level)
        self.down = nn.ModuleList(levels)
        self.mid = _Mid(c)
        self.norm_out = group_norm(c)
        self.conv_out = nn.Conv2d(c, 2 * ddconfig["z_channels"], 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
            downsample = getattr(level, "downsample", None)  # every level but the lowest resolution has one
            if downsample is not None:
                h = downsample(h)
        h = self.mid(h)
        return self.conv_out(swish(self.norm_out(h)))


class AutoencoderEncoder(nn.Module):
    """``AutoencoderKL.encode(x).mean``: images float32 [N, in_channels, H, W] in [-1, 1] (H, W multiples of 8
    for kl-f8) -> the posterior's mean [N, embed_dim, H/8, W/8] (deterministic: no sample is drawn), before the
    latent scale (the pipeline divides by the scale the decoder's input is multiplied by)."""

    def __init__(self, embed_dim: int, ddconfig: Mapping[str, Any]) -> None:
        super().__init__()
        self.encoder = Encoder(ddconfig)
        self.quant_conv = nn.Conv2d(2 * ddconfig["z_channels"], 2 * embed_dim, 1)
        self.embed_dim = embed_dim

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        moments = self.quant_conv(self.encoder(images))
        return moments[:, :self.embed_dim]  # [mean, log-variance] on the channel axis: the mean


class AutoencoderDecoder(nn.Module):
    """``AutoencoderKL.decode``: latents z [N, embed_dim, h, w] float32 (already multiplied by the latent
    scale) -> image float32 [N, out_ch, 8h, 8w] for kl-f8 (2^(len(ch_mult)-1) in general), about [-1, 1]."""

    def __init__(self, embed_dim: int, ddconfig: Mapping[str, Any]) -> None:
        super().__init__()
        self.post_quant_conv = nn.Conv2d(embed_dim, ddconfig["z_channels"], 1)
        self.decoder = Decoder(ddconfig)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))


class _FullAutoencoderLayout(nn.Module):
    """``AutoencoderKL``'s parameters in its attribute order (encoder, decoder, quant_conv, post_quant_conv)."""

    def __init__(self, embed_dim: int, ddconfig: Mapping[str, Any]) -> None:
        super().__init__()
        self.encoder = Encoder(ddconfig)
        self.decoder = Decoder(ddconfig)
        self.quant_conv = nn.Conv2d(2 * ddconfig["z_channels"], 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, ddconfig["z_channels"], 1)


def autoencoder_state_shapes(embed_dim: int, ddconfig: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Key -> shape of every tensor in an original AutoencoderKL checkpoint (no loss module), without
    allocating."""
    with torch.device("meta"):
        model = _FullAutoencoderLayout(embed_dim, ddconfig)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def load_decoder(ckpt_path: Path, yaml_path: Path) -> AutoencoderDecoder:
    """Load the decoder of an AutoencoderKL checkpoint (a plain state dict or ldm's ``{'state_dict': ...}``)
    -> eval-mode float32 CPU module. Encoder, quant_conv and loss tensors in the file are ignored."""
    return load_autoencoder(ckpt_path, yaml_path)[1]


def load_autoencoder(ckpt_path: Path, yaml_path: Path) -> tuple[AutoencoderEncoder, AutoencoderDecoder]:
    """Both halves of an AutoencoderKL checkpoint, read once -> (encoder, decoder), eval-mode float32 CPU modules.

    Each half is loaded strictly (a missing or misshaped tensor is named); the other half's tensors and the
    training loss's are ignored by it.
    """
    embed_dim, ddconfig = load_autoencoder_config(yaml_path)
    state = load_weights(ckpt_path, _WHAT)
    with torch.device("meta"):
        encoder, decoder = AutoencoderEncoder(embed_dim, ddconfig), AutoencoderDecoder(embed_dim, ddconfig)
    halves = ((encoder, ("decoder.", "post_quant_conv.", "loss.")), (decoder, ("encoder.", "quant_conv.", "loss.")))
    for model, other in halves:  # built on the meta device: the checkpoint's tensors become theirs
        load_state_into(model, state, ckpt_path, _WHAT, ignore_prefixes=other)
        model.eval().requires_grad_(False)
    return encoder, decoder

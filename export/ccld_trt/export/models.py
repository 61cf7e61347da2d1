"""Where the model files live and how they are loaded into the networks every backend starts from."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ccld_trt.export.cloob_config import DEFAULT_CLOOB_CONFIG, cloob_image_size
from ccld_trt.export.errors import UserError

if TYPE_CHECKING:  # the networks' type only: the file layout and its checks load without torch
    from torch import nn

UNET_FILE = "model_student.ckpt"
AE_FILE = "ae_model.ckpt"
AE_CONFIG_FILE = "ae_model.yaml"
CLOOB_CONFIG_FILE = "cloob_config.json"
DEMO_CLOOB_FILE = "cloob.pkl"
DEMO_MARKER = "DEMO_WEIGHTS.txt"  # written beside random demo weights (export.demo_weights)
# The short names the reference kit's synthetic checkpoints use; found when the published names are absent.
_SHORT_NAMES = {UNET_FILE: "unet.ckpt", AE_FILE: "ae.ckpt"}


def _in_dir(directory: Path, name: str) -> Path:
    """A checkpoint of the models directory: its safetensors copy (``ccld-trt convert``) while that copy records
    the SHA-256 of the pickle beside it (or the pickle is gone), else the pickle; the published name first, then
    the reference kit's short name; the published name when none exists (for the error message)."""
    from ccld_trt.export.weights_cache import matches, source_sha256

    for candidate in (name, _SHORT_NAMES.get(name, name)):
        source = directory / candidate
        copy = source.with_suffix(".safetensors")
        if copy.exists() and (not source.exists() or matches(copy, source_sha256(source))):
            return copy
        if source.exists():
            return source
    return directory / name


def named_models_dir(value: str | Path | None = None) -> Path | None:
    """The models directory someone named: the argument, else $CCLD_TRT_MODELS; None where neither does."""
    named = value or os.environ.get("CCLD_TRT_MODELS")
    return Path(named) if named else None


def models_dir(value: str | Path | None = None) -> Path:
    """The models directory: the argument, else $CCLD_TRT_MODELS, else ./models."""
    return named_models_dir(value) or Path("models")


@dataclass(frozen=True)
class ModelFiles:
    """Paths of the four checkpoints and their configs. ``cloob_config`` is a JSON path or a built-in name."""

    unet: Path
    autoencoder: Path
    autoencoder_config: Path
    cloob: Path
    cloob_config: str

    @classmethod
    def resolve(cls, directory: Path, unet: str | None = None, autoencoder: str | None = None,
                autoencoder_config: str | None = None, cloob: str | None = None,
                cloob_config: str | None = None) -> ModelFiles:
        """Explicit paths win; the rest come from ``directory`` (as ``download`` / ``demo-weights`` lay it out).

        The CLOOB config defaults to ``cloob_config.json`` in the directory if present, else the built-in
        ViT-B/16 config; the CLOOB pickle defaults to the file name of the config's URL (which carries its
        SHA-256), or ``cloob.pkl`` for a config without one (demo weights).
        """
        from ccld_trt.export.cloob_config import load_cloob_config

        if cloob_config is None:
            local = directory / CLOOB_CONFIG_FILE
            cloob_config = str(local) if local.exists() else DEFAULT_CLOOB_CONFIG
        if cloob is None:
            url = load_cloob_config(cloob_config).get("url")
            cloob = str(directory / (url.rsplit("/", 1)[-1] if url else DEMO_CLOOB_FILE))
        ae = Path(autoencoder) if autoencoder else _in_dir(directory, AE_FILE)
        return cls(
            unet=Path(unet) if unet else _in_dir(directory, UNET_FILE),
            autoencoder=ae,
            autoencoder_config=Path(autoencoder_config) if autoencoder_config else ae.with_suffix(".yaml"),
            cloob=Path(cloob),
            cloob_config=cloob_config,
        )

    def check_present(self) -> None:
        """One UserError listing every missing file, and how to get them."""
        missing = [str(p) for p in (self.unet, self.autoencoder, self.autoencoder_config, self.cloob)
                   if not p.is_file()]
        if missing:
            raise UserError(f"missing model file(s): {', '.join(missing)} — run `ccld-trt download` "
                            "(or `ccld-trt demo-weights DIR` for random test weights) or pass the paths")

    def is_demo(self) -> bool:
        """Whether these are the random weights of ``ccld-trt demo-weights``."""
        return (self.unet.parent / DEMO_MARKER).exists()


@dataclass
class Networks:
    """The fp32 torch networks, in eval mode on the CPU, and what the checkpoints say about them."""

    unet: nn.Module            # DiffusionModel: (x, t, embed) -> v
    decoder: nn.Module         # AutoencoderDecoder: latents -> images
    text_encoder: nn.Module    # tokens -> embed
    image_encoder: nn.Module   # pixels in [0, 1] -> L2-normalised embed
    cloob_config: dict
    checkpoint_autoencoder_scale: float
    encoder: nn.Module         # AutoencoderEncoder: images in [-1, 1] -> posterior mean (image-to-image)

    @property
    def image_size(self) -> int:
        return cloob_image_size(self.cloob_config)


def load_networks(files: ModelFiles, base_channels: int | None = None,
                  channel_multipliers: list[int] | None = None) -> Networks:
    """Load all five networks (the autoencoder as its two halves) from their original checkpoint formats (data
    only, no code runs)."""
    from ccld_trt.export.autoencoder import load_autoencoder
    from ccld_trt.export.cloob import load_cloob
    from ccld_trt.export.cloob_config import load_cloob_config
    from ccld_trt.export.unet import load_unet

    files.check_present()
    unet, scale = load_unet(files.unet, base_channels, channel_multipliers)
    encoder, decoder = load_autoencoder(files.autoencoder, files.autoencoder_config)
    cloob_config = load_cloob_config(files.cloob_config)
    text_encoder, image_encoder = load_cloob(files.cloob, cloob_config)
    return Networks(unet, decoder, text_encoder, image_encoder, cloob_config, scale, encoder)


def checkpoint_autoencoder_scale(unet_path: Path) -> float:
    """The ``autoencoder_scale`` buffer stored in a U-Net checkpoint (for backends that skip loading the U-Net)."""
    from ccld_trt.export.checkpoints import load_checkpoint

    state = load_checkpoint(unet_path, "U-Net checkpoint")
    if "autoencoder_scale" not in state:
        raise UserError(f"U-Net checkpoint {unet_path}: missing 1 tensor(s): autoencoder_scale")
    return float(state["autoencoder_scale"])

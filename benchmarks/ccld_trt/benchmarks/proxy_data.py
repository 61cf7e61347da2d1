"""Training data of the proxy U-Net: crops of real photographs bundled with installed packages, as [4, 32, 32]
"latents", and their conditioning.

A latent is a crop at a random scale and flip, resized to 32x32, in four channels that are correlated the way an
autoencoder's latents are: luma Y, chroma Cb and Cr (BT.601) and luma detail (Y minus its 3x3 box blur), each
standardised with fixed constants to about zero mean and unit std (as latents times ``autoencoder_scale`` are).
Nothing is downloaded: the photos ship with scikit-learn, matplotlib and Gradio, and their SHA-256 are pinned so
that a changed file is refused rather than silently training a different proxy.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ccld_trt.export.errors import UserError
from ccld_trt.export.file_digests import sha256_file

LATENT_SIZE = 32
PROMPT_SIZE = 64  # the demo CLOOB's image size: the conditioning encodes the same crop at this size
# (package, path inside it, SHA-256 prefix). The last one is held out: never trained on, used for the held-out loss
# and as the image prompt of the measurements.
PHOTOS: tuple[tuple[str, str, str], ...] = (
    ("sklearn", "datasets/images/china.jpg", "8378025a"),
    ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg", "a8ca6d73"),
    ("gradio", "media_assets/images/cheetah.jpg", "29b0090f"),
    ("gradio", "media_assets/images/lion.jpg", "4c45ece0"),
    ("gradio", "media_assets/images/tower.jpg", "f57f96f7"),
    ("gradio", "media_assets/images/groot.jpeg", "fff4d05d"),
    ("gradio", "test_data/cheetah2.jpg", "6882e714"),
    ("sklearn", "datasets/images/flower.jpg", "a77f6ec4"),
)
HELD_OUT = 1  # the last HELD_OUT photos
# Channel means and stds of (Y, Cb, Cr, detail) over the training crops (Y etc. on a 0..1 pixel scale); fixed so
# the data of a retraining is the data of the recipe.
CHANNEL_MEAN = (0.45, -0.037, 0.034, 0.0)
CHANNEL_STD = (0.24, 0.077, 0.074, 0.065)


def photo_paths() -> list[Path]:
    """The bundled photos, in PHOTOS order; UserError naming a missing or changed one."""
    paths = []
    for package, inner, digest in PHOTOS:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise UserError(f"proxy data: package {package} is not installed (it bundles {inner})")
        path = Path(next(iter(spec.submodule_search_locations))) / inner
        if not path.is_file():
            raise UserError(f"proxy data: {path} not found (package {package} changed?)")
        if not sha256_file(path).startswith(digest):
            raise UserError(f"proxy data: {path} differs from the recipe's photo (SHA-256 {digest}...)")
        paths.append(path)
    return paths


def rgb_to_latent(rgb: torch.Tensor) -> torch.Tensor:
    """RGB float [N, 3, H, W] in [0, 1] -> standardised (Y, Cb, Cr, detail) [N, 4, H, W] float32."""
    r, g, b = rgb.unbind(1)
    y = 0.299 * r + 0.587 * g + 0.114 * b
    cb = 0.564 * (b - y)
    cr = 0.713 * (r - y)
    blur = F.avg_pool2d(F.pad(y[:, None], (1, 1, 1, 1), mode="replicate"), 3, stride=1)[:, 0]
    planes = torch.stack([y, cb, cr, y - blur], dim=1)
    mean = torch.tensor(CHANNEL_MEAN)[:, None, None]
    std = torch.tensor(CHANNEL_STD)[:, None, None]
    return ((planes - mean) / std).float()


def latent_to_rgb(latent: torch.Tensor) -> torch.Tensor:
    """Inverse of ``rgb_to_latent`` from its first three channels (detail is redundant): [N, 4, H, W] -> RGB
    [N, 3, H, W] clamped to [0, 1], for looking at samples."""
    mean = torch.tensor(CHANNEL_MEAN[:3])[:, None, None]
    std = torch.tensor(CHANNEL_STD[:3])[:, None, None]
    y, cb, cr = (latent[:, :3].float() * std + mean).unbind(1)
    r = y + cr / 0.713
    b = y + cb / 0.564
    g = (y - 0.299 * r - 0.114 * b) / 0.587
    return torch.stack([r, g, b], dim=1).clamp(0, 1)


@dataclass(frozen=True)
class Crops:
    """``latents`` [N, 4, 32, 32] float32 (``rgb_to_latent``) and ``prompts`` [N, 3, 64, 64] float32 in [0, 1]: the
    same crops at the conditioning encoder's size."""

    latents: torch.Tensor
    prompts: torch.Tensor


def random_crops(images: list[Image.Image], n: int, seed: int) -> Crops:
    """``n`` crops spread evenly over ``images``: a random square of side 1/4 to 1 of the shorter edge, random
    position, flipped with probability 1/2, resized with antialiasing. Deterministic in ``seed``."""
    rng = np.random.RandomState(seed)
    latents: list[torch.Tensor] = []
    prompts: list[torch.Tensor] = []
    for i in range(n):
        image = images[i % len(images)]
        w, h = image.size
        side = int(min(w, h) * rng.uniform(0.25, 1.0))
        x0, y0 = rng.randint(0, w - side + 1), rng.randint(0, h - side + 1)
        crop = image.crop((x0, y0, x0 + side, y0 + side))
        if rng.rand() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        for size, out in ((LATENT_SIZE, latents), (PROMPT_SIZE, prompts)):
            pixels = np.asarray(crop.resize((size, size), Image.Resampling.LANCZOS), dtype=np.float32) / 255
            out.append(torch.from_numpy(pixels).permute(2, 0, 1))
    return Crops(rgb_to_latent(torch.stack(latents)), torch.stack(prompts))


def load_photos(paths: list[Path]) -> list[Image.Image]:
    return [Image.open(p).convert("RGB") for p in paths]


def train_and_held_out(n_train: int, n_held_out: int, seed: int) -> tuple[Crops, Crops]:
    """Crops of the training photos and of the held-out photo(s), from the pinned files."""
    photos = load_photos(photo_paths())
    return (random_crops(photos[:-HELD_OUT], n_train, seed),
            random_crops(photos[-HELD_OUT:], n_held_out, seed + 1))

"""The picture of docs/proxy.md: held-out photo crops, the proxy's samples prompted with each crop, and the random
twin's samples from the same noise and prompts, as RGB (``proxy_data.latent_to_rgb``).

``python -m ccld_trt.benchmarks.proxy_picture OUT.png`` (after ``proxy_measure`` has materialised build/proxy).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from ccld_trt.benchmarks.proxy_data import HELD_OUT, latent_to_rgb, load_photos, photo_paths, random_crops
from ccld_trt.benchmarks.proxy_measure import PROMPT_WEIGHT, proxy_models, random_twin
from ccld_trt.export.models import ModelFiles
from ccld_trt.pipeline import Request, conditions, sample_latents
from ccld_trt.runner import BackendOptions, ModelSource, open_session

METHOD, STEPS = "dpmpp-3m", 20
COLUMNS = 5
ZOOM = 3
LABEL_WIDTH = 150


def samples(models: Path, prompts: torch.Tensor, seed: int, weight: float = PROMPT_WEIGHT) -> torch.Tensor:
    """One sample per prompt pixels [N, 3, 64, 64] (seed + i for the i-th) -> latents [N, 4, 32, 32]."""
    session = open_session(BackendOptions("torch", "cpu", "fp32").resolved(), ModelSource(ModelFiles.resolve(models)))
    outs = []
    for i, pixels in enumerate(prompts):
        request = Request(prompts=[], image_prompts=[(Path("crop"), weight)], seed=seed + i, steps=STEPS,
                          method=METHOD)
        conds, weights = conditions(session.backend, request, [(pixels[None], weight)])
        outs.append(sample_latents(session.backend, request, conds, weights).float().cpu())
    return torch.cat(outs)


def _row(rgb: torch.Tensor) -> Image.Image:
    """[N, 3, h, w] in [0, 1] -> one strip, each image zoomed ZOOM times (nearest) with a 4-pixel gap."""
    tiles = [Image.fromarray((img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)) for img in rgb]
    size = tiles[0].width * ZOOM
    strip = Image.new("RGB", (len(tiles) * (size + 4), size + 4), (160, 160, 160))
    for i, tile in enumerate(tiles):
        strip.paste(tile.resize((size, size), Image.Resampling.NEAREST), (i * (size + 4), 2))
    return strip


def picture(root: Path, out: Path, seed: int = 0) -> Path:
    models = proxy_models(root)
    twin = random_twin(models, root)
    crops = random_crops(load_photos(photo_paths())[-HELD_OUT:], COLUMNS, seed + 100)
    rows = [("held-out crops (prompts)", latent_to_rgb(crops.latents)),
            (f"proxy, weight {PROMPT_WEIGHT:g}", latent_to_rgb(samples(models, crops.prompts, seed))),
            ("proxy, weight 1", latent_to_rgb(samples(models, crops.prompts, seed, 1.0))),
            (f"random, weight {PROMPT_WEIGHT:g}", latent_to_rgb(samples(twin, crops.prompts, seed)))]
    strips = [_row(rgb) for _, rgb in rows]
    sheet = Image.new("RGB", (LABEL_WIDTH + strips[0].width, sum(s.height for s in strips)), "white")
    draw = ImageDraw.Draw(sheet)
    y = 0
    for (label, _), strip in zip(rows, strips, strict=True):
        sheet.paste(strip, (LABEL_WIDTH, y))
        draw.text((6, y + strip.height // 2 - 6), label, fill="black")
        y += strip.height
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ccld_trt.benchmarks.proxy_picture", description=__doc__)
    parser.add_argument("out", type=Path)
    parser.add_argument("--root", type=Path, default=Path("build/proxy"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(picture(args.root, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Writing results without ever overwriting: numbered PNGs continue after the highest existing index."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from PIL import Image

from ccld_trt.export.errors import UserError

_NAME = re.compile(r"out_(\d+)\.png$")


def next_index(out_dir: Path) -> int:
    """One past the highest ``out_NNNNN.png`` index in ``out_dir`` (0 for an empty or new directory)."""
    if not out_dir.is_dir():
        return 0
    found = [int(m.group(1)) for p in out_dir.iterdir() if (m := _NAME.match(p.name))]
    return max(found, default=-1) + 1


def save_images(pixels: np.ndarray, out_dir: Path) -> list[Path]:
    """uint8 [N, H, W, 3] -> out_dir/out_{index:05}.png, indices after the existing ones; returns the paths.

    Files are created exclusively, so a concurrent run writing to the same directory skips ahead instead of
    replacing an image.
    """
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create output directory {out_dir}: {e.strerror}") from e
    paths, index = [], next_index(out_dir)
    for image in pixels:
        while True:
            path = out_dir / f"out_{index:05}.png"
            index += 1
            try:
                with open(path, "xb") as f:
                    Image.fromarray(image).save(f, format="PNG")
                break
            except FileExistsError:
                continue
        paths.append(path)
    return paths


def check_new_file(path: Path, what: str) -> None:
    """UserError if ``path`` exists (we never overwrite) or its directory cannot hold it."""
    if path.exists():
        raise UserError(f"{what} {path} already exists; refusing to overwrite it")
    if path.parent.exists() and not path.parent.is_dir():
        raise UserError(f"{what} {path}: {path.parent} is not a directory")


def save_latents(latents: np.ndarray, path: Path) -> None:
    """float32 [n, 4, h, w] -> .npy, created exclusively."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(path, "xb") as f:
            np.save(f, latents.astype(np.float32))
    except FileExistsError as e:
        raise UserError(f"latents file {path} already exists; refusing to overwrite it") from e

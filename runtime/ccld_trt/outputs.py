"""Writing results without ever overwriting: numbered PNGs continue after the highest existing index.

Where results go is checked before the work (``check_output_dir``, ``check_new_file``: made, a file written
there and removed), and every file is written whole or not at all (``write_atomic``): a write that fails (a
full disk) leaves no half-written file and keeps the files written before it.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from ccld_trt.export.atomic import write_atomic
from ccld_trt.export.errors import UserError

_NAME = re.compile(r"out_(\d+)\.png$")


def next_index(out_dir: Path) -> int:
    """One past the highest ``out_NNNNN.png`` index in ``out_dir`` (0 for an empty or new directory)."""
    if not out_dir.is_dir():
        return 0
    found = [int(m.group(1)) for p in out_dir.iterdir() if (m := _NAME.match(p.name))]
    return max(found, default=-1) + 1


def to_pixels(images: np.ndarray) -> np.ndarray:
    """Decoder output float32 [N, 3, H, W] in about [-1, 1] -> uint8 [N, H, W, 3] the way the original saves PNGs:
    clamp, (x + 1) / 2, x255, truncate (each step rounded in float32, as torch does it)."""
    one = np.float32(1)
    with np.errstate(invalid="ignore"):  # a NaN pixel becomes 0, as torch's cast makes it, without a warning
        scaled = (np.clip(images.astype(np.float32, copy=False), -one, one) + one) / np.float32(2) * np.float32(255)
        return scaled.astype(np.uint8).transpose(0, 2, 3, 1)


def save_images(pixels: np.ndarray, out_dir: Path) -> list[Path]:
    """uint8 [N, H, W, 3] -> out_dir/out_{index:05}.png, indices after the existing ones; returns the paths.

    Files are created exclusively, so a concurrent run writing to the same directory skips ahead instead of
    replacing an image, and whole (``write_atomic``): a write that fails is one UserError line that names the
    images kept, and leaves no partial file.
    """
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create output directory {out_dir}: {e.strerror}") from e
    paths: list[Path] = []
    index = next_index(out_dir)
    for image in pixels:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        while True:
            path = out_dir / f"out_{index:05}.png"
            index += 1
            try:
                write_atomic(path, buffer.getbuffer(), exclusive=True)
                break
            except FileExistsError:
                continue
            except OSError as e:
                kept = f"kept the {len(paths)} written before it ({paths[0].name} to {paths[-1].name})" if paths \
                    else "no image was written"
                raise UserError(f"writing {path} failed: {e.strerror or e}; {kept}") from None
        paths.append(path)
    return paths


def check_output_dir(directory: Path, what: str, need_bytes: int = 0) -> None:
    """UserError (one line) unless files can be written in ``directory``, checked before the work: missing
    directories are made, a probe file is written there and removed, and the directories made for it are removed
    again (writing the results makes them); ``need_bytes``: refuse when the file system has less free space."""
    missing = []
    existing = Path(directory)
    while not existing.exists() and not existing.is_symlink():
        missing.append(existing)
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{what} {directory}: {existing} is not a directory")
    made: list[Path] = []
    try:
        for part in reversed(missing):
            part.mkdir()
            made.append(part)
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".ccld-trt-probe-")
        try:
            os.write(fd, b"probe")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
        free = shutil.disk_usage(directory).free
    except OSError as e:
        verb = "cannot be created" if len(made) < len(missing) else "is not writable"
        raise UserError(f"{what} {directory} {verb}: {e.strerror or e}") from None
    finally:
        for part in reversed(made):
            with contextlib.suppress(OSError):  # not empty: someone else wrote there meanwhile
                part.rmdir()
    if free < need_bytes:
        raise UserError(f"{what} {directory}: {free / 2**20:.1f} MiB free, the results need up to "
                        f"{need_bytes / 2**20:.1f} MiB")


def png_bytes_bound(pixels: int) -> int:
    """The most a PNG of ``pixels`` RGB pixels takes (incompressible data: raw bytes, a filter byte per row and
    zlib's few bytes per 16 KiB block, with a KiB for the chunks) (for ``check_output_dir``'s need_bytes)."""
    raw = 3 * pixels + int(pixels**0.5) + 1
    return raw + raw // 16_000 * 5 + 1024


def check_new_file(path: Path, what: str, need_bytes: int = 0) -> None:
    """UserError if ``path`` exists (we never overwrite) or its directory cannot hold it (check_output_dir)."""
    if path.exists() or path.is_symlink():
        raise UserError(f"{what} {path} already exists; refusing to overwrite it")
    check_output_dir(path.parent, f"{what} {path}: directory", need_bytes)


def save_latents(latents: np.ndarray, path: Path) -> None:
    """float32 [n, 4, h, w] -> .npy, created exclusively and whole (UserError in one line if it cannot be)."""
    buffer = io.BytesIO()
    np.save(buffer, latents.astype(np.float32))
    try:
        write_atomic(path, buffer.getbuffer(), exclusive=True)
    except FileExistsError as e:
        raise UserError(f"latents file {path} already exists; refusing to overwrite it") from e
    except OSError as e:
        raise UserError(f"writing latents file {path} failed: {e.strerror or e}") from None

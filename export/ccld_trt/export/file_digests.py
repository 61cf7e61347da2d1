"""Model files identified by content without reading them as tensors (and without torch): their SHA-256, cached by
path, size and mtime, and what a converted safetensors copy records of its source."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

SAFETENSORS_SUFFIX = ".safetensors"


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def cached_sha256(path: Path, cache: dict[str, dict[str, Any]]) -> str:
    """SHA-256 of ``path`` from ``cache`` ({resolved path: {size, mtime_ns, sha256}}) while the file's size and
    mtime_ns are the recorded ones; else hashed (hundreds of MiB: ~1 s) and recorded in ``cache``."""
    stat = path.stat()
    entry = cache.get(str(path.resolve()))
    if entry and entry.get("size") == stat.st_size and entry.get("mtime_ns") == stat.st_mtime_ns:
        return str(entry["sha256"])
    digest = sha256_file(path)
    cache[str(path.resolve())] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest}
    return digest


def safetensors_source(path: Path) -> dict[str, str]:
    """The metadata ``convert_to_safetensors`` stored (``source``, ``source_sha256``); empty for other files."""
    from safetensors import safe_open

    with safe_open(path, framework="numpy") as f:
        return dict(f.metadata() or {})

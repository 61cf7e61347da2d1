"""Write-then-rename: a reader never sees half a file, and an interrupted write leaves the old file whole."""

from __future__ import annotations

import os
from pathlib import Path


def write_atomic(path: Path, data: bytes | memoryview | str) -> None:
    """Write ``data`` to ``path`` through ``<path>.<pid>.tmp`` and one rename (per process: two writers of one
    directory may race); creates the parent directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        if isinstance(data, str):
            tmp.write_text(data)
        else:
            with open(tmp, "wb") as f:
                f.write(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)

"""Where derived artefacts go (ONNX graphs, converted weights, engines): one rule, imported by every module that
writes them, and importing nothing of the package itself (so none of them forms a circle through it)."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_ENGINE_DIR = Path("build/engines")  # where engines build and are looked for unless --engines says


def build_root(build_dir: Path | None = None) -> Path:
    """``build_dir``, else $CCLD_TRT_BUILD, else ./build."""
    return Path(build_dir or os.environ.get("CCLD_TRT_BUILD") or "build")

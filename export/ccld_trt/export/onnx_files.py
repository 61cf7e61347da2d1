"""Where the exported graph files of a set of model files live: a light module (no onnx, no exporter), so that
a backend that only opens current graphs never imports the exporter."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ccld_trt.export.build_dir import build_root
from ccld_trt.export.models import ModelFiles


def onnx_path(out_dir: Path, graph: str, precision: str = "fp32") -> Path:
    """``<out>/<graph>.onnx`` (fp32) or ``<out>/<graph>.fp16.onnx``."""
    return Path(out_dir) / (f"{graph}.fp16.onnx" if precision == "fp16" else f"{graph}.onnx")


def default_onnx_dir(files: ModelFiles, build_dir: Path | None = None) -> Path:
    """``<build>/onnx/<12 hex digits>``, one directory per set of model files, named by a hash of their resolved
    paths (the manifest inside tracks their contents). ``build_dir`` defaults to $CCLD_TRT_BUILD, else ./build."""
    config = Path(files.cloob_config)
    paths = [files.unet, files.autoencoder, files.autoencoder_config, files.cloob,
             config if config.is_file() else files.cloob_config]
    ident = json.dumps([str(Path(p).resolve()) if isinstance(p, Path) else p for p in paths])
    return build_root(build_dir) / "onnx" / hashlib.sha256(ident.encode()).hexdigest()[:12]

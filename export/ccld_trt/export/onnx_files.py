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


def external_data(path: Path) -> Path:
    """``<graph file>.data`` beside ``path``: where a graph too large for one protobuf keeps its weights."""
    return path.with_name(path.name + ".data")


def file_version(path: Path) -> list[tuple[str, int, int]]:
    """(name, size, mtime in ns) of ``path`` and of the weights beside it that exist (an OpenVINO IR's ``.bin``, a
    graph's external data): what a cache of something made from the file is keyed by, so that a file written
    again is never taken for the old one."""
    parts = [path, *(p for p in (path.with_suffix(".bin"), external_data(path)) if p.exists())]
    stats = [(p.name, p.stat()) for p in parts]
    return [(name, st.st_size, st.st_mtime_ns) for name, st in stats]


def default_onnx_dir(files: ModelFiles, build_dir: Path | None = None) -> Path:
    """``<build>/onnx/<12 hex digits>``, one directory per set of model files, named by a hash of their resolved
    paths (the manifest inside tracks their contents). ``build_dir`` defaults to $CCLD_TRT_BUILD, else ./build."""
    config = Path(files.cloob_config)
    paths = [files.unet, files.autoencoder, files.autoencoder_config, files.cloob,
             config if config.is_file() else files.cloob_config]
    ident = json.dumps([str(Path(p).resolve()) if isinstance(p, Path) else p for p in paths])
    return build_root(build_dir) / "onnx" / hashlib.sha256(ident.encode()).hexdigest()[:12]

"""The JSON sidecar next to each engine (``<engine>.json``): what the engine was built with and for, so that a
stale engine (other TensorRT, other GPU, changed ONNX, too small a profile) is named instead of failing obscurely.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from ccld_trt.engines.profiles import GraphProfile, as_profile, outside_profile
from ccld_trt.export.errors import UserError

SIDECAR_VERSION = 1
REBUILD_HINT = "rebuild the engines (ccld-trt engines build --rebuild)"


@dataclass(frozen=True)
class Sidecar:
    """Build facts of one engine. As the ``current`` side of check_sidecar, empty fields are not compared."""

    tensorrt_version: str
    gpu_name: str
    compute_capability: str  # "major.minor"
    onnx_sha256: str = ""
    onnx_file: str = ""  # the ONNX file's name, for people reading the sidecar
    precision: str = ""  # "fp16" or "fp32": decided in the ONNX graph
    profiles: GraphProfile = field(default_factory=dict)
    builder: dict[str, Any] = field(default_factory=dict)  # builder options (opt level, workspace, typing)
    created: str = ""  # ISO 8601, UTC


def sidecar_path(engine_path: Path) -> Path:
    """``unet_cfg.fp16.engine`` -> ``unet_cfg.fp16.engine.json``."""
    return engine_path.with_name(engine_path.name + ".json")


def gpu_identity(device: torch.device | None = None) -> tuple[str, str]:
    """(GPU name, compute capability "major.minor") of ``device`` (default: the current CUDA device)."""
    if not torch.cuda.is_available():
        raise UserError("TensorRT engines need an NVIDIA GPU, and torch sees none (torch.cuda.is_available() "
                        f"is False; torch {torch.__version__})")
    major, minor = torch.cuda.get_device_capability(device)
    return torch.cuda.get_device_name(device), f"{major}.{minor}"


def now_utc() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def write_sidecar(engine_path: Path, sidecar: Sidecar) -> None:
    """Write ``<engine>.json`` atomically (a reader never sees half a file)."""
    data = {"sidecar_version": SIDECAR_VERSION, **asdict(sidecar)}
    path = sidecar_path(engine_path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def read_sidecar(engine_path: Path) -> Sidecar:
    """The sidecar of ``engine_path``; UserError if it is missing or unreadable."""
    path = sidecar_path(engine_path)
    if not path.is_file():
        raise UserError(f"engine {engine_path} has no sidecar {path.name}, so its build is unknown: {REBUILD_HINT}")
    try:
        data = json.loads(path.read_text())
        if data.pop("sidecar_version") != SIDECAR_VERSION:
            raise ValueError("unknown sidecar_version")
        data["profiles"] = as_profile(data["profiles"])
        return Sidecar(**data)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, UserError) as e:
        raise UserError(f"engine sidecar {path} is unreadable ({type(e).__name__}: {e}): {REBUILD_HINT}") from e


def check_sidecar(sidecar: Sidecar, current: Sidecar) -> list[str]:
    """Human-readable reasons why an engine built as ``sidecar`` does not fit ``current`` (empty: it fits).

    A requested profile must lie inside the built one; the requested opt shape is not compared.
    """
    problems = []
    if sidecar.tensorrt_version != current.tensorrt_version:
        problems.append(f"built with TensorRT {sidecar.tensorrt_version}, this is TensorRT {current.tensorrt_version}")
    if (sidecar.gpu_name, sidecar.compute_capability) != (current.gpu_name, current.compute_capability):
        problems.append(f"built for {sidecar.gpu_name} (compute {sidecar.compute_capability}), this GPU is "
                        f"{current.gpu_name} (compute {current.compute_capability})")
    if current.onnx_sha256 and sidecar.onnx_sha256 != current.onnx_sha256:
        problems.append("the ONNX graph changed since the build (its SHA-256 differs)")
    if current.precision and sidecar.precision != current.precision:
        problems.append(f"built as {sidecar.precision}, {current.precision} requested")
    for name, (lo, _, hi) in current.profiles.items():
        problems += outside_profile("requested", {name: lo}, sidecar.profiles)
        if lo != hi:
            problems += outside_profile("requested", {name: hi}, sidecar.profiles)
    return problems


def require_fit(engine_path: Path, current: Sidecar) -> Sidecar:
    """The engine's sidecar if the engine fits ``current``, else one UserError naming every mismatch."""
    sidecar = read_sidecar(engine_path)
    problems = check_sidecar(sidecar, current)
    if problems:
        raise UserError(f"engine {engine_path} does not fit: {'; '.join(problems)}: {REBUILD_HINT}")
    return sidecar

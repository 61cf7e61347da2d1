"""The JSON sidecar next to each engine (``<engine>.json``): what the engine was built with, from and for, so
that a stale engine (other flavour or version, other GPU, changed ONNX, other model files, too small a profile,
a replaced engine file) is named instead of running silently or failing obscurely.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from ccld_trt.engines.flavor import GPU_KINDS, Flavor, flavor_label
from ccld_trt.engines.profiles import GraphProfile, as_profile, outside_profile
from ccld_trt.export.atomic import write_atomic
from ccld_trt.export.errors import UserError
from ccld_trt.export.file_digests import sha256_file

SIDECAR_VERSION = 2
REBUILD_HINT = "rebuild the engines (ccld-trt engines build)"


@dataclass(frozen=True)
class Sidecar:
    """Build facts of one engine. As the ``current`` side of check_sidecar, empty fields are not compared."""

    flavor: Flavor | str  # "tensorrt" or "tensorrt-rtx"
    version: str  # of the TensorRT flavour
    # The GPUs it runs on: TensorRT-RTX, the build targets ("8.0", "8.6", ...); regular TensorRT, the one GPU
    # it was built on. As the runtime's side: the local GPU's.
    compute_capabilities: tuple[str, ...] = ()
    gpu_name: str = ""  # the GPU it was built on (regular TensorRT); empty for ahead-of-time builds
    onnx_file: str = ""  # the ONNX file's name, for people reading the sidecar
    onnx_sha256: dict[str, str] = field(default_factory=dict)  # file name -> SHA-256: the graph, its external data
    sources: dict[str, str] = field(default_factory=dict)  # component (unet, autoencoder, cloob) -> checkpoint SHA
    precision: str = ""  # "fp16" or "fp32": decided in the ONNX graph
    profiles: GraphProfile = field(default_factory=dict)
    builder: dict[str, Any] = field(default_factory=dict)  # builder options (opt level, workspace, TF32 off)
    engine_sha256: str = ""  # of the engine file itself
    created: str = ""  # ISO 8601, UTC


def sidecar_path(engine_path: Path) -> Path:
    """``unet_cfg.fp16.engine`` -> ``unet_cfg.fp16.engine.json``."""
    return engine_path.with_name(engine_path.name + ".json")


def gpu_identity(device: torch.device | None = None) -> tuple[str, str]:
    """(GPU name, compute capability "major.minor") of ``device`` (default: the current CUDA device)."""
    if not torch.cuda.is_available():
        raise UserError(f"TensorRT engines run on an NVIDIA GPU only ({GPU_KINDS}), and {gpu_absence()}")
    major, minor = torch.cuda.get_device_capability(device)
    return torch.cuda.get_device_name(device), f"{major}.{minor}"


def gpu_absence() -> str:
    """Why torch sees no GPU, in words."""
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    return f"torch {torch.__version__} (CUDA {torch.version.cuda}) finds no NVIDIA GPU or driver"


def local_capability() -> str | None:
    """The current CUDA device's compute capability ("8.9"), or None without a usable GPU."""
    return gpu_identity()[1] if torch.cuda.is_available() else None


def now_utc() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def write_sidecar(engine_path: Path, sidecar: Sidecar) -> None:
    """Write ``<engine>.json`` atomically (a reader never sees half a file)."""
    data = {"sidecar_version": SIDECAR_VERSION, **asdict(sidecar)}
    write_atomic(sidecar_path(engine_path), json.dumps(data, indent=1) + "\n")


def read_sidecar(engine_path: Path) -> Sidecar:
    """The sidecar of ``engine_path``; UserError if it is missing or unreadable."""
    path = sidecar_path(engine_path)
    if not path.is_file():
        raise UserError(f"engine {engine_path} has no sidecar {path.name}, so its build is unknown: {REBUILD_HINT}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.pop("sidecar_version") != SIDECAR_VERSION:
            raise ValueError("an older sidecar_version")
        data["profiles"] = as_profile(data["profiles"])
        data["compute_capabilities"] = tuple(data["compute_capabilities"])
        return Sidecar(**data)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, UserError) as e:
        raise UserError(f"engine sidecar {path} is unreadable ({type(e).__name__}: {e}): {REBUILD_HINT}") from e


def check_sidecar(built: Sidecar, current: Sidecar) -> list[str]:
    """Human-readable reasons why an engine built as ``built`` does not fit ``current`` (empty: it fits).

    Each of ``current``'s compute capabilities must be one the engine was built for; a requested profile must
    lie inside the built one (the requested opt shape is not compared).
    """
    problems = []
    if current.flavor and built.flavor != current.flavor:
        problems.append(f"built with {flavor_label(built.flavor)}, this is {flavor_label(current.flavor)}")
    elif current.version and built.version != current.version:
        label = flavor_label(built.flavor)
        problems.append(f"built with {label} {built.version}, this is {label} {current.version}")
    missing = [c for c in current.compute_capabilities if c not in built.compute_capabilities]
    if missing or (current.gpu_name and built.gpu_name and built.gpu_name != current.gpu_name):
        built_for = f"{built.gpu_name} " if built.gpu_name else ""
        here = f"{current.gpu_name} " if current.gpu_name else ""
        problems.append(f"built for {built_for}(compute {', '.join(built.compute_capabilities)}), this is "
                        f"{here}(compute {', '.join(current.compute_capabilities)})")
    if current.onnx_sha256 and built.onnx_sha256 != current.onnx_sha256:
        problems.append("the ONNX graph changed since the build (its SHA-256 differs)")
    for component, digest in sorted(current.sources.items()):
        if built.sources.get(component) != digest:
            problems.append(f"built from another {component} checkpoint (its SHA-256 differs)")
    if current.precision and built.precision != current.precision:
        problems.append(f"built as {built.precision}, {current.precision} requested")
    for name, (lo, _, hi) in current.profiles.items():
        problems += outside_profile("requested", {name: lo}, built.profiles)
        if lo != hi:
            problems += outside_profile("requested", {name: hi}, built.profiles)
    return problems


def require_fit(engine_path: Path, current: Sidecar, hint: str = REBUILD_HINT) -> Sidecar:
    """The engine's sidecar if the engine fits ``current``, else one UserError naming every mismatch, ending
    with ``hint`` (the command that fixes it)."""
    sidecar = read_sidecar(engine_path)
    problems = check_sidecar(sidecar, current)
    if problems:
        raise UserError(f"engine {engine_path} does not fit: {'; '.join(problems)}: {hint}")
    return sidecar


def checkpoint_digests(paths: Mapping[str, Path], cache_path: Path) -> dict[str, str]:
    """{component: SHA-256} of the checkpoint files ``paths`` ({"unet": path, ...}), the sidecars' ``sources``
    to compare with. Digests are cached in ``cache_path`` by (path, size, mtime, ctime, inode), so an unchanged
    start reads no weights; a cache that cannot be read or written only costs the hashing.

    What the cache trusts: that a file whose content changed also changed one of these. Any write, rename onto
    the path or metadata change updates the ctime, which, unlike the mtime, no tool can set back (``cp -p``,
    ``rsync -t`` or ``touch -d`` restore mtimes); only a clock set backwards or a filesystem that does not keep
    ctimes could hide a change, and deleting ``cache_path`` always rehashes."""
    try:
        cache = json.loads(cache_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        cache = {}
    digests, changed = {}, False
    for component, path in paths.items():
        stat = Path(path).stat()
        key = str(Path(path).resolve())
        entry = cache.get(key) if isinstance(cache, dict) else None
        ident = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "ctime_ns": stat.st_ctime_ns,
                 "inode": stat.st_ino}
        if not (isinstance(entry, dict) and all(entry.get(k) == v for k, v in ident.items())):
            entry = {**ident, "sha256": sha256_file(Path(path))}
            cache = {**(cache if isinstance(cache, dict) else {}), key: entry}
            changed = True
        digests[component] = str(entry["sha256"])
    if changed:
        with contextlib.suppress(OSError):
            write_atomic(cache_path, json.dumps(cache, indent=1))
    return digests

"""Build one TensorRT engine from an ONNX graph, with its optimisation profile, a persisted timing cache and a
JSON sidecar; an engine whose sidecar still matches is kept.

Precision is decided in the ONNX graph (``<graph>.fp16.onnx``: fp16 inside, fp32 I/O), so networks are strongly
typed: always on TensorRT >= 11 (weak typing and BuilderFlag.FP16 were removed), through the STRONGLY_TYPED
network flag on TensorRT 10; only a TensorRT without that flag falls back to weak typing with the FP16 flag.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

from ccld_trt.engines.engine import require_tensorrt, trt_logger, trt_major
from ccld_trt.engines.profiles import GraphProfile, ProfileParams, as_profile
from ccld_trt.engines.sidecar import Sidecar, check_sidecar, gpu_identity, now_utc, read_sidecar, write_sidecar
from ccld_trt.export.checkpoints import require_file, sha256_file
from ccld_trt.export.errors import UserError

log = logging.getLogger(__name__)


def onnx_precision(onnx_path: Path) -> str:
    """"fp16" for ``<graph>.fp16.onnx``, else "fp32"."""
    return "fp16" if Path(onnx_path).name.endswith(".fp16.onnx") else "fp32"


def network_typing(trt_version: str, has_strongly_typed_flag: bool) -> str:
    """How to type the network: "default" (TensorRT >= 11: every network is strongly typed), "flag" (the
    STRONGLY_TYPED creation flag) or "weak" (no such flag: weak typing, FP16 builder flag for fp16 graphs)."""
    if trt_major(trt_version) >= 11:
        return "default"
    return "flag" if has_strongly_typed_flag else "weak"


def stale_reasons(built: Sidecar, wanted: Sidecar) -> list[str]:
    """Why an engine built as ``built`` must be rebuilt for ``wanted`` (empty: it is up to date)."""
    reasons = check_sidecar(built, wanted)
    if not reasons and built.profiles != wanted.profiles:
        reasons.append("the optimisation profile changed")
    if built.builder != wanted.builder:
        reasons.append(f"builder options changed ({built.builder} -> {wanted.builder})")
    return reasons


def build_engine(onnx_path: Path, engine_path: Path, profiles: GraphProfile, *, opt_level: int = 3,
                 workspace_gib: float | None = None, timing_cache_path: Path | None = None,
                 rebuild: bool = False) -> bool:
    """Build ``engine_path`` (and ``<engine>.json``) from ``onnx_path`` for ``profiles`` ({input: (min, opt, max)},
    see profiles.graph_profile). Returns False when an up-to-date engine was kept (never with ``rebuild``).

    opt_level: TensorRT builder optimisation level 0-5 (3 is TensorRT's default); workspace_gib: cap on the
    builder's workspace memory pool (None: TensorRT's default, the device memory); timing_cache_path: loaded if
    present, saved after the build, so later builds on the same GPU skip kernel timing.
    """
    if not (isinstance(opt_level, int) and 0 <= opt_level <= 5):
        raise UserError(f"builder optimisation level must be 0 to 5, got {opt_level!r}")
    if workspace_gib is not None and not workspace_gib > 0:
        raise UserError(f"workspace size must be a positive number of GiB, got {workspace_gib!r}")
    profiles = as_profile(profiles)
    version = require_tensorrt()
    import tensorrt as trt

    onnx_path, engine_path = require_file(Path(onnx_path), "ONNX file"), Path(engine_path)
    gpu_name, capability = gpu_identity()
    typing_mode = network_typing(version, hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"))
    wanted = Sidecar(tensorrt_version=version, gpu_name=gpu_name, compute_capability=capability,
                     onnx_sha256=sha256_file(onnx_path), onnx_file=onnx_path.name,
                     precision=onnx_precision(onnx_path), profiles=profiles,
                     builder={"opt_level": opt_level, "workspace_gib": workspace_gib, "typing": typing_mode})
    if not rebuild and engine_path.is_file():
        try:
            reasons = stale_reasons(read_sidecar(engine_path), wanted)
        except UserError as e:
            reasons = [str(e)]
        if not reasons:
            log.info("engine %s is up to date", engine_path)
            return False
        log.info("rebuilding %s: %s", engine_path, "; ".join(reasons))

    builder = trt.Builder(trt_logger())
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if typing_mode == "flag" else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, trt_logger())
    if not parser.parse_from_file(str(onnx_path)):
        errors = [" ".join(str(parser.get_error(i)).split()) for i in range(parser.num_errors)]
        raise UserError(f"TensorRT cannot parse {onnx_path}: {' | '.join(errors) or 'no details given'}")

    inputs = sorted(network.get_input(i).name for i in range(network.num_inputs))
    if inputs != sorted(profiles):
        raise UserError(f"{onnx_path} has inputs {inputs}, the profile is for {sorted(profiles)}")

    config = builder.create_builder_config()
    config.builder_optimization_level = opt_level
    if workspace_gib is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    if typing_mode == "weak" and wanted.precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in profiles.items():
        profile.set_shape(name, trt.Dims(list(lo)), trt.Dims(list(opt)), trt.Dims(list(hi)))
    config.add_optimization_profile(profile)
    cache_bytes = timing_cache_path.read_bytes() if timing_cache_path and timing_cache_path.is_file() else b""
    if not config.set_timing_cache(config.create_timing_cache(cache_bytes), False):
        log.warning("timing cache %s was made on another GPU or TensorRT: starting a new one", timing_cache_path)
        config.set_timing_cache(config.create_timing_cache(b""), False)

    log.info("building %s from %s (TensorRT %s, %s typing); this takes minutes", engine_path, onnx_path,
             version, typing_mode)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise UserError(f"TensorRT failed to build an engine from {onnx_path} (see its log above)")
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(engine_path, memoryview(plan))
    write_sidecar(engine_path, dataclasses.replace(wanted, created=now_utc()))
    if timing_cache_path:
        _write_atomic(timing_cache_path, memoryview(config.get_timing_cache().serialize()))
    return True


def _write_atomic(path: Path, data: memoryview) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def build_engines(onnx_dir: Path, engine_dir: Path, params: ProfileParams, *, precision: str = "fp16",
                  opt_level: int = 3, workspace_gib: float | None = None, rebuild: bool = False) -> list[Path]:
    """Build the four engines the TensorRT backend runs from ``onnx_dir`` (``<graph>.fp16.onnx`` or
    ``<graph>.onnx``) into ``engine_dir``, sharing one timing cache there. Returns the engine paths."""
    from tqdm import tqdm

    from ccld_trt.engines.engine import engine_file
    from ccld_trt.engines.profiles import graph_profile
    from ccld_trt.export.graph_specs import BACKEND_GRAPHS

    params.validate()
    require_tensorrt()  # before anything else, so a machine without TensorRT gets the one clear line
    suffix = ".fp16.onnx" if precision == "fp16" else ".onnx"
    sources = {g: require_file(Path(onnx_dir) / f"{g}{suffix}", f"{g} ONNX graph (run `ccld-trt export`)")
               for g in BACKEND_GRAPHS}
    paths = []
    for graph in tqdm(BACKEND_GRAPHS, desc="engines", unit="engine", disable=None):
        path = engine_file(Path(engine_dir), graph, precision)
        build_engine(sources[graph], path, graph_profile(graph, params), opt_level=opt_level,
                     workspace_gib=workspace_gib, timing_cache_path=Path(engine_dir) / "timing.cache",
                     rebuild=rebuild)
        paths.append(path)
    return paths

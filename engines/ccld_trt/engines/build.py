"""Build one engine from an ONNX graph, in either TensorRT flavour, with its optimisation profile, a timing cache
and a JSON sidecar; an engine whose sidecar still matches is kept.

Polygraphy does the TensorRT plumbing (network creation, builder configuration with profiles and, for
TensorRT-RTX, the target compute capabilities, the build); this module keeps what polygraphy does not do:
parse errors in one line, TF32 off, sidecars, staleness and timing-cache identity.

Precision is decided in the ONNX graph (``<graph>.fp16.onnx``: fp16 inside, fp32 I/O), so networks are strongly
typed: always on TensorRT >= 11 and TensorRT-RTX, through the STRONGLY_TYPED network flag on TensorRT 10.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import sys
import time
import types
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ccld_trt.engines.flavor import (
    MODULES,
    RTX_DEFAULT_TARGETS,
    Flavor,
    check_rtx_targets,
    flavor_label,
    parse_capabilities,
    require_flavor,
    rtx_compute_capability,
)
from ccld_trt.engines.profiles import GraphProfile, ProfileParams, as_profile
from ccld_trt.engines.sidecar import (
    Sidecar,
    check_sidecar,
    gpu_identity,
    now_utc,
    read_sidecar,
    sidecar_path,
    write_sidecar,
)
from ccld_trt.export.atomic import write_atomic
from ccld_trt.export.errors import UserError, require_file
from ccld_trt.export.file_digests import sha256_file
from ccld_trt.export.graph_specs import BACKEND_GRAPHS

log = logging.getLogger(__name__)

SOURCE_METADATA = "ccld_trt.source_sha256"  # the exporter's {component: checkpoint SHA-256} in each graph
# The graphs built as engines: the backend's four, and the plain per-row U-Net the cluster merges requests into.
ENGINE_GRAPHS = (*BACKEND_GRAPHS, "unet")


@dataclasses.dataclass(frozen=True)
class BuildOptions:
    """How engines are built. flavor: "tensorrt" (for the local GPU) or "tensorrt-rtx" (ahead of time, for
    ``compute_capabilities``, default RTX_DEFAULT_TARGETS); opt_level: builder optimisation level 0-5 (3 is
    TensorRT's default); workspace_gib: cap on the builder's workspace pool (None: TensorRT's default)."""

    flavor: Flavor = "tensorrt-rtx"
    compute_capabilities: tuple[str, ...] = ()
    opt_level: int = 3
    workspace_gib: float | None = None

    def validate(self) -> BuildOptions:
        """These options with the targets normalised; UserError naming the first bad value."""
        if not (isinstance(self.opt_level, int) and 0 <= self.opt_level <= 5):
            raise UserError(f"builder optimisation level must be 0 to 5, got {self.opt_level!r}")
        if self.workspace_gib is not None and not self.workspace_gib > 0:
            raise UserError(f"workspace size must be a positive number of GiB, got {self.workspace_gib!r}")
        if self.flavor == "tensorrt" and self.compute_capabilities:
            raise UserError("regular TensorRT builds for the local GPU only; compute capabilities are for "
                            "TensorRT-RTX")
        caps = self.compute_capabilities or (RTX_DEFAULT_TARGETS if self.flavor == "tensorrt-rtx" else ())
        caps = parse_capabilities(caps) if caps else ()
        check_rtx_targets(caps)
        return dataclasses.replace(self, compute_capabilities=caps)

    def builder_facts(self) -> dict[str, Any]:
        """What the sidecar records of the builder configuration (a change rebuilds)."""
        return {"opt_level": self.opt_level, "workspace_gib": self.workspace_gib, "tf32": False,
                "typing": "strong"}


def onnx_precision(onnx_path: Path) -> str:
    """"fp16" for ``<graph>.fp16.onnx``, else "fp32"."""
    return "fp16" if Path(onnx_path).name.endswith(".fp16.onnx") else "fp32"


def network_typing(trt_version: str, has_strongly_typed_flag: bool) -> str:
    """How to make the network strongly typed: "default" (TensorRT >= 11: every network is) or "flag" (the
    STRONGLY_TYPED creation flag); UserError for a TensorRT without either (older than 10)."""
    if int(trt_version.split(".")[0]) >= 11:
        return "default"
    if not has_strongly_typed_flag:
        raise UserError(f"TensorRT {trt_version} cannot build strongly typed networks: use TensorRT 10 or later")
    return "flag"


def onnx_facts(onnx_path: Path) -> tuple[dict[str, str], dict[str, str]]:
    """({file name: SHA-256} of the graph and its external data files, {component: checkpoint SHA-256} from the
    exporter's ``ccld_trt.source_sha256`` metadata, empty for a graph without it)."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    files = {onnx_path.name: sha256_file(onnx_path)}
    for tensor in model.graph.initializer:  # where the exporter puts weights, external or not
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            location = {e.key: e.value for e in tensor.external_data}["location"]
            if location not in files:
                files[location] = sha256_file(require_file(onnx_path.parent / location, "ONNX external data"))
    metadata = {p.key: p.value for p in model.metadata_props}
    sources = json.loads(metadata.get(SOURCE_METADATA, "{}"))
    return files, {str(k): str(v) for k, v in sources.items()}


def target_sidecar(onnx_path: Path, profiles: GraphProfile, options: BuildOptions) -> Sidecar:
    """The sidecar an engine built now from ``onnx_path`` would get (no engine hash, no date)."""
    version = require_flavor(options.flavor)
    gpu_name, targets = "", options.compute_capabilities
    if options.flavor == "tensorrt":
        gpu_name, capability = gpu_identity()
        targets = (capability,)
    hashes, sources = onnx_facts(onnx_path)
    if not sources:  # its engine could not be tied to model files: it would run with any of them
        raise UserError(f"{onnx_path} does not record the checkpoint it was exported from (its "
                        f"{SOURCE_METADATA} metadata), so its engine could run against other model files: "
                        "export the graphs with ccld-trt export (or engines build without --onnx)")
    return Sidecar(flavor=options.flavor, version=version, compute_capabilities=targets, gpu_name=gpu_name,
                   onnx_file=onnx_path.name, onnx_sha256=hashes,
                   sources=sources, precision=onnx_precision(onnx_path), profiles=profiles,
                   builder=options.builder_facts())


def stale_reasons(built: Sidecar, wanted: Sidecar) -> list[str]:
    """Why an engine built as ``built`` must be rebuilt for ``wanted`` (empty: it is up to date)."""
    reasons = check_sidecar(built, wanted)
    if not reasons and built.compute_capabilities != wanted.compute_capabilities:
        reasons.append(f"the target compute capabilities changed ({', '.join(built.compute_capabilities)} -> "
                       f"{', '.join(wanted.compute_capabilities)})")
    if not reasons and built.profiles != wanted.profiles:
        reasons.append("the optimisation profile changed")
    if built.builder != wanted.builder:
        reasons.append(f"builder options changed ({built.builder} -> {wanted.builder})")
    return reasons


def engine_stale_reasons(engine_path: Path, wanted: Sidecar) -> list[str]:
    """stale_reasons of the engine file at ``engine_path``, its own hash included."""
    if not engine_path.is_file():
        return ["no engine yet"]
    try:
        built = read_sidecar(engine_path)
    except UserError as e:
        return [str(e)]
    reasons = stale_reasons(built, wanted)
    if not reasons and sha256_file(engine_path) != built.engine_sha256:
        reasons.append("the engine file differs from the one its sidecar describes")
    return reasons


def build_engine(onnx_path: Path, engine_path: Path, profiles: GraphProfile,
                 options: BuildOptions = BuildOptions(), *, timing_cache_path: Path | None = None,
                 rebuild: bool = False) -> bool:
    """Build ``engine_path`` (and ``<engine>.json``) from ``onnx_path`` for ``profiles`` ({input: (min, opt,
    max)}, see profiles.graph_profile). Returns False when an up-to-date engine was kept (never with
    ``rebuild``). ``timing_cache_path``: loaded when it was made by this flavour, version and GPU, saved after."""
    options = options.validate()
    profiles = as_profile(profiles)
    onnx_path, engine_path = require_file(Path(onnx_path), "ONNX file"), Path(engine_path)
    wanted = target_sidecar(onnx_path, profiles, options)
    reasons = engine_stale_reasons(engine_path, wanted)
    if not rebuild and not reasons:
        log.info("engine %s is up to date", engine_path)
        return False
    log.info("building %s: %s", engine_path, "; ".join(reasons))

    if options.flavor == "tensorrt-rtx":
        timing_cache_path = None  # TensorRT-RTX times no kernels ahead of time: its timing cache is a no-op
    pg = _polygraphy(options.flavor)
    network = parse_network(pg, onnx_path, profiles, wanted.version)
    config = configure(pg, network, profiles, options, _load_timing_cache(timing_cache_path, wanted))
    try:
        plan = pg.EngineBytesFromNetwork(network, config)()
    except pg.PolygraphyException as e:
        raise UserError(f"{flavor_label(options.flavor)} failed to build an engine from {onnx_path} ({e}; see its "
                        "log above)") from e
    save_engine(engine_path, memoryview(plan), wanted)
    if timing_cache_path:
        write_atomic(timing_cache_path, memoryview(config.get_timing_cache().serialize()))
        write_atomic(_identity_path(timing_cache_path), json.dumps(_timing_identity(wanted)))
    return True


def _polygraphy(flavor: Flavor) -> Any:
    """polygraphy's TensorRT loaders for ``flavor`` (a namespace: CreateNetwork, CreateConfig(RTX), Profile,
    EngineBytesFromNetwork, PolygraphyException). Polygraphy picks its flavour once per process, at import."""
    from polygraphy import config as polygraphy_config

    rtx = flavor == "tensorrt-rtx"
    if "polygraphy.backend.trt" in sys.modules and rtx != polygraphy_config.USE_TENSORRT_RTX:
        raise UserError(f"this process already builds with the other TensorRT flavour; build {flavor} engines "
                        "in a new process")
    polygraphy_config.USE_TENSORRT_RTX = rtx
    from polygraphy.backend import trt as pg_trt
    from polygraphy.backend.tensorrt_rtx import CreateConfigRTX
    from polygraphy.backend.trt.util import get_trt_logger
    from polygraphy.exception import PolygraphyException
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.ERROR  # TensorRT's errors still show; polygraphy's chatter does not
    G_LOGGER.colors = False
    return types.SimpleNamespace(
        trt=importlib.import_module(MODULES[flavor]), logger=get_trt_logger(), CreateNetwork=pg_trt.CreateNetwork,
        CreateConfig=pg_trt.CreateConfig, CreateConfigRTX=CreateConfigRTX, Profile=pg_trt.Profile,
        EngineBytesFromNetwork=pg_trt.EngineBytesFromNetwork, PolygraphyException=PolygraphyException)


def parse_network(pg: Any, onnx_path: Path, profiles: GraphProfile, version: str) -> tuple[Any, Any, Any]:
    """(builder, strongly typed network, parser) of ``onnx_path``; UserError with the parser's errors in one
    line, or when the graph's inputs are not the profile's. The parser holds the weights: keep it with them."""
    trt = pg.trt
    typing = network_typing(version, hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"))
    builder, network = pg.CreateNetwork(strongly_typed=typing == "flag")()
    parser = trt.OnnxParser(network, pg.logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [" ".join(str(parser.get_error(i)).split()) for i in range(parser.num_errors)]
        raise UserError(f"TensorRT cannot parse {onnx_path}: {' | '.join(errors) or 'no details given'}")
    inputs = sorted(network.get_input(i).name for i in range(network.num_inputs))
    if inputs != sorted(profiles):
        raise UserError(f"{onnx_path} has inputs {inputs}, the profile is for {sorted(profiles)}")
    return builder, network, parser


def configure(pg: Any, network: tuple[Any, Any, Any], profiles: GraphProfile, options: BuildOptions,
              timing_cache: Path | None) -> Any:
    """The builder configuration: one optimisation profile, the optimisation level, the workspace cap, the
    RTX targets, the timing cache, and TF32 off (TensorRT enables it by default, which would round the fp32
    parts of the fp16 graphs and every fp32 engine to 10-bit mantissas)."""
    trt = pg.trt
    profile = pg.Profile()
    for name, (lo, opt, hi) in profiles.items():
        profile.add(name, lo, opt, hi)
    kwargs: dict[str, Any] = {"profiles": [profile], "builder_optimization_level": options.opt_level,
                              "load_timing_cache": str(timing_cache) if timing_cache else None}
    if options.workspace_gib is not None:
        kwargs["memory_pool_limits"] = {trt.MemoryPoolType.WORKSPACE: int(options.workspace_gib * (1 << 30))}
    if options.flavor == "tensorrt-rtx":
        for cap in options.compute_capabilities:
            rtx_compute_capability(cap)  # UserError for a target this version cannot build for
        targets = [tuple(int(p) for p in cap.split(".")) for cap in options.compute_capabilities]
        create: Callable[..., Any] = pg.CreateConfigRTX(compute_capabilities=targets, **kwargs)
    else:
        create = pg.CreateConfig(tf32=False, **kwargs)
    builder, net, _ = network
    try:
        with warnings.catch_warnings():  # polygraphy sets a timing cache, which TensorRT-RTX deprecates
            warnings.simplefilter("ignore", DeprecationWarning)
            config = create(builder, net)
    except pg.PolygraphyException as e:
        raise UserError(f"cannot configure the {options.flavor} builder: {e}") from e
    config.clear_flag(trt.BuilderFlag.TF32)
    return config


def save_engine(engine_path: Path, plan: memoryview, sidecar: Sidecar) -> None:
    """Install the engine and then its sidecar (with the engine's hash). The old sidecar goes first, so an
    interruption leaves an engine without a sidecar, which is rebuilt, never a sidecar describing another."""
    sidecar_path(engine_path).unlink(missing_ok=True)
    write_atomic(engine_path, plan)
    write_sidecar(engine_path, dataclasses.replace(sidecar, engine_sha256=sha256_file(engine_path),
                                                   created=now_utc()))


def _identity_path(timing_cache_path: Path) -> Path:
    return timing_cache_path.with_name(timing_cache_path.name + ".json")


def _timing_identity(sidecar: Sidecar) -> dict[str, Any]:
    return {"flavor": sidecar.flavor, "version": sidecar.version, "gpu_name": sidecar.gpu_name,
            "compute_capabilities": list(sidecar.compute_capabilities)}


def _load_timing_cache(path: Path | None, wanted: Sidecar) -> Path | None:
    """``path`` if the timing cache there was made by this flavour, version and GPU, else None (a new cache),
    with a warning naming the difference. TensorRT itself accepts a mismatched cache without a word."""
    if path is None or not path.is_file():
        return None
    try:
        made_by = json.loads(_identity_path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        made_by = None
    if made_by != _timing_identity(wanted):
        log.warning("timing cache %s was made by %s, this build is %s: starting a new one", path,
                    made_by or "an unknown build", _timing_identity(wanted))
        return None
    return path


def build_engines(onnx_files: dict[str, Path], engine_dir: Path, params: ProfileParams,
                  options: BuildOptions = BuildOptions(), *, rebuild: bool = False,
                  progress: Callable[[str], None] | None = None) -> list[Path]:
    """Build the engine of each graph in ``onnx_files`` ({graph: ONNX path}, e.g. the backend graphs of
    ``onnx_export.onnx_path``) into ``engine_dir``, sharing one timing cache there. ``progress`` gets one line
    per engine: built (with its build time) or up to date. Returns the engine paths."""
    from ccld_trt.engines.engine import engine_file
    from ccld_trt.engines.profiles import graph_profile

    params.validate()
    options = options.validate()
    require_flavor(options.flavor)  # before anything else, so a machine without it gets the one clear line
    sources = {g: require_file(Path(p), f"{g} ONNX graph (run `ccld-trt export`)") for g, p in onnx_files.items()}
    paths = []
    for graph, onnx_path in sources.items():
        path = engine_file(Path(engine_dir), graph, onnx_precision(onnx_path))
        start = time.perf_counter()
        built = build_engine(onnx_path, path, graph_profile(graph, params), options,
                             timing_cache_path=Path(engine_dir) / "timing.cache", rebuild=rebuild)
        if progress:
            took = f"built in {time.perf_counter() - start:.1f} s" if built else "up to date"
            progress(f"engine {path.name}: {took}")
        paths.append(path)
    return paths

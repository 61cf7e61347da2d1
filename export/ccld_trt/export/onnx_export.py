"""Export the five graphs of graph_specs (unet, unet_cfg, decoder, text_encoder, image_encoder) to ONNX, for
ONNX Runtime and TensorRT, redoing only what changed.

Each fp32 graph is traced with the TorchScript exporter (``dynamo=False``: the dynamo exporter needs onnxscript),
opset 17, with dynamic batch, conditions and latent size; simplified with onnxslim (constant folding, dead code);
stamped with metadata (source checkpoint SHA-256, model configuration, versions); checked (the ONNX checker with
strict shape inference, the graph_specs I/O contract, ops TensorRT's ONNX parser supports); and compared with the
torch module in ONNX Runtime at two shapes, neither of them the traced one alone. The fp16 graph
(``fp16.convert_to_fp16``) is checked the same way and compared with the fp32 one through ``fp16.emulate_fp16``.

Files: ``<out>/<graph>.onnx`` and ``<out>/<graph>.fp16.onnx``, each with ``<file>.data`` beside it when its
tensors exceed protobuf's 2 GB (the 1.2 B-parameter teacher). ``<out>/manifest.json`` records what each file was
made from; a graph whose sources, configuration, exporter and options are unchanged is not exported again.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from ccld_trt.export.autoencoder import load_autoencoder_config
from ccld_trt.export.checkpoints import sha256_file
from ccld_trt.export.cloob import cloob_image_size, load_cloob_config
from ccld_trt.export.errors import UserError
from ccld_trt.export.fp16 import (
    FP16_VERSION,
    convert_to_fp16,
    emulate_fp16,
    fp16_problems,
    infer_shapes,
    relative_error,
)
from ccld_trt.export.graph_specs import EOT_TOKEN, GRAPHS, SOT_TOKEN, GraphSpec
from ccld_trt.export.guided_unet import GuidedUNet
from ccld_trt.export.models import ModelFiles, Networks, load_networks
from ccld_trt.export.unet import infer_unet_config
from ccld_trt.export.upsample_rewrite import fold_upsample_convs

log = logging.getLogger(__name__)

# Bump when a change here changes the graphs written: the manifest then redoes every export.
EXPORTER_VERSION = 3
OPSET = 17  # LayerNormalization needs 17; TensorRT 10 parses opsets 9 to 20
GRAPH_NAMES: tuple[str, ...] = tuple(GRAPHS)
PRECISIONS = ("fp32", "fp16")
MANIFEST = "manifest.json"
FP32_TOLERANCE = 1e-4  # ||onnx - torch|| / ||torch|| per graph
# Protobuf cannot serialise a message of 2 GiB or more; the graph itself needs a little room beside the tensors.
EXTERNAL_DATA_THRESHOLD = onnx.checker.MAXIMUM_PROTOBUF - (64 << 20)
# Symbolic dims exported as dynamic; "image_size" stays static: the ViT's position embeddings fix it.
DYNAMIC_DIMS = frozenset({"batch", "conds", "height", "width"})
# Small sizes keep tracing fast; the latent sides must be multiples of 8 (three 2x downsamplings in the U-Net).
TRACE_DIMS = {"batch": 2, "conds": 2, "height": 8, "width": 16}
CHECK_DIMS = {"batch": 3, "conds": 3, "height": 16, "width": 8}

# Which checkpoint each graph comes from.
_COMPONENT = {"unet": "unet", "unet_cfg": "unet", "decoder": "autoencoder", "text_encoder": "cloob",
              "image_encoder": "cloob"}

# Ops of the default ONNX domain that TensorRT 10's ONNX parser supports (onnx-tensorrt docs/operators.md),
# limited to those that make sense in these networks; an exported graph may use no other.
TENSORRT_OPS = frozenset({
    "Abs", "Add", "And", "ArgMax", "ArgMin", "AveragePool", "BatchNormalization", "Cast", "Ceil", "Clip",
    "Concat", "Constant", "ConstantOfShape", "Conv", "ConvTranspose", "Cos", "CumSum", "DepthToSpace", "Div",
    "Einsum", "Elu", "Equal", "Erf", "Exp", "Expand", "Flatten", "Floor", "Gather", "GatherElements", "GatherND",
    "Gelu", "Gemm", "GlobalAveragePool", "Greater", "GreaterOrEqual", "GroupNormalization", "HardSigmoid",
    "HardSwish", "Identity", "InstanceNormalization", "LayerNormalization", "LeakyRelu", "Less", "LessOrEqual",
    "Log", "LogSoftmax", "LpNormalization", "MatMul", "Max", "MaxPool", "Mean", "Min", "Mish", "Mod", "Mul",
    "Neg", "Not", "OneHot", "Or", "Pad", "Pow", "PRelu", "Range", "Reciprocal", "ReduceL1", "ReduceL2",
    "ReduceMax", "ReduceMean", "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare", "Relu", "Reshape",
    "Resize", "Round", "ScatterElements", "ScatterND", "Shape", "Sigmoid", "Sign", "Sin", "Size", "Slice",
    "Softmax", "Softplus", "SpaceToDepth", "Split", "Sqrt", "Squeeze", "Sub", "Sum", "Tanh", "Tile", "Transpose",
    "Trilu", "Unsqueeze", "Where", "Xor",
})
TENSORRT_OPSETS = range(9, 21)
# Inputs TensorRT needs as build-time constants (initializers or Constant outputs), by op: input indices.
_CONSTANT_INPUTS = {
    "OneHot": (1,), "CumSum": (1,), "ReduceL1": (1,), "ReduceL2": (1,), "ReduceMax": (1,), "ReduceMean": (1,),
    "ReduceMin": (1,), "ReduceProd": (1,), "ReduceSum": (1,), "ReduceSumSquare": (1,), "Squeeze": (1,),
    "Unsqueeze": (1,), "InstanceNormalization": (1, 2),
}


class ExportError(RuntimeError):
    """An exported graph failed its checks: a bug in the exporter or a model definition, not in the inputs."""


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
    root = Path(build_dir or os.environ.get("CCLD_TRT_BUILD") or "build")
    return root / "onnx" / hashlib.sha256(ident.encode()).hexdigest()[:12]


def export_all(files: ModelFiles, out_dir: Path, graphs: Sequence[str] = GRAPH_NAMES, fp16: bool = True,
               progress: bool = True, networks: Networks | None = None) -> dict[str, Path]:
    """Export ``graphs`` (fp32, and fp16 too if ``fp16``) of the model ``files`` into ``out_dir``, skipping every
    file the manifest shows up to date. ``networks``: the already loaded networks of these files (else they are
    loaded, only if something must be exported). Returns {"<graph>": fp32 path, "<graph>.fp16": fp16 path}.

    Raises UserError for unknown graph names or missing model files, ExportError when a graph fails its checks.
    """
    unknown = [g for g in graphs if g not in GRAPHS]
    if unknown:
        raise UserError(f"unknown graph(s) {', '.join(unknown)}; choose from {', '.join(GRAPH_NAMES)}")
    files.check_present()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = _read_manifest(out_dir)
    unchanged = json.dumps(manifest, sort_keys=True)
    keys = _GraphKeys(files, manifest["hashes"])
    wanted = [(g, p) for g in graphs for p in (PRECISIONS if fp16 else ("fp32",))]
    paths = {g if p == "fp32" else f"{g}.fp16": onnx_path(out_dir, g, p) for g, p in wanted}
    stale = [(g, p) for g, p in wanted if not _is_current(manifest, out_dir, g, p, keys.key(g, p))]
    if json.dumps(manifest, sort_keys=True) != unchanged:  # checkpoint hashes computed anew
        _write_manifest(out_dir, manifest)
    if not stale:
        _say(f"onnx: {len(wanted)} graph file(s) in {out_dir} are up to date", progress)
        return paths

    from tqdm import tqdm

    networks = networks or load_networks(files)
    modules = graph_modules(networks)
    configs: dict[str, dict[str, Any]] = {"unet": unet_config(networks.unet), **keys.known_configs}
    with tqdm(total=len(stale), desc="onnx export", unit="graph", disable=not progress) as bar:
        for graph, precision in stale:
            bar.set_postfix_str(f"{graph} {precision}")
            metadata = _metadata(graph, precision, keys, configs[_COMPONENT[graph]])
            if precision == "fp32":
                record = _export_fp32(graph, modules[graph], out_dir, metadata, keys.image_size)
            else:
                record = _export_fp16(graph, out_dir, metadata, keys.image_size)
            manifest["graphs"].setdefault(graph, {})[precision] = {"key": keys.key(graph, precision), **record}
            _write_manifest(out_dir, manifest)  # after each file, so an interrupted run keeps what it finished
            bar.update()
    _say(f"onnx: exported {len(stale)} graph file(s) into {out_dir}", progress)
    return paths


def _say(message: str, progress: bool) -> None:
    log.info(message)
    if progress:
        print(message, file=sys.stderr)


def graph_modules(networks: Networks) -> dict[str, nn.Module]:
    """The torch module whose function each graph computes (the original code's)."""
    return {"unet": networks.unet, "unet_cfg": GuidedUNet(networks.unet), "decoder": networks.decoder,
            "text_encoder": networks.text_encoder, "image_encoder": networks.image_encoder}


def traced_module(graph: str, module: nn.Module) -> nn.Module:
    """What is traced for ``graph``: ``module`` with the exact rewrites that make its graph cheaper (the
    decoder's upsampling convolutions in phase form, see upsample_rewrite); checked against ``module``."""
    return fold_upsample_convs(module) if graph == "decoder" else module


def unet_config(unet: nn.Module) -> dict[str, Any]:
    """The U-Net's configuration, as its weights imply it, and its stored latent scale."""
    state = unet.state_dict()
    base, multipliers = infer_unet_config(state)
    return {"base_channels": base, "channel_multipliers": multipliers,
            "parameters": sum(p.numel() for p in unet.parameters()),
            "autoencoder_scale": float(state["autoencoder_scale"])}


# ---------------------------------------------------------------------------------------------------------------
# What a graph is made from: the manifest key


class _GraphKeys:
    """The manifest key of each graph file: its checkpoint's SHA-256, its configuration, exporter and options.

    Checkpoint hashes are cached in the manifest by (path, size, mtime), so an unchanged rerun reads no weights.
    """

    def __init__(self, files: ModelFiles, hash_cache: dict[str, dict[str, Any]]) -> None:
        self._cache = hash_cache
        embed_dim, ddconfig = load_autoencoder_config(files.autoencoder_config)
        cloob_config = load_cloob_config(files.cloob_config)
        self.image_size = cloob_image_size(cloob_config)
        # The U-Net's configuration is implied by its checkpoint (see unet.infer_unet_config): no entry.
        self.known_configs: dict[str, dict[str, Any]] = {
            "autoencoder": {"embed_dim": embed_dim, "ddconfig": ddconfig}, "cloob": cloob_config}
        self.checkpoints = {"unet": files.unet, "autoencoder": files.autoencoder, "cloob": files.cloob}
        self._digests: dict[str, str] = {}

    def checkpoint_sha256(self, component: str) -> str:
        if component not in self._digests:
            self._digests[component] = _cached_sha256(Path(self.checkpoints[component]), self._cache)
        return self._digests[component]

    def key(self, graph: str, precision: str) -> dict[str, Any]:
        component = _COMPONENT[graph]
        key: dict[str, Any] = {"checkpoint_sha256": self.checkpoint_sha256(component),
                               "config": self.known_configs.get(component), "exporter": EXPORTER_VERSION,
                               "opset": OPSET, "versions": versions()}
        if precision == "fp16":
            key["fp16"] = FP16_VERSION
        return key


def versions() -> dict[str, str]:
    """The versions of everything that shapes an exported graph (read from package metadata: importing onnxslim
    takes a second, which an up-to-date export should not spend)."""
    from importlib.metadata import version

    return {"ccld_trt": importlib.metadata.version("ccld-trt"), "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxslim": version("onnxslim"), "onnxconverter_common": version("onnxconverter-common")}


def _cached_sha256(path: Path, cache: dict[str, dict[str, Any]]) -> str:
    stat = path.stat()
    entry = cache.get(str(path.resolve()))
    if entry and entry["size"] == stat.st_size and entry["mtime_ns"] == stat.st_mtime_ns:
        return str(entry["sha256"])
    digest = sha256_file(path)
    cache[str(path.resolve())] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest}
    return digest


def _read_manifest(out_dir: Path) -> dict[str, Any]:
    """The manifest, or an empty one when it is missing or unreadable (then everything is exported again)."""
    try:
        manifest = json.loads((out_dir / MANIFEST).read_text())
        if isinstance(manifest.get("graphs"), dict) and isinstance(manifest.get("hashes"), dict):
            return manifest
    except (OSError, ValueError, AttributeError):
        pass
    return {"graphs": {}, "hashes": {}}


def _write_manifest(out_dir: Path, manifest: Mapping[str, Any]) -> None:
    tmp = out_dir / f".{MANIFEST}.{os.getpid()}.tmp"  # per process: two exports into one directory may race
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    os.replace(tmp, out_dir / MANIFEST)


def _is_current(manifest: Mapping[str, Any], out_dir: Path, graph: str, precision: str,
                key: Mapping[str, Any]) -> bool:
    """Whether the manifest's record of this file has ``key`` and its files are there, with the recorded sizes."""
    record = manifest["graphs"].get(graph, {}).get(precision) or {}
    if record.get("key") != key or not record.get("files"):
        return False
    return all((out_dir / name).is_file() and (out_dir / name).stat().st_size == size
               for name, size in record["files"].items())


def _metadata(graph: str, precision: str, keys: _GraphKeys, config: Mapping[str, Any]) -> dict[str, str]:
    """metadata_props of a graph file: where it comes from and how it was made."""
    component = _COMPONENT[graph]
    return {
        "ccld_trt.graph": graph,
        "ccld_trt.precision": precision,
        "ccld_trt.source_sha256": json.dumps({component: keys.checkpoint_sha256(component)}),
        "ccld_trt.model_config": json.dumps(config, sort_keys=True),
        "ccld_trt.versions": json.dumps({**versions(), "exporter": EXPORTER_VERSION, "opset": OPSET}),
    }


# ---------------------------------------------------------------------------------------------------------------
# Exporting one file


def _export_fp32(graph: str, module: nn.Module, out_dir: Path, metadata: Mapping[str, str],
                 image_size: int) -> dict[str, Any]:
    import onnxslim

    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".export-") as tmp:
        traced = Path(tmp) / "traced" / "model.onnx"  # torch may write external data files beside it
        traced.parent.mkdir()
        trace(traced_module(graph, module), graph, random_inputs(graph, TRACE_DIMS, image_size), traced)
        model = onnxslim.slim(onnx.load(traced))
        infer_shapes(model)  # onnxslim leaves duplicate value_info entries
        onnx.helper.set_model_props(model, dict(metadata))
        staged = onnx_path(Path(tmp), graph)
        written = save_onnx(model, staged)
        del model
        _raise_problems(staged, check_graph(staged, graph))
        error = compare_with_torch(staged, module, graph, image_size)
        if error > FP32_TOLERANCE:
            raise ExportError(f"{graph}: ONNX Runtime differs from torch by {error:.2e} (relative) > "
                              f"{FP32_TOLERANCE:.0e}")
        return {"files": _install(written, out_dir), "error_vs_torch": error}


def _export_fp16(graph: str, out_dir: Path, metadata: Mapping[str, str], image_size: int) -> dict[str, Any]:
    source = onnx_path(out_dir, graph)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".export-") as tmp:
        model = convert_to_fp16(onnx.load(source))
        onnx.helper.set_model_props(model, dict(metadata))
        emulated = Path(tmp) / "emulated" / "model.onnx"
        emulated.parent.mkdir()
        save_onnx(emulate_fp16(model), emulated)
        staged = onnx_path(Path(tmp), graph, "fp16")
        written = save_onnx(model, staged)
        del model
        _raise_problems(staged, check_graph(staged, graph))
        error = validate_fp16(source, staged, emulated, graph, image_size)
        return {"files": _install(written, out_dir), "error_vs_fp32": error}


def trace(module: nn.Module, graph: str, inputs: Mapping[str, torch.Tensor], path: Path) -> None:
    """torch.onnx.export ``module`` (called with ``inputs`` in graph_specs order) to ``path``, with graph_specs'
    names and its symbolic dims in DYNAMIC_DIMS dynamic."""
    spec = GRAPHS[graph]
    dynamic_axes = {t.name: {i: str(d) for i, d in enumerate(t.shape) if _is_dynamic(d)}
                    for t in (*spec.inputs, *spec.outputs)}
    with warnings.catch_warnings():
        # The GroupNorm trace warning is about a shape check that does not concern inference; the deprecation
        # notices are about the TorchScript exporter, the one verified to export these modules with dynamic shapes
        # (the dynamo exporter needs onnxscript).
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx")
        torch.onnx.export(module, tuple(inputs.values()), str(path), input_names=[t.name for t in spec.inputs],
                          output_names=[t.name for t in spec.outputs], opset_version=OPSET,
                          dynamic_axes=dynamic_axes, do_constant_folding=True, dynamo=False)


def _is_dynamic(dim: int | str) -> bool:
    return isinstance(dim, str) and dim.rpartition("*")[2] in DYNAMIC_DIMS


def tensor_bytes(model: onnx.ModelProto) -> int:
    """Serialised size of the model's initializers."""
    return sum(t.ByteSize() for t in model.graph.initializer)


def needs_external_data(nbytes: int, threshold: int = EXTERNAL_DATA_THRESHOLD) -> bool:
    """Whether ``nbytes`` of tensors must go to an external data file (protobuf's 2 GB limit)."""
    return nbytes > threshold


def save_onnx(model: onnx.ModelProto, path: Path, threshold: int = EXTERNAL_DATA_THRESHOLD) -> list[Path]:
    """Write ``model`` to ``path``, its tensors into ``<path>.data`` when they exceed ``threshold`` bytes.
    Returns the files written. With external data, ``model`` is left without its tensor contents (onnx moves
    them out in place)."""
    path = Path(path)
    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)  # onnx would append to it
    if needs_external_data(tensor_bytes(model), threshold):
        onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=1024)
        return [path, data]
    onnx.save_model(model, path)
    return [path]


def _install(staged: Iterable[Path], out_dir: Path) -> dict[str, int]:
    """Move the staged files of one graph into ``out_dir`` (replacing a stale data file) -> {name: size}."""
    staged = list(staged)
    onnx_file = out_dir / staged[0].name
    if len(staged) == 1:
        onnx_file.with_name(onnx_file.name + ".data").unlink(missing_ok=True)
    sizes = {}
    for path in reversed(staged):  # the data before the graph that refers to it
        sizes[path.name] = path.stat().st_size
        os.replace(path, out_dir / path.name)
    return sizes


# ---------------------------------------------------------------------------------------------------------------
# Checks


def check_graph(path: Path, graph: str) -> list[str]:
    """Problems of a graph file: the ONNX checker with strict shape inference (full_check), the graph_specs I/O
    contract, and TensorRT's parser (tensorrt_problems). Empty when it passes."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        return [f"onnx checker: {' '.join(str(e).split())}"]
    model = onnx.load(path, load_external_data=False)
    return io_problems(model, GRAPHS[graph]) + tensorrt_problems(model)


def io_problems(model: onnx.ModelProto, spec: GraphSpec) -> list[str]:
    """Differences between the model's inputs/outputs and ``spec``: names, element types, ranks, static sizes,
    and dynamic dims named as the spec names them."""
    problems = []
    for kind, actual, expected in (("input", model.graph.input, spec.inputs),
                                   ("output", model.graph.output, spec.outputs)):
        if [v.name for v in actual] != [t.name for t in expected]:
            problems.append(f"{kind}s {[v.name for v in actual]}, expected {[t.name for t in expected]}")
            continue
        for value, tensor in zip(actual, expected, strict=True):
            elem = onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
            dims = [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
            if elem != np.dtype(tensor.dtype):
                problems.append(f"{kind} {value.name} is {elem}, expected {tensor.dtype}")
            wanted = [d if _is_dynamic(d) or isinstance(d, int) else None for d in tensor.shape]
            if len(dims) != len(wanted) or any(w is not None and d != w for d, w in zip(dims, wanted, strict=False)):
                problems.append(f"{kind} {value.name} has shape {dims}, expected {list(tensor.shape)}")
    return problems


def tensorrt_problems(model: onnx.ModelProto) -> list[str]:
    """What TensorRT's ONNX parser would refuse: ops outside TENSORRT_OPS or the default domain, model-local
    functions, an opset outside TENSORRT_OPSETS, and non-constant inputs where it needs build-time constants."""
    graph = model.graph
    problems = [f"opset {o.version} is outside TensorRT's {TENSORRT_OPSETS.start}..{TENSORRT_OPSETS.stop - 1}"
                for o in model.opset_import if o.domain in ("", "ai.onnx") and o.version not in TENSORRT_OPSETS]
    if model.functions:
        problems.append(f"model-local functions: {', '.join(f.name for f in model.functions)}")
    constants = {t.name for t in graph.initializer}
    constants |= {out for node in graph.node if node.op_type == "Constant" for out in node.output}
    for node in graph.node:
        if node.domain not in ("", "ai.onnx"):
            problems.append(f"node {node.name}: custom op {node.domain}::{node.op_type}")
        elif node.op_type not in TENSORRT_OPS:
            problems.append(f"node {node.name}: op {node.op_type} is not in the TensorRT allow-list")
        for i in _CONSTANT_INPUTS.get(node.op_type, ()):
            if i < len(node.input) and node.input[i] and node.input[i] not in constants:
                problems.append(f"node {node.name}: {node.op_type} input {i} must be a build-time constant")
    return problems


def _raise_problems(path: Path, problems: list[str]) -> None:
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise ExportError(f"{path.name} fails its checks: {shown}")


def random_inputs(graph: str, dims: Mapping[str, int], image_size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Inputs of ``graph`` in graph_specs order, sized by ``dims`` (batch, conds, height, width) and
    ``image_size``, with values as the pipeline feeds them: unit-normal latents, t in [0, 1), embeddings whose
    first row is the all-zero unconditional one, CFG weights [1 - sum(w), w...], CLIP token rows
    (SOT, ids, EOT, zero padding), pixels in [0, 1)."""
    gen = torch.Generator().manual_seed(seed)
    sizes = {**dims, "image_size": image_size}
    return {t.name: _INPUT_VALUES[t.name]([d if isinstance(d, int) else sizes[d] for d in t.shape], gen)
            for t in GRAPHS[graph].inputs}


def _embeddings(shape: list[int], gen: torch.Generator) -> torch.Tensor:
    embed = torch.randn(shape, generator=gen)
    embed[0] = 0
    return embed


def _cfg_weights(shape: list[int], gen: torch.Generator) -> torch.Tensor:
    w = 1 + 3 * torch.rand([shape[0] - 1], generator=gen)
    return torch.cat([1 - w.sum(0, keepdim=True), w])


def _tokens(shape: list[int], gen: torch.Generator) -> torch.Tensor:
    n, length = shape
    tokens = torch.zeros(shape, dtype=torch.int64)
    for i, eot in enumerate(torch.randint(1, length, (n,), generator=gen).tolist()):
        tokens[i, 0] = SOT_TOKEN
        tokens[i, 1:eot] = torch.randint(0, SOT_TOKEN, (eot - 1,), generator=gen)
        tokens[i, eot] = EOT_TOKEN
    return tokens


_INPUT_VALUES: dict[str, Callable[[list[int], torch.Generator], torch.Tensor]] = {
    "x": lambda s, g: torch.randn(s, generator=g),
    "latents": lambda s, g: torch.randn(s, generator=g),
    "t": lambda s, g: torch.rand(s, generator=g),
    "embed": _embeddings,
    "conds": _embeddings,
    "weights": _cfg_weights,
    "tokens": _tokens,
    "pixels": lambda s, g: torch.rand(s, generator=g),
}


def cpu_session(path: Path, optimize: bool = False) -> Any:
    """An ONNX Runtime CPU session; unoptimised by default, to run the graph as written."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _run_all(path: Path, feeds: Sequence[Mapping[str, torch.Tensor]]) -> list[np.ndarray]:
    """The (single) output of the graph at ``path`` for each feed; one session at a time keeps memory low."""
    session = cpu_session(path)
    return [session.run(None, {k: v.numpy() for k, v in feed.items()})[0] for feed in feeds]


def _check_feeds(graph: str, image_size: int) -> list[dict[str, torch.Tensor]]:
    return [random_inputs(graph, dims, image_size, seed) for seed, dims in enumerate((TRACE_DIMS, CHECK_DIMS))]


def compare_with_torch(path: Path, module: nn.Module, graph: str, image_size: int) -> float:
    """Largest relative error of the graph file against ``module`` over the two check shapes (float32)."""
    feeds = _check_feeds(graph, image_size)
    with torch.inference_mode():
        expected = [module(*feed.values()).numpy() for feed in feeds]
    return max(relative_error(got, want) for got, want in zip(_run_all(path, feeds), expected, strict=True))


def validate_fp16(fp32: Path, fp16: Path, emulated: Path, graph: str, image_size: int) -> float:
    """Check an fp16 graph against its fp32 source over the two check shapes: the fp16 file must run in ONNX
    Runtime with finite outputs, and its emulation (fp16.emulate_fp16) must stay finite and within
    FP16_TOLERANCE. Returns the emulation's largest relative error; raises ExportError otherwise."""
    feeds = _check_feeds(graph, image_size)
    reference = _run_all(fp32, feeds)
    problems = [f"as fp16 in ONNX Runtime: {int((~np.isfinite(out)).sum())} non-finite value(s)"
                for out in _run_all(fp16, feeds) if not np.isfinite(out).all()]
    outputs = _run_all(emulated, feeds)
    problems += [f"emulated: {p}" for out, ref in zip(outputs, reference, strict=True) for p in fp16_problems(ref, out)]
    _raise_problems(fp16, problems)
    return max(relative_error(out, ref) for out, ref in zip(outputs, reference, strict=True))

"""Export the six graphs of graph_specs (unet, unet_cfg, decoder, text_encoder, image_encoder, encoder) to ONNX, for
ONNX Runtime and TensorRT, redoing only what changed.

Each fp32 graph is traced with the TorchScript exporter (onnx_trace), opset 17, with dynamic batch, conditions
and latent size; simplified with onnxslim (constant folding, dead code); stamped with metadata (onnx_manifest:
source checkpoint SHA-256, model configuration, versions); checked (onnx_checks: the ONNX checker with strict
shape inference, the graph_specs I/O contract, ops TensorRT's ONNX parser supports); and compared with the torch
module in ONNX Runtime at two shapes, neither of them the traced one alone (onnx_validate, on onnx_inputs'
feeds). The fp16 graph (``fp16.convert_to_fp16``) is checked the same way and compared with the fp32 one through
``fp16.emulate_fp16``. This module runs those steps for each file that is not up to date.

Files: ``<out>/<graph>.onnx`` and ``<out>/<graph>.fp16.onnx``, each with ``<file>.data`` beside it when its
tensors exceed protobuf's 2 GB (the 1.2 B-parameter teacher). ``<out>/manifest.json`` records what each file was
made from; a graph whose sources, configuration, exporter and options are unchanged is not exported again.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import onnx
from torch import nn

from ccld_trt.export.errors import UserError
from ccld_trt.export.fp16 import convert_to_fp16, emulate_fp16, infer_shapes
from ccld_trt.export.graph_specs import GRAPH_PRECISIONS, GRAPHS
from ccld_trt.export.models import ModelFiles, Networks, load_networks
from ccld_trt.export.onnx_checks import ExportError, check_graph, raise_problems
from ccld_trt.export.onnx_files import default_onnx_dir, external_data, onnx_path
from ccld_trt.export.onnx_inputs import TRACE_DIMS, random_inputs
from ccld_trt.export.onnx_manifest import (
    COMPONENT,
    MANIFEST,
    graph_metadata,
    stale_graphs,
    unet_config,
    why_stale,
    write_manifest,
)
from ccld_trt.export.onnx_trace import graph_modules, save_onnx, trace, traced_module
from ccld_trt.export.onnx_validate import FP32_TOLERANCE, compare_with_torch, validate_fp16
from ccld_trt.export.slim import slim

# What callers import from here: this module's API, and names of the modules it was split into that other code
# imported from here before.
__all__ = ["GRAPH_NAMES", "MANIFEST", "ExportError", "default_onnx_dir", "export_all", "onnx_path", "random_inputs",
           "traced_module"]

log = logging.getLogger(__name__)

GRAPH_NAMES: tuple[str, ...] = tuple(GRAPHS)


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
    stale, keys, manifest = stale_graphs(files, out_dir, graphs, fp16)
    wanted = [(g, p) for g in graphs for p in (GRAPH_PRECISIONS if fp16 else ("fp32",))]
    paths = {g if p == "fp32" else f"{g}.fp16": onnx_path(out_dir, g, p) for g, p in wanted}
    if not stale:
        say(log, f"onnx: {len(wanted)} graph file(s) in {out_dir} are up to date", progress)
        return paths
    for graph, precision in stale:  # says why each is exported (again): a changed checkpoint, new versions...
        say(log, f"onnx: exporting {onnx_path(out_dir, graph, precision).name}: "
                 f"{why_stale(manifest, graph, precision, keys.key(graph, precision))}", progress)

    from tqdm import tqdm

    networks = networks or load_networks(files)
    modules = graph_modules(networks)
    configs: dict[str, dict[str, Any]] = {"unet": unet_config(networks.unet), **keys.known_configs}
    with tqdm(total=len(stale), desc="onnx export", unit="graph", disable=not progress) as bar:
        for graph, precision in stale:
            bar.set_postfix_str(f"{graph} {precision}")
            metadata = graph_metadata(graph, precision, keys, configs[COMPONENT[graph]])
            if precision == "fp32":
                record = _export_fp32(graph, modules[graph], out_dir, metadata, keys.image_size)
            else:
                record = _export_fp16(graph, out_dir, metadata, keys.image_size)
            manifest["graphs"].setdefault(graph, {})[precision] = {"key": keys.key(graph, precision), **record}
            write_manifest(out_dir, manifest)  # after each file, so an interrupted run keeps what it finished
            bar.update()
    say(log, f"onnx: exported {len(stale)} graph file(s) into {out_dir}", progress)
    return paths


def say(logger: logging.Logger, message: str, progress: bool) -> None:
    """Log ``message``, and show it on stderr too when the caller shows progress (export, quantize)."""
    logger.info(message)
    if progress:
        print(message, file=sys.stderr)


def _export_fp32(graph: str, module: nn.Module, out_dir: Path, metadata: Mapping[str, str],
                 image_size: int) -> dict[str, Any]:
    """Trace, simplify, stamp, check and validate one fp32 graph in a staging directory, then install it."""
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".export-") as tmp:
        traced = Path(tmp) / "traced" / "model.onnx"  # torch may write external data files beside it
        traced.parent.mkdir()
        trace(traced_module(graph, module), graph, random_inputs(graph, TRACE_DIMS, image_size), traced)
        model = slim(onnx.load(traced))
        infer_shapes(model)  # onnxslim leaves duplicate value_info entries
        onnx.helper.set_model_props(model, dict(metadata))
        staged = onnx_path(Path(tmp), graph)
        written = save_onnx(model, staged)
        del model
        raise_problems(staged, check_graph(staged, graph))
        error = compare_with_torch(staged, module, graph, image_size)
        if error > FP32_TOLERANCE:
            raise ExportError(f"{graph}: ONNX Runtime differs from torch by {error:.2e} (relative) > "
                              f"{FP32_TOLERANCE:.0e}")
        return {"files": install_staged(written, out_dir), "error_vs_torch": error}


def _export_fp16(graph: str, out_dir: Path, metadata: Mapping[str, str], image_size: int) -> dict[str, Any]:
    """Convert the installed fp32 graph to fp16, check and validate it in a staging directory, then install it."""
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
        raise_problems(staged, check_graph(staged, graph))
        error = validate_fp16(source, staged, emulated, graph, image_size)
        return {"files": install_staged(written, out_dir), "error_vs_fp32": error}


def install_staged(staged: Iterable[Path], out_dir: Path) -> dict[str, int]:
    """Move the staged files of one graph into ``out_dir`` (replacing a stale data file) -> {name: size}.
    Each move is one rename within ``out_dir``'s file system (the staging directory is inside it)."""
    staged = list(staged)
    onnx_file = out_dir / staged[0].name
    if len(staged) == 1:
        external_data(onnx_file).unlink(missing_ok=True)
    sizes = {}
    for path in reversed(staged):  # the data before the graph that refers to it
        sizes[path.name] = path.stat().st_size
        os.replace(path, out_dir / path.name)
    return sizes

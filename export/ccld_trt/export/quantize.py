"""Post-training int8 quantisation (NNCF) of the exported fp32 graphs, for the OpenVINO backend's ``int8``.

Each graph gets the scheme its measurement chose (README, "OpenVINO"): ``convs`` (weights and input activations
of every convolution in int8, calibrated on feeds of the project's own sampling trajectories; every other op
keeps the backend's bf16), ``weights`` (int8 weights only, decompressed at run time: no calibration), or none
(the graph keeps running from its fp32 ONNX file at the backend's bf16). NNCF's default placement is not used:
it also quantises the graph inputs ``t`` and ``conds``, the timestep features and the AdaGN scales, which
ruined the U-Net (PSNR 17 dB); convolutions alone hold almost all of the FLOPs. The calibration feeds come from
the caller (the runtime runs the sampler to make them; this layer cannot), and are asked for only when a graph
must be quantised again.

Files: ``<dir>/<graph>.int8.xml`` + ``.bin`` (OpenVINO IR) beside the ONNX graphs they come from, recorded in
``<dir>/int8-manifest.json`` with what they were made from (the fp32 graph's own manifest key, the scheme, the
calibration set, the versions of NNCF and OpenVINO); an up-to-date graph is not quantised again.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ccld_trt.export.atomic import write_atomic
from ccld_trt.export.errors import UserError
from ccld_trt.export.onnx_export import install_staged, onnx_path, say
from ccld_trt.export.onnx_manifest import read_manifest
from ccld_trt.export.quiet_imports import import_openvino

log = logging.getLogger(__name__)

# Bump when a change here changes the files written: every graph is quantised again.
QUANTIZE_VERSION = 1
SCHEME_NAMES = ("convs", "weights")
# The scheme of each graph quantised; the graphs not named keep running at bf16. Chosen by measurement on the
# full-size model (README, "OpenVINO"): the U-Net's convolutions in int8 (1.4-1.8x its bf16 speed, end-to-end PSNR
# 29-31 dB against torch fp32); the decoder stays at bf16 (its int8 convolutions dropped that under 30 dB).
SCHEMES: dict[str, str] = {"unet_cfg": "convs"}
INT8_MANIFEST = "int8-manifest.json"
INSTALL_HINT = "pip install 'ccld-trt[openvino]'"

Feed = Mapping[str, np.ndarray]  # {graph input name: array}, one call of the graph


def quantized_path(onnx_dir: Path, graph: str) -> Path | None:
    """``<dir>/<graph>.int8.xml``, the int8 model of ``graph``; None for a graph that is not quantised."""
    return Path(onnx_dir) / f"{graph}.int8.xml" if graph in SCHEMES else None


def needs_calibration(graphs: Sequence[str]) -> bool:
    """Whether quantising ``graphs`` needs calibration feeds (some graph's scheme is ``convs``)."""
    return any(SCHEMES.get(g) == "convs" for g in graphs)


def _require() -> tuple[Any, Any]:
    try:
        openvino = import_openvino()  # first: it holds off the telemetry NNCF would start too
        import nncf
    except ImportError as e:
        raise UserError(f"int8 quantisation needs OpenVINO and NNCF: {INSTALL_HINT}") from e
    return openvino, nncf


def versions() -> dict[str, str]:
    """Versions of what shapes a quantised file (read from package metadata, cheap when nothing is redone)."""
    return {name: importlib.metadata.version(name) for name in ("nncf", "openvino")}


def quantize_graph(source: Path, scheme: str, feeds: Sequence[Feed], out: Path) -> list[Path]:
    """Quantise the fp32 graph file ``source`` with ``scheme`` (``convs``: calibrated on ``feeds``;
    ``weights``: ``feeds`` unused) into the OpenVINO IR ``out`` (.xml, weights in the .bin beside it). Returns
    the files."""
    ov, nncf = _require()
    if scheme not in SCHEME_NAMES:
        raise ValueError(f"unknown int8 scheme {scheme!r}; choose from {', '.join(SCHEME_NAMES)}")
    model = ov.Core().read_model(str(source))
    if scheme == "convs":
        if not feeds:
            raise ValueError("int8 convolutions need calibration feeds")
        # Every op type but Convolution is ignored, so that no quantiser lands on anything else (see above).
        others = sorted({op.get_type_name() for op in model.get_ordered_ops()}
                        - {"Convolution", "Parameter", "Result", "Constant"})
        # Every feed is used (subset_size), with the default "performance" preset: symmetric int8, the form the
        # CPU's VNNI kernels run fastest. Fast bias correction keeps each convolution's mean output.
        model = nncf.quantize(model, nncf.Dataset(list(feeds)), subset_size=len(feeds),
                              ignored_scope=nncf.IgnoredScope(types=others, validate=False))
    else:
        model = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM)
    ov.save_model(model, str(out), compress_to_fp16=False)
    return [out, out.with_suffix(".bin")]


def graph_key(onnx_dir: Path, graph: str, calibration: Mapping[str, Any]) -> dict[str, Any]:
    """What the int8 file of ``graph`` is made from: its fp32 graph's manifest key (checkpoint, exporter...),
    the scheme, the calibration set (for ``convs``) and the versions. UserError when the fp32 graph is not
    exported (its manifest has no record of it)."""
    record = read_manifest(Path(onnx_dir))["graphs"].get(graph, {}).get("fp32")
    if not record or not onnx_path(onnx_dir, graph).is_file():
        raise UserError(f"{graph}: no exported fp32 graph in {onnx_dir} to quantise; export it first")
    scheme = SCHEMES[graph]
    return {"source": record["key"], "scheme": scheme, "quantizer": QUANTIZE_VERSION, "versions": versions(),
            "calibration": dict(calibration) if scheme == "convs" else None}


def _read_manifest(onnx_dir: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((onnx_dir / INT8_MANIFEST).read_text(encoding="utf-8"))
        return manifest if isinstance(manifest, dict) else {}
    except (OSError, ValueError):
        return {}


def is_current(onnx_dir: Path, graph: str, key: Mapping[str, Any]) -> bool:
    """Whether the int8 manifest records ``key`` for ``graph`` and its files are there with their sizes."""
    record = _read_manifest(Path(onnx_dir)).get(graph) or {}
    if record.get("key") != key or not record.get("files"):
        return False
    return all((onnx_dir / name).is_file() and (onnx_dir / name).stat().st_size == size
               for name, size in record["files"].items())


def quantize_all(onnx_dir: Path, calibrate: Callable[[], Mapping[str, Sequence[Feed]]],
                 calibration: Mapping[str, Any], graphs: Sequence[str] = tuple(SCHEMES),
                 progress: bool = True) -> dict[str, Path]:
    """Quantise ``graphs`` of ``onnx_dir`` (their fp32 ONNX exported there) by their SCHEMES, skipping those
    the int8 manifest shows up to date. ``calibrate()`` -> {graph: feeds}, called at most once and only when a
    ``convs`` graph is stale; ``calibration`` describes what it feeds (prompts, seeds, steps: part of the key).
    Returns {graph: int8 model path}."""
    _require()  # one line saying what to install, before anything else
    onnx_dir = Path(onnx_dir)
    unknown = [g for g in graphs if g not in SCHEMES]
    if unknown:
        raise UserError(f"no int8 scheme for {', '.join(unknown)}; int8 graphs: {', '.join(SCHEMES)}")
    keys = {g: graph_key(onnx_dir, g, calibration) for g in graphs}
    paths = {g: onnx_dir / f"{g}.int8.xml" for g in graphs}
    stale = [g for g in graphs if not is_current(onnx_dir, g, keys[g])]
    if not stale:
        say(log, f"int8: {len(graphs)} graph(s) in {onnx_dir} are up to date", progress)
        return paths
    feeds: Mapping[str, Sequence[Feed]] = {}
    if needs_calibration(stale):
        say(log, "int8: calibrating on sampling trajectories through the fp32 graphs (minutes on a small CPU)",
            progress)
        feeds = calibrate()
    for graph in stale:
        say(log, f"int8: quantising {graph} ({SCHEMES[graph]})", progress)
        with tempfile.TemporaryDirectory(dir=onnx_dir, prefix=".int8-") as tmp:
            staged = quantize_graph(onnx_path(onnx_dir, graph), SCHEMES[graph], feeds.get(graph, ()),
                                    Path(tmp) / paths[graph].name)
            sizes = install_staged(staged, onnx_dir)
        manifest = _read_manifest(onnx_dir)
        manifest[graph] = {"key": keys[graph], "files": sizes}
        write_atomic(onnx_dir / INT8_MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))
    say(log, f"int8: quantised {len(stale)} graph(s) into {onnx_dir}", progress)
    return paths

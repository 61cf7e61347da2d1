"""What TensorRT engines cost to make: build time and size of the four fp16 engines of the bench weights.

Engines are built ahead of time, so their cost is not a latency; the rows say what ``make engines`` takes on this
machine (TensorRT-RTX builds on a machine without a GPU) and how much disk the engines need.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ccld_trt.benchmarks.records import Skip
from ccld_trt.export.errors import UserError
from ccld_trt.export.models import ModelFiles
from ccld_trt.export.onnx_files import external_data

MIB = 2**20


def measure_engine_builds(files: ModelFiles, log: Callable[[str], None],
                          build_dir: Path | None = None) -> tuple[list[dict[str, Any]], Skip | None]:
    """Build the fp16 engines of the backend graphs of ``files`` into a fresh directory (under ``build_dir``,
    default the system's temporary one), one graph at a time, each timed.

    Returns one row per engine ({graph, flavor, version, targets, build_s, engine_mib, onnx_mib}), or no rows and
    the Skip saying why engines cannot be built here.
    """
    from ccld_trt.engines.build import BuildOptions, build_engines
    from ccld_trt.engines.flavor import require_flavor, resolve_flavor
    from ccld_trt.engines.profiles import ProfileParams
    from ccld_trt.engines.sidecar import local_capability
    from ccld_trt.export.cloob_config import cloob_image_size, load_cloob_config
    from ccld_trt.export.graph_specs import BACKEND_GRAPHS
    from ccld_trt.export.onnx_export import default_onnx_dir, export_all, onnx_path

    try:
        flavor = resolve_flavor("auto", local_capability())
        version = require_flavor(flavor)
    except UserError as e:
        return [], Skip("tensorrt", "fp16", f"engine builds: {e}")
    options = BuildOptions(flavor).validate()
    params = ProfileParams(image_size=cloob_image_size(load_cloob_config(files.cloob_config)))
    onnx_dir = default_onnx_dir(files)
    export_all(files, onnx_dir, BACKEND_GRAPHS, fp16=True)
    rows = []
    with tempfile.TemporaryDirectory(dir=build_dir) as engine_dir:
        for graph in BACKEND_GRAPHS:
            source = onnx_path(onnx_dir, graph, "fp16")
            start = time.perf_counter()
            [engine] = build_engines({graph: source}, Path(engine_dir), params, options, rebuild=True)
            seconds = time.perf_counter() - start
            log(f"engine build: {graph} in {seconds:.1f} s, {engine.stat().st_size / MIB:.0f} MiB")
            rows.append({"graph": graph, "flavor": flavor, "version": version,
                         "targets": list(options.compute_capabilities), "build_s": seconds,
                         "engine_mib": engine.stat().st_size / MIB, "onnx_mib": onnx_mib(source)})
    return rows, None


def onnx_mib(path: Path) -> float:
    """Size of an ONNX graph with its external data files (``<name>.data``), in MiB."""
    data = external_data(path)
    return (path.stat().st_size + (data.stat().st_size if data.exists() else 0)) / MIB


def markdown(rows: list[dict[str, Any]]) -> list[str]:
    """The report's "Engine builds" section (no lines without rows)."""
    if not rows:
        return []
    first = rows[0]
    lines = ["## Engine builds", "",
             f"fp16 engines of the bench weights, built with {first['flavor']} {first['version']} for "
             f"{', '.join(first['targets']) or 'this GPU'}, one at a time from a cold start (no timing cache).", "",
             "| graph | build s | engine MiB | ONNX MiB |", "|---|---|---|---|"]
    lines += [f"| {r['graph']} | {r['build_s']:.1f} | {r['engine_mib']:.0f} | {r['onnx_mib']:.0f} |" for r in rows]
    return [*lines, ""]

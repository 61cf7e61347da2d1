"""Numerical validation of an exported graph in ONNX Runtime on the CPU: an fp32 graph against its torch module,
an fp16 graph against its fp32 source (through fp16.emulate_fp16), on the check feeds of onnx_inputs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ccld_trt.export.fp16 import fp16_problems, relative_error
from ccld_trt.export.onnx_checks import raise_problems
from ccld_trt.export.onnx_inputs import check_feeds
from ccld_trt.export.quiet_imports import import_onnxruntime

FP32_TOLERANCE = 1e-4  # ||onnx - torch|| / ||torch|| per graph


def cpu_session(path: Path, optimize: bool = False) -> Any:
    """An ONNX Runtime CPU session; unoptimised by default, to run the graph as written."""
    ort = import_onnxruntime()

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _run_all(path: Path, feeds: Sequence[Mapping[str, torch.Tensor]]) -> list[np.ndarray]:
    """The (single) output of the graph at ``path`` for each feed; one session at a time keeps memory low."""
    session = cpu_session(path)
    return [session.run(None, {k: v.numpy() for k, v in feed.items()})[0] for feed in feeds]


def compare_with_torch(path: Path, module: nn.Module, graph: str, image_size: int) -> float:
    """Largest relative error of the graph file against ``module`` over the two check shapes (float32)."""
    feeds = check_feeds(graph, image_size)
    with torch.inference_mode():
        expected = [module(*feed.values()).numpy() for feed in feeds]
    return max(relative_error(got, want) for got, want in zip(_run_all(path, feeds), expected, strict=True))


def validate_fp16(fp32: Path, fp16: Path, emulated: Path, graph: str, image_size: int) -> float:
    """Check an fp16 graph against its fp32 source over the two check shapes: the fp16 file must run in ONNX
    Runtime with finite outputs, and its emulation (fp16.emulate_fp16) must stay finite and within
    FP16_TOLERANCE. Returns the emulation's largest relative error; raises ExportError otherwise."""
    feeds = check_feeds(graph, image_size)
    reference = _run_all(fp32, feeds)
    problems = [f"as fp16 in ONNX Runtime: {int((~np.isfinite(out)).sum())} non-finite value(s)"
                for out in _run_all(fp16, feeds) if not np.isfinite(out).all()]
    outputs = _run_all(emulated, feeds)
    problems += [f"emulated: {p}" for out, ref in zip(outputs, reference, strict=True) for p in fp16_problems(ref, out)]
    raise_problems(fp16, problems)
    return max(relative_error(out, ref) for out, ref in zip(outputs, reference, strict=True))

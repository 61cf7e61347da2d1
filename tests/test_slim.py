"""The exporter's onnxslim simplification with shape inference run on the graph alone (export/slim.py) makes the
same graph as onnxslim's own, for every graph the project exports: the same nodes, initializers, inputs and
outputs. (onnxslim's value_info may differ; the exporter infers it afresh after simplifying, as here.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx
import onnxslim
import pytest

from ccld_trt.export.fp16 import infer_shapes
from ccld_trt.export.graph_specs import GRAPHS
from ccld_trt.export.models import ModelFiles, Networks, load_networks
from ccld_trt.export.onnx_inputs import TRACE_DIMS, random_inputs
from ccld_trt.export.onnx_trace import graph_modules, trace, traced_module
from ccld_trt.export.slim import slim


@pytest.fixture(scope="module")
def networks(seed3_dir: Path) -> Networks:
    return load_networks(ModelFiles.resolve(seed3_dir))


def _contents(model: onnx.ModelProto) -> dict[str, Any]:
    """What the graph is, field by field (an initializer by its name, dims, type and bytes)."""
    graph = model.graph
    return {"nodes": [n.SerializeToString() for n in graph.node],
            "initializers": sorted((t.name, list(t.dims), t.data_type, t.raw_data) for t in graph.initializer),
            "value_info": sorted(v.SerializeToString() for v in graph.value_info),
            "io": [v.SerializeToString() for v in (*graph.input, *graph.output)]}


@pytest.mark.parametrize("graph", list(GRAPHS))
def test_slim_makes_onnxslims_graph(graph: str, networks: Networks, tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    trace(traced_module(graph, graph_modules(networks)[graph]), graph,
          random_inputs(graph, TRACE_DIMS, networks.image_size), path)
    ours = slim(onnx.load(path))
    theirs = onnxslim.slim(onnx.load(path))
    for model in (ours, theirs):
        infer_shapes(model)  # as the exporter does next
    assert any(len(t.raw_data) > 1024 for t in theirs.graph.initializer)  # there were contents to set aside
    assert _contents(ours) == _contents(theirs)

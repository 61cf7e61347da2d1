"""Static checks of an exported graph file: the ONNX checker with strict shape inference, the graph_specs I/O
contract, and what TensorRT's ONNX parser accepts (an op allow-list, opsets, build-time constant inputs).
Nothing here runs the graph; onnx_validate compares its outputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from ccld_trt.export.graph_specs import GRAPHS, GraphSpec
from ccld_trt.export.onnx_trace import is_dynamic

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
            wanted = [d if is_dynamic(d) or isinstance(d, int) else None for d in tensor.shape]
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


def raise_problems(path: Path, problems: list[str]) -> None:
    """ExportError listing the first few ``problems`` of the file at ``path``, if there are any."""
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise ExportError(f"{path.name} fails its checks: {shown}")

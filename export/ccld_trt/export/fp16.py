"""Mixed-precision fp16 ONNX graphs for TensorRT's strongly typed mode, and a faithful fp16 emulation to validate
them on the CPU.

TensorRT >= 11 takes every tensor's precision from the graph, so the fp16 graph states it: fp32 inputs and
outputs, fp16 weights and activations, and fp32 wherever fp16 is unsafe:

* normalisation statistics (``InstanceNormalization``, which is how GroupNorm exports, ``LayerNormalization``)
  and ``Softmax``: long sums and exponentials;
* reductions (the L2 norm of ``F.normalize``, the CFG sum over conditions);
* the rest of ``F.normalize`` after its norm: its eps 1e-12 is 0 in fp16, which makes the U-Net's all-zero
  unconditional embedding 0/0 = NaN;
* the Fourier features of ``t`` and everything computing their arguments: cos/sin of arguments up to ~2π·|w|,
  where fp16's spacing (0.016 at 20) is a large phase error;
* any node that reads a constant fp16 cannot hold (such as a -1e30 mask fill, which would become -inf);
* ``Resize`` and ``Range``: their float parameter inputs (scales) must stay fp32, and the converter can only
  keep a node fp32 as a whole.

The conversion is onnxconverter-common's float16 converter with these ops and nodes on its block list. (NVIDIA
ModelOpt's AutoCast would pull onnxruntime-gpu, which replaces the CPU onnxruntime, and CuPy.)

ONNX Runtime's CPU provider runs an fp16 graph by computing each op without an fp16 kernel in fp32 and removing
the casts between consecutive such ops, so it hides fp16 rounding and overflow. ``emulate_fp16`` therefore
rewrites an fp16 graph into an fp32 one that rounds every tensor the fp16 graph holds in fp16 (a Cast pair,
which ONNX Runtime keeps): that is what the validation runs.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ccld_trt.export.export_versions import FP16_VERSION as FP16_VERSION  # bump it when the rules below change

# Per-graph bound on ||fp16 - fp32|| / ||fp32||, checked on the emulated graph.
FP16_TOLERANCE = 1e-2
FP16_MAX = float(np.finfo(np.float16).max)
FP16_TINY = float(np.finfo(np.float16).smallest_subnormal)

KEEP_FP32_OPS = frozenset({
    "InstanceNormalization", "LayerNormalization", "GroupNormalization", "Softmax",
    "ReduceL2", "ReduceSum", "ReduceMean", "ReduceSumSquare", "Pow", "Sqrt",
    "Resize", "Range",
})
# Ops between F.normalize's ReduceL2 and its Div (clamp to eps, broadcast back).
_NORMALIZE_CHAIN = frozenset({"Clip", "Max", "Expand", "Div"})
_FOURIER = frozenset({"Cos", "Sin"})
_FLOATS = frozenset({TensorProto.FLOAT, TensorProto.FLOAT16})


def convert_to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """The mixed-precision fp16 version of an fp32 graph: same inputs and outputs (fp32), fp16 inside except the
    nodes ``fp32_nodes`` picks. ``model`` is not modified."""
    from onnxconverter_common.float16 import convert_float_to_float16

    model = _named_nodes(model)
    infer_shapes(model)
    output_types = [o.type.tensor_type.elem_type for o in model.graph.output]
    with warnings.catch_warnings():
        # it warns for every weight below fp16's subnormal range, which many layers hold by the hundred
        warnings.filterwarnings("ignore", message="the float32 number .* will be truncated", category=UserWarning)
        model = convert_float_to_float16(
            model, keep_io_types=True, op_block_list=sorted(KEEP_FP32_OPS),
            node_block_list=sorted(fp32_nodes(model)),
            # Nothing is clamped: a constant beyond fp16's range keeps its node fp32 instead (fp32_nodes), and
            # magnitudes below fp16's smallest subnormal keep their sign rather than becoming 0.
            min_positive_val=FP16_TINY, max_finite_val=FP16_MAX, disable_shape_infer=True,
        )
    # When a kept-fp32 node produces a graph output, the converter relabels the output fp16 and casts it to fp16.
    producer = {out: node for node in model.graph.node for out in node.output}
    for output, elem_type in zip(model.graph.output, output_types, strict=True):
        output.type.tensor_type.elem_type = elem_type
        cast = producer.get(output.name)
        if cast is not None and cast.op_type == "Cast":
            next(a for a in cast.attribute if a.name == "to").i = elem_type
    _drop_round_trips(model)
    return model


def _drop_round_trips(model: onnx.ModelProto) -> None:
    """Remove the Cast pairs the converter leaves between kept-fp32 nodes (fp32 -> fp16 -> fp32, which only loses
    precision) and the lossless fp16 -> fp32 -> fp16 ones, then the casts nobody reads. In place."""
    infer_shapes(model)
    graph = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*graph.input, *graph.output, *graph.value_info)}
    types.update({t.name: t.data_type for t in graph.initializer})
    producer = {out: node for node in graph.node for out in node.output}

    for node in graph.node:
        first = producer.get(node.input[0]) if node.op_type == "Cast" else None
        # Between float types only: a float -> int -> float pair truncates, which must stay.
        if (first is not None and first.op_type == "Cast" and types.get(first.input[0]) == _cast_to(node)
                and {_cast_to(first), _cast_to(node)} <= _FLOATS):
            node.input[0] = first.input[0]
    # A cast to its input's own type is a no-op: its readers read the input instead (unless it is an output).
    outputs = {o.name for o in graph.output}
    rename: dict[str, str] = {}
    kept = []
    for node in graph.node:  # topologically sorted, so a rename is known before its readers
        for i, name in enumerate(node.input):
            node.input[i] = rename.get(name, name)
        if node.op_type == "Cast" and types.get(node.input[0]) == _cast_to(node) and node.output[0] not in outputs:
            rename[node.output[0]] = node.input[0]
        else:
            kept.append(node)
    live = set(outputs)
    needed = []
    for node in reversed(kept):
        if any(out in live for out in node.output):
            needed.append(node)
            live.update(node.input)
    graph.ClearField("node")
    graph.node.extend(reversed(needed))
    infer_shapes(model)


def _cast_to(node: onnx.NodeProto) -> int:
    return next(a.i for a in node.attribute if a.name == "to")


def fp32_nodes(model: onnx.ModelProto) -> set[str]:
    """Names of the nodes to keep in fp32 beyond ``KEEP_FP32_OPS`` (see the module docstring). ``model`` needs
    unique node names and inferred shapes."""
    graph = model.graph
    floats = _float_tensors(graph)
    producer = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)

    keep: set[str] = set()
    for node in graph.node:
        if node.op_type == "ReduceL2":
            keep |= _normalize_chain(node, consumers)
        elif node.op_type in _FOURIER:
            keep |= _float_ancestors(node, producer, floats)
    initializers = {t.name: t for t in graph.initializer}
    keep |= {node.name for node in graph.node if _reads_out_of_range_constant(node, initializers)}
    return keep


def _normalize_chain(norm: onnx.NodeProto, consumers: dict[str, list[onnx.NodeProto]]) -> set[str]:
    """The nodes after an L2 norm up to the Div by it."""
    chain: set[str] = set()
    stack = [norm]
    while stack:
        node = stack.pop()
        for out in node.output:
            for nxt in consumers[out]:
                if nxt.op_type in _NORMALIZE_CHAIN and nxt.name not in chain:
                    chain.add(nxt.name)
                    if nxt.op_type != "Div":
                        stack.append(nxt)
    return chain


def _float_ancestors(node: onnx.NodeProto, producer: dict[str, onnx.NodeProto], floats: set[str]) -> set[str]:
    """``node`` and every node it depends on through float tensors."""
    seen = {node.name}
    stack = [node]
    while stack:
        for name in stack.pop().input:
            parent = producer.get(name)
            if parent is not None and name in floats and parent.name not in seen:
                seen.add(parent.name)
                stack.append(parent)
    return seen


def _reads_out_of_range_constant(node: onnx.NodeProto, initializers: dict[str, onnx.TensorProto]) -> bool:
    """Whether ``node`` reads (or is) a float constant with a value fp16 cannot represent (|v| > 65504)."""
    tensors = [initializers[name] for name in node.input if name in initializers]
    tensors += [a.t for a in node.attribute if a.type == onnx.AttributeProto.TENSOR]
    return any(t.data_type == TensorProto.FLOAT and np.abs(numpy_helper.to_array(t)).max(initial=0) > FP16_MAX
               for t in tensors)


def _float_tensors(graph: onnx.GraphProto) -> set[str]:
    infos = (*graph.input, *graph.output, *graph.value_info)
    names = {v.name for v in infos if v.type.tensor_type.elem_type == TensorProto.FLOAT}
    return names | {t.name for t in graph.initializer if t.data_type == TensorProto.FLOAT}


def _named_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose nodes all have unique names (the converter's node block list goes by name)."""
    model = copy.deepcopy(model)
    seen: set[str] = set()
    for i, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{i}"
        seen.add(node.name)
    return model


def emulate_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """An fp32 graph computing what the fp16 graph ``model`` computes when every op works in fp32 internally and
    rounds its fp16 outputs to fp16 (as TensorRT does, accumulating convolutions and matmuls in fp32): fp16
    weights become the same values in fp32, and each fp16 tensor is rounded through Cast(fp16)->Cast(fp32), so
    overflow gives inf as it would on the GPU. Run it with ONNX Runtime on the CPU."""
    model = copy.deepcopy(model)
    infer_shapes(model)
    graph = model.graph
    half = {v.name for v in graph.value_info if v.type.tensor_type.elem_type == TensorProto.FLOAT16}
    for tensor in _fp16_constants(graph):
        tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float32), tensor.name))

    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        nodes.append(node)
        for i, out in enumerate(node.output):
            if out not in half:
                continue
            rounded = f"{out}__fp16"
            if node.op_type == "Cast":  # already the rounding step: only widen its result
                node.output[i] = rounded
            else:
                node.output[i] = f"{out}__fp32"
                nodes.append(helper.make_node("Cast", [node.output[i]], [rounded], to=TensorProto.FLOAT16,
                                              name=f"{out}__round"))
            nodes.append(helper.make_node("Cast", [rounded], [out], to=TensorProto.FLOAT, name=f"{out}__widen"))
    graph.ClearField("node")
    graph.node.extend(nodes)
    infer_shapes(model, strict=True)
    return model


@contextlib.contextmanager
def large_contents_aside(model: onnx.ModelProto) -> Iterator[dict[str, bytes]]:
    """The contents of ``model``'s initializers over 1 KB, taken out of it while the block runs and put back after
    ({name: raw bytes}): for work that reads only their dims (shape inference). Small ones stay: they may hold
    shapes."""
    contents = {}
    for tensor in model.graph.initializer:
        if len(tensor.raw_data) > 1024:
            contents[tensor.name] = tensor.raw_data
            tensor.ClearField("raw_data")
    try:
        yield contents
    finally:
        put_contents_back(model, contents)


def put_contents_back(model: onnx.ModelProto, contents: Mapping[str, bytes]) -> None:
    """Give ``model``'s initializers named in ``contents`` (``large_contents_aside``'s) their raw bytes again."""
    for tensor in model.graph.initializer:
        if tensor.name in contents:
            tensor.raw_data = contents[tensor.name]


def infer_shapes(model: onnx.ModelProto, strict: bool = False) -> None:
    """Replace ``model``'s value_info by freshly inferred types and shapes, in place, at any model size.

    ONNX shape inference serialises the model, which protobuf cannot do past 2 GB, and reads only the dims of
    large tensors, so their contents are set aside meanwhile; small ones stay, as they may hold shapes.
    """
    model.graph.ClearField("value_info")  # stale or duplicate entries would be kept as they are
    with large_contents_aside(model):
        inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=strict, data_prop=True)
    model.graph.value_info.extend(inferred.graph.value_info)
    model.graph.ClearField("output")
    model.graph.output.extend(inferred.graph.output)


def _fp16_constants(graph: onnx.GraphProto) -> Iterable[onnx.TensorProto]:
    """The fp16 initializers and the fp16 tensors in node attributes (Constant, ConstantOfShape)."""
    yield from (t for t in graph.initializer if t.data_type == TensorProto.FLOAT16)
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == TensorProto.FLOAT16:
                yield attr.t


def fp16_problems(reference: np.ndarray, fp16: np.ndarray, tolerance: float = FP16_TOLERANCE) -> list[str]:
    """Why an fp16 graph's output fails against the fp32 one's: non-finite values, or a relative error
    ||fp16 - ref|| / ||ref|| above ``tolerance``. Empty when it passes."""
    if not np.isfinite(fp16).all():
        return [f"{int((~np.isfinite(fp16)).sum())} non-finite value(s)"]
    error = relative_error(fp16, reference)
    return [] if error <= tolerance else [f"relative error {error:.2e} > {tolerance:.0e}"]


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    """||a - b|| / ||b|| in float64 (0 when both are 0)."""
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    norm = np.linalg.norm(b64)
    return float(np.linalg.norm(a64 - b64) / norm) if norm else float(np.linalg.norm(a64))

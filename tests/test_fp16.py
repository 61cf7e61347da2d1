"""Mixed-precision fp16 graphs (export/fp16.py): fp32 I/O, fp16 inside, fp32 where fp16 is unsafe; validated on
the CPU through the fp16 emulation against the fp32 graphs, per graph and end to end on the golden cases."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from ccld_trt.backends.onnxruntime_backend import OnnxRuntimeBackend
from ccld_trt.export.cloob_config import load_cloob_config
from ccld_trt.export.fp16 import FP16_TOLERANCE, convert_to_fp16, emulate_fp16, relative_error
from ccld_trt.export.onnx_checks import check_graph
from ccld_trt.export.onnx_export import GRAPH_NAMES, onnx_path
from ccld_trt.export.onnx_inputs import random_inputs
from ccld_trt.export.onnx_trace import save_onnx
from ccld_trt.export.onnx_validate import cpu_session
from ccld_trt.image_prompt import parse_prompt
from ccld_trt.pipeline import DEFAULT_AUTOENCODER_SCALE, Request, generate, load_image_prompts
from test_e2e import CASES
from test_onnx import TEST_DIMS, export_seed3

FIXTURES = Path(__file__).resolve().parent / "fixtures"
UNSAFE_IN_FP16 = {"InstanceNormalization", "LayerNormalization", "Softmax", "ReduceL2", "ReduceSum", "Cos", "Sin"}


@pytest.fixture(scope="module")
def onnx_dir(seed3_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_seed3(seed3_dir, tmp_path_factory)[1]


@pytest.fixture(scope="module")
def image_size(seed3_dir: Path) -> int:
    return int(load_cloob_config(seed3_dir / "cloob_config.json")["image_encoder"]["image_size"])


@pytest.fixture(scope="module")
def emulated_dir(onnx_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The emulations of the fp16 graphs, under the fp16 graphs' names (so a backend can run them)."""
    out = tmp_path_factory.mktemp("emulated")
    for graph in GRAPH_NAMES:
        save_onnx(emulate_fp16(onnx.load(onnx_path(onnx_dir, graph, "fp16"))), onnx_path(out, graph, "fp16"))
    return out


def _types(model: onnx.ModelProto) -> dict[str, int]:
    graph = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*graph.input, *graph.output, *graph.value_info)}
    return types | {t.name: t.data_type for t in graph.initializer}


@pytest.mark.parametrize("graph", GRAPH_NAMES)
def test_fp16_graph_is_mixed_precision_with_fp32_io(graph: str, onnx_dir: Path) -> None:
    path = onnx_path(onnx_dir, graph, "fp16")
    assert check_graph(path, graph) == []  # includes fp32 inputs and outputs, as graph_specs says
    model = onnx.load(path)
    types = _types(model)
    sizes = {t.name: t.ByteSize() for t in model.graph.initializer}
    fp16_bytes = sum(size for name, size in sizes.items() if types[name] == TensorProto.FLOAT16)
    assert fp16_bytes > 0.95 * sum(sizes.values())  # the weights are fp16
    for node in model.graph.node:
        if node.op_type in UNSAFE_IN_FP16:
            floats = [types[n] for n in (*node.input, *node.output) if n and types.get(n) in (1, 10)]
            assert set(floats) == {TensorProto.FLOAT}, (node.name, node.op_type)


@pytest.mark.parametrize("graph", GRAPH_NAMES)
def test_fp16_graph_matches_fp32(graph: str, onnx_dir: Path, emulated_dir: Path, image_size: int) -> None:
    reference = cpu_session(onnx_path(onnx_dir, graph))
    emulated = cpu_session(onnx_path(emulated_dir, graph, "fp16"))
    real = cpu_session(onnx_path(onnx_dir, graph, "fp16"), optimize=True)
    for seed, dims in enumerate(TEST_DIMS):
        inputs = random_inputs(graph, dims, image_size, seed=20 + seed)
        feed = {k: v.numpy() for k, v in inputs.items()}
        want = reference.run(None, feed)[0]
        got = emulated.run(None, feed)[0]
        assert np.isfinite(got).all()
        assert relative_error(got, want) <= FP16_TOLERANCE, (graph, dims, relative_error(got, want))
        assert np.isfinite(real.run(None, feed)[0]).all()  # ONNX Runtime runs the fp16 file itself


def _model(nodes: list[onnx.NodeProto], initializers: list[onnx.TensorProto]) -> onnx.ModelProto:
    """A graph of ``nodes`` from float32 x [4] to float32 y [4]."""
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])], initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(model: onnx.ModelProto, **feed: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)[0]


def test_emulation_rounds_and_overflows_like_fp16() -> None:
    # (x * 300) * 300 / 1000 in fp16 overflows at |x| = 1 (90000 > 65504); ONNX Runtime's CPU provider computes
    # such a chain in fp32 and would give 90, which is why validation runs the emulation.
    scalar = lambda name, v: helper.make_tensor(name, TensorProto.FLOAT16, [], [v])  # noqa: E731
    nodes = [helper.make_node("Cast", ["x"], ["h"], to=TensorProto.FLOAT16),
             helper.make_node("Mul", ["h", "a"], ["m1"]), helper.make_node("Mul", ["m1", "a"], ["m2"]),
             helper.make_node("Div", ["m2", "b"], ["d"]), helper.make_node("Cast", ["d"], ["y"], to=TensorProto.FLOAT)]
    fp16_model = _model(nodes, [scalar("a", 300.0), scalar("b", 1000.0)])
    x = np.array([1.0, 0.5, 0.001, -1.0], np.float32)
    h = x.astype(np.float16)
    with np.errstate(over="ignore"):
        expected = ((h * np.float16(300)) * np.float16(300) / np.float16(1000)).astype(np.float32)  # numpy's fp16
    np.testing.assert_array_equal(_run(emulate_fp16(fp16_model), x=x), expected)
    assert np.isinf(expected[[0, 3]]).all()


def test_constants_beyond_fp16_keep_their_nodes_fp32() -> None:
    # A -1e30 mask fill before a softmax, as the original CLOOB text encoder has: in fp16 it would be -inf.
    nodes = [helper.make_node("Greater", ["x", "zero"], ["keep"]),
             helper.make_node("Where", ["keep", "x", "fill"], ["masked"]),
             helper.make_node("Softmax", ["masked"], ["p"]),
             helper.make_node("Mul", ["p", "x"], ["y"])]
    fp32_model = _model(nodes, [helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]),
                                helper.make_tensor("fill", TensorProto.FLOAT, [], [-1e30])])
    fp16_model = convert_to_fp16(fp32_model)
    where = next(n for n in fp16_model.graph.node if n.op_type == "Where")
    assert _types(fp16_model)[where.output[0]] == TensorProto.FLOAT
    x = np.array([-1.0, -2.0, -3.0, -4.0], np.float32)  # everything masked: a uniform softmax
    got = _run(emulate_fp16(fp16_model), x=x)
    np.testing.assert_allclose(got, _run(fp32_model, x=x), rtol=1e-3)


def test_zero_embedding_stays_finite_in_fp16(onnx_dir: Path, emulated_dir: Path) -> None:
    # F.normalize(0) = 0 / max(0, 1e-12): with the eps in fp16 (0) it would be 0/0.
    inputs = random_inputs("unet", {"batch": 2, "height": 8, "width": 8}, 64)
    inputs["embed"][:] = 0
    feed = {k: v.numpy() for k, v in inputs.items()}
    got = cpu_session(onnx_path(emulated_dir, "unet", "fp16")).run(None, feed)[0]
    want = cpu_session(onnx_path(onnx_dir, "unet")).run(None, feed)[0]
    assert np.isfinite(got).all() and relative_error(got, want) <= FP16_TOLERANCE


def _sample(backend: OnnxRuntimeBackend, case: dict, image_size: int) -> np.ndarray:
    """``ccld-trt sample``'s pipeline for one golden case on ``backend`` -> pixels uint8 [n, H, W, 3]."""
    request = Request(prompts=[parse_prompt(p) for p in case["prompt_list"]],
                      image_prompts=[(FIXTURES / name, w) for name, w in case["image_prompts"]],
                      n=case["n"], seed=case["seed"], steps=case["steps_n"], method=case["method"])
    return generate(backend, request, load_image_prompts(request, image_size), DEFAULT_AUTOENCODER_SCALE).pixels


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255**2 / mse))


@pytest.fixture(scope="module")
def emulated_backend(emulated_dir: Path) -> OnnxRuntimeBackend:
    """A backend that runs the emulated fp16 graphs: end-to-end results as fp16 arithmetic gives them."""
    return OnnxRuntimeBackend(emulated_dir, precision="fp16")


@pytest.mark.parametrize("name", CASES)
def test_fp16_end_to_end_psnr(name: str, emulated_backend: OnnxRuntimeBackend, e2e_cases: dict, golden: dict,
                              image_size: int) -> None:
    pixels = _sample(emulated_backend, e2e_cases[name], image_size)
    assert psnr(pixels, golden[f"{name}_pixels"]) >= 35


def test_fp16_files_run_end_to_end_in_onnxruntime(onnx_dir: Path, e2e_cases: dict, golden: dict,
                                                   image_size: int) -> None:
    backend = OnnxRuntimeBackend(onnx_dir, precision="fp16")
    pixels = _sample(backend, e2e_cases["e2e_multi"], image_size)
    assert psnr(pixels, golden["e2e_multi_pixels"]) >= 35

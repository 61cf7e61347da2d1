"""ONNX export (export/onnx_*.py) and the ONNX Runtime backend, on the small seed-3 models: every graph
matches its torch module, carries its metadata, passes the checker and TensorRT's op list, is exported again
only when an input changed; the golden end-to-end cases through ``--backend onnxruntime``; and the full-size
student U-Net exports and runs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from ccld_trt.backends.onnxruntime_backend import OnnxRuntimeBackend, check_precision
from ccld_trt.backends.onnxruntime_sessions import session_options
from ccld_trt.export.errors import UserError
from ccld_trt.export.file_digests import sha256_file
from ccld_trt.export.graph_specs import BACKEND_GRAPHS, GRAPHS, ON_DEMAND_GRAPHS
from ccld_trt.export.models import ModelFiles, Networks, load_networks
from ccld_trt.export.onnx_checks import TENSORRT_OPS, check_graph, tensorrt_problems
from ccld_trt.export.onnx_export import GRAPH_NAMES, default_onnx_dir, export_all, onnx_path
from ccld_trt.export.onnx_inputs import random_inputs
from ccld_trt.export.onnx_manifest import MANIFEST
from ccld_trt.export.onnx_trace import EXTERNAL_DATA_THRESHOLD, OPSET, graph_modules, needs_external_data, save_onnx
from ccld_trt.export.onnx_validate import cpu_session
from test_e2e import CASES, rel_error, sample_case  # tests/ is on sys.path under pytest's default import mode

# Batch sizes 1 and 3 and non-square latents, none of them the exporter's own trace or check shapes.
TEST_DIMS = ({"batch": 1, "conds": 2, "height": 16, "width": 24}, {"batch": 3, "conds": 3, "height": 24, "width": 8})


def export_seed3(seed3_dir: Path, tmp_path_factory: pytest.TempPathFactory,
                 networks: Networks | None = None) -> tuple[Path, Path]:
    """All six seed-3 graphs, fp32 and fp16, exported where ``--backend onnxruntime`` looks for them under one
    build directory per session -> (build directory, ONNX directory). test_fp16 calls it too: whichever module
    comes second finds the export up to date."""
    build = tmp_path_factory.getbasetemp() / "build"
    files = ModelFiles.resolve(seed3_dir)
    out = default_onnx_dir(files, build)
    export_all(files, out, progress=False, networks=networks)
    return build, out


@pytest.fixture(scope="session")
def seed3_files(seed3_dir: Path) -> ModelFiles:
    return ModelFiles.resolve(seed3_dir)


@pytest.fixture(scope="session")
def seed3_networks(seed3_files: ModelFiles) -> Networks:
    return load_networks(seed3_files)


@pytest.fixture(scope="session")
def exported(seed3_dir: Path, seed3_networks: Networks,
             tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return export_seed3(seed3_dir, tmp_path_factory, seed3_networks)


@pytest.fixture(scope="session")
def onnx_dir(exported: tuple[Path, Path]) -> Path:
    return exported[1]


@pytest.mark.parametrize("graph", GRAPH_NAMES)
def test_graph_matches_torch(graph: str, onnx_dir: Path, seed3_networks: Networks) -> None:
    session = cpu_session(onnx_path(onnx_dir, graph))
    optimised = cpu_session(onnx_path(onnx_dir, graph), optimize=True)
    module = graph_modules(seed3_networks)[graph]
    for seed, dims in enumerate(TEST_DIMS):
        inputs = random_inputs(graph, dims, seed3_networks.image_size, seed=10 + seed)
        with torch.inference_mode():
            expected = module(*inputs.values()).numpy()
        feed = {k: v.numpy() for k, v in inputs.items()}
        for s in (session, optimised):
            got = s.run(None, feed)[0]
            assert got.shape == expected.shape
            assert rel_error(got, expected) <= 1e-4, (graph, dims)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("graph", GRAPH_NAMES)
def test_graph_metadata(graph: str, precision: str, onnx_dir: Path, seed3_files: ModelFiles) -> None:
    model = onnx.load(onnx_path(onnx_dir, graph, precision), load_external_data=False)
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["ccld_trt.graph"] == graph and meta["ccld_trt.precision"] == precision
    checkpoint = {"unet": seed3_files.unet, "unet_cfg": seed3_files.unet, "decoder": seed3_files.autoencoder,
                  "text_encoder": seed3_files.cloob, "image_encoder": seed3_files.cloob,
                  "encoder": seed3_files.autoencoder}[graph]
    assert list(json.loads(meta["ccld_trt.source_sha256"]).values()) == [sha256_file(checkpoint)]
    config = json.loads(meta["ccld_trt.model_config"])
    expected_key = {"unet": "channel_multipliers", "unet_cfg": "channel_multipliers", "decoder": "ddconfig",
                    "text_encoder": "text_encoder", "image_encoder": "image_encoder", "encoder": "ddconfig"}[graph]
    assert expected_key in config
    assert {"exporter", "ccld_trt", "torch", "onnx", "onnxslim", "opset"} <= set(json.loads(meta["ccld_trt.versions"]))


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("graph", GRAPH_NAMES)
def test_graph_checks_clean(graph: str, precision: str, onnx_dir: Path) -> None:
    path = onnx_path(onnx_dir, graph, precision)
    assert check_graph(path, graph) == []  # checker + strict shape inference, I/O contract, TensorRT's parser
    model = onnx.load(path, load_external_data=False)
    assert {n.op_type for n in model.graph.node} <= TENSORRT_OPS
    assert all(n.domain in ("", "ai.onnx") for n in model.graph.node)
    assert next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) == OPSET >= 17
    spec = GRAPHS[graph]
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in model.graph.input}
    assert dims[spec.inputs[0].name][0] == "batch"
    if graph in ("unet", "unet_cfg", "decoder"):
        assert dims[spec.inputs[0].name][2:] == ["height", "width"]
    if graph == "unet_cfg":
        assert dims["conds"][0] == "conds"
    if graph == "encoder":  # images in, at 8x the latent size
        assert dims["images"] == ["batch", 3, "8*height", "8*width"]


def test_tensorrt_problems_name_what_the_parser_refuses() -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    axes = helper.make_tensor_value_info("axes", TensorProto.INT64, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    nodes = [helper.make_node("SequenceConstruct", ["x"], ["s"], name="seq"),
             helper.make_node("SequenceAt", ["s", "zero"], ["a"], name="at"),
             helper.make_node("ReduceSum", ["a", "axes"], ["b"], name="sum"),
             helper.make_node("Gelu", ["b"], ["y"], name="gelu", domain="com.microsoft")]
    graph = helper.make_graph(nodes, "g", [x, axes], [y], [helper.make_tensor("zero", TensorProto.INT64, [], [0])])
    problems = "\n".join(tensorrt_problems(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])))
    assert "SequenceConstruct" in problems and "SequenceAt" in problems
    assert "sum: ReduceSum input 1 must be a build-time constant" in problems
    assert "custom op com.microsoft::Gelu" in problems


def _mtimes(directory: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in directory.glob("*.onnx*")}


def test_unchanged_export_does_nothing(onnx_dir: Path, seed3_files: ModelFiles,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    before = _mtimes(onnx_dir), (onnx_dir / MANIFEST).stat().st_mtime_ns
    assert len(before[0]) == 2 * len(GRAPH_NAMES)
    paths = export_all(seed3_files, onnx_dir)  # networks not given: an up-to-date export loads none
    assert (_mtimes(onnx_dir), (onnx_dir / MANIFEST).stat().st_mtime_ns) == before
    assert "up to date" in capsys.readouterr().err
    assert paths == {**{g: onnx_path(onnx_dir, g) for g in GRAPH_NAMES},
                     **{f"{g}.fp16": onnx_path(onnx_dir, g, "fp16") for g in GRAPH_NAMES}}


def test_changed_checkpoint_reexports_only_its_graphs(onnx_dir: Path, seed3_dir: Path, tmp_path: Path) -> None:
    models, out = tmp_path / "models", tmp_path / "onnx"
    shutil.copytree(seed3_dir, models)
    out.mkdir()
    for name in ("decoder.onnx", "image_encoder.onnx", MANIFEST):
        shutil.copy2(onnx_dir / name, out / name)
    files = ModelFiles.resolve(models)
    graphs = ["decoder", "image_encoder"]
    # Other paths, same bytes: the manifest goes by content.
    before = _mtimes(out)
    export_all(files, out, graphs, fp16=False, progress=False)
    assert _mtimes(out) == before

    from ccld_trt.export.demo_weights import write_demo_weights

    write_demo_weights(tmp_path / "seed4", "small", seed=4)
    shutil.copy(tmp_path / "seed4" / "cloob.pkl", models / "cloob.pkl")
    export_all(files, out, graphs, fp16=False, progress=False)
    after = _mtimes(out)
    assert after["decoder.onnx"] == before["decoder.onnx"]
    assert after["image_encoder.onnx"] != before["image_encoder.onnx"]
    meta = {p.key: p.value for p in onnx.load(out / "image_encoder.onnx").metadata_props}
    assert json.loads(meta["ccld_trt.source_sha256"]) == {"cloob": sha256_file(models / "cloob.pkl")}


def test_external_data_decision_and_files(onnx_dir: Path, tmp_path: Path) -> None:
    assert not needs_external_data(EXTERNAL_DATA_THRESHOLD)
    assert needs_external_data(EXTERNAL_DATA_THRESHOLD + 1)
    assert needs_external_data(1_200_000_000 * 4)  # the teacher's fp32 weights
    assert needs_external_data(1_200_000_000 * 2)  # and its fp16 ones
    assert not needs_external_data(105_000_000 * 4)  # the student's

    model = onnx.load(onnx_path(onnx_dir, "image_encoder"))
    path = tmp_path / "image_encoder.onnx"
    assert save_onnx(model, path, threshold=0) == [path, tmp_path / "image_encoder.onnx.data"]
    assert path.stat().st_size < 100_000 < (tmp_path / "image_encoder.onnx.data").stat().st_size
    assert check_graph(path, "image_encoder") == []
    feed = {k: v.numpy() for k, v in random_inputs("image_encoder", TEST_DIMS[0], 64).items()}
    external = cpu_session(path).run(None, feed)[0]
    np.testing.assert_array_equal(external, cpu_session(onnx_path(onnx_dir, "image_encoder")).run(None, feed)[0])
    # saved again below the threshold: one file, and no stale data file beside it
    assert save_onnx(onnx.load(path), path) == [path]
    assert not (tmp_path / "image_encoder.onnx.data").exists()


def test_backend_outputs_are_not_overwritten_by_later_calls(onnx_dir: Path) -> None:
    backend = OnnxRuntimeBackend(onnx_dir)
    inputs = random_inputs("unet_cfg", {"batch": 2, "conds": 2, "height": 8, "width": 8}, 64)
    first = backend.unet(*inputs.values())
    kept = first.clone()
    second = backend.unet(inputs["x"] * 2, *list(inputs.values())[1:])
    assert torch.equal(first, kept) and not torch.equal(first, second)
    assert first.dtype == torch.float32 and first.device == backend.device and first.shape == (2, 4, 8, 8)
    # a non-contiguous input is bound through a contiguous copy
    x_t = inputs["x"].transpose(2, 3).contiguous().transpose(2, 3)
    assert torch.equal(backend.unet(x_t, *list(inputs.values())[1:]), first)


def test_cpu_sessions_open_two_at_a_time(onnx_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The eager graphs' sessions open on two threads (two cores): each opener here waits for another to start."""
    import threading

    from ccld_trt.backends import onnxruntime_backend

    together = threading.Barrier(2, timeout=30)
    opened: list[str] = []

    def open_cpu_session(path: Path, options: object, root: Path) -> str:
        if not opened:  # the first two meet; on one thread the first would wait alone and break the barrier
            together.wait()
        opened.append(path.name)
        return path.name

    monkeypatch.setattr(onnxruntime_backend, "open_cpu_session", open_cpu_session)
    backend = OnnxRuntimeBackend(onnx_dir)
    assert sorted(backend.sessions) == sorted(set(BACKEND_GRAPHS) - set(ON_DEMAND_GRAPHS))


def test_backend_precision_is_checked() -> None:
    assert check_precision("fp16") == "fp16"
    with pytest.raises(UserError, match="bf16"):
        check_precision("bf16")


def test_session_options_are_tuned_for_the_cpu() -> None:
    import onnxruntime as ort

    options = session_options(2)
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert options.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    assert options.intra_op_num_threads == 2


@pytest.mark.parametrize("name", CASES)
def test_golden_case_onnxruntime(name: str, e2e_cases: dict, golden: dict, seed3_dir: Path,
                                 exported: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CCLD_TRT_BUILD", str(exported[0]))  # where the graphs were exported: nothing is redone
    latents, pixels = sample_case(e2e_cases[name], seed3_dir, tmp_path, backend="onnxruntime")
    assert latents.dtype == np.float32 and latents.shape == golden[f"{name}_latents"].shape
    assert rel_error(latents, golden[f"{name}_latents"]) <= 1e-3
    assert np.abs(pixels.astype(int) - golden[f"{name}_pixels"].astype(int)).max() <= 2


@pytest.mark.slow
def test_full_size_student_unet_exports_checks_and_runs(seed3_dir: Path, tmp_path: Path) -> None:
    """The real student architecture (192, [1, 1, 2, 2], ~105 M parameters) with random weights."""
    from ccld_trt.export.demo_weights import init_tensor
    from ccld_trt.export.unet import unet_state_shapes

    models = tmp_path / "models"
    models.mkdir()
    for name in ("ae_model.ckpt", "ae_model.yaml", "cloob.pkl", "cloob_config.json"):
        (models / name).symlink_to(seed3_dir / name)
    state = {k: torch.from_numpy(init_tensor(k, s, seed=0)) for k, s in unet_state_shapes(192, [1, 1, 2, 2]).items()}
    assert 100e6 < sum(v.numel() for v in state.values()) < 110e6
    torch.save(state, models / "model_student.ckpt")
    del state

    out = tmp_path / "onnx"
    paths = export_all(ModelFiles.resolve(models), out, ["unet"], fp16=False, progress=False)
    record = json.loads((out / MANIFEST).read_text())["graphs"]["unet"]["fp32"]
    assert record["error_vs_torch"] <= 1e-4  # checked against torch at two shapes during the export
    assert check_graph(paths["unet"], "unet") == []
    feed = {k: v.numpy() for k, v in random_inputs("unet", {"batch": 2, "height": 32, "width": 32}, 64).items()}
    v = cpu_session(paths["unet"], optimize=True).run(None, feed)[0]
    assert v.shape == (2, 4, 32, 32) and np.isfinite(v).all()

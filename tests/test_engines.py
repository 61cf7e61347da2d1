"""The TensorRT side without TensorRT: profiles, sidecars, buffer planning, the build's decisions and errors.
The one test that builds and runs a real engine needs a CUDA GPU and TensorRT (marked gpu)."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch

from ccld_trt.engines.build import build_engine, network_typing, onnx_precision, stale_reasons
from ccld_trt.engines.engine import Engine, engine_file, plan_buffers, require_tensorrt
from ccld_trt.engines.profiles import (
    ProfileParams,
    all_profiles,
    as_profile,
    bind_dims,
    format_range,
    graph_profile,
    outside_profile,
)
from ccld_trt.engines.sidecar import (
    REBUILD_HINT,
    Sidecar,
    check_sidecar,
    read_sidecar,
    require_fit,
    sidecar_path,
    write_sidecar,
)
from ccld_trt.export.errors import UserError
from ccld_trt.export.graph_specs import DECODER, GRAPHS, TEXT_ENCODER, UNET_CFG

# --- profiles ---------------------------------------------------------------------------------------------------


def test_unet_cfg_profile_defaults() -> None:
    assert graph_profile("unet_cfg", ProfileParams()) == {
        "x": ((1, 4, 32, 32), (1, 4, 32, 32), (4, 4, 32, 32)),
        "t": ((1,), (1,), (4,)),
        "conds": ((1, 512), (2, 512), (4, 512)),
        "weights": ((1,), (2,), (4,)),
    }


def test_unet_without_cfg_fusion_sees_batch_times_conds_rows() -> None:
    p = graph_profile("unet", ProfileParams(batch=(1, 2, 4), conds_max=3, height=(32, 32, 64), width=(24, 32, 48)))
    assert p == {
        "x": ((1, 4, 32, 24), (4, 4, 32, 32), (12, 4, 64, 48)),
        "t": ((1,), (4,), (12,)),
        "embed": ((1, 512), (4, 512), (12, 512)),
    }


def test_decoder_and_encoder_profiles() -> None:
    params = ProfileParams(batch=(1, 2, 8), conds_max=4, height=(32, 48, 64), image_size=224)
    profiles = all_profiles(params)
    assert set(profiles) == set(GRAPHS)
    assert profiles["decoder"] == {"latents": ((1, 4, 32, 32), (2, 4, 48, 32), (8, 4, 64, 32))}
    # prompts per encoder call: the conditions less the zero embedding
    assert profiles["text_encoder"] == {"tokens": ((1, 77), (1, 77), (3, 77))}
    assert profiles["image_encoder"] == {"pixels": ((1, 3, 224, 224), (1, 3, 224, 224), (3, 3, 224, 224))}


def test_single_condition_profile() -> None:
    p = graph_profile("unet_cfg", ProfileParams(conds_max=1))
    assert p["conds"] == ((1, 512), (1, 512), (1, 512))
    assert graph_profile("text_encoder", ProfileParams(conds_max=1))["tokens"][2] == (1, 77)


@pytest.mark.parametrize(("params", "message"), [
    (ProfileParams(batch=(2, 1, 4)), "batch range"),
    (ProfileParams(batch=(0, 1, 1)), "batch range"),
    (ProfileParams(batch=(1, 2)), "batch range"),  # type: ignore[arg-type]
    (ProfileParams(batch=(True, 1, 1)), "batch range"),
    (ProfileParams(height=(32, 16, 64)), "latent height range"),
    (ProfileParams(width=(30, 32, 32)), "latent width 30 is not a multiple of 8"),
    (ProfileParams(conds_max=0), "number of CFG conditions"),
    (ProfileParams(image_size=0), "CLOOB image size"),
])
def test_bad_profile_params(params: ProfileParams, message: str) -> None:
    with pytest.raises(UserError, match=message):
        graph_profile("decoder", params)


def test_as_profile_checks_ranges() -> None:
    assert as_profile({"t": [[1], [2], [4]]}) == {"t": ((1,), (2,), (4,))}
    with pytest.raises(UserError, match="one rank"):
        as_profile({"x": [[1, 4], [1], [1, 4]]})
    with pytest.raises(UserError, match="min <= opt <= max"):
        as_profile({"t": [[4], [2], [1]]})


def test_outside_profile_names_the_input_and_range() -> None:
    profile = graph_profile("decoder", ProfileParams())
    assert outside_profile("decoder", {"latents": (4, 4, 32, 32)}, profile) == []
    (problem,) = outside_profile("decoder", {"latents": (8, 4, 32, 32)}, profile)
    assert problem == "decoder input latents shape [8, 4, 32, 32] is outside the built range [1..4, 4, 32, 32]"
    assert outside_profile("decoder", {"latents": (1, 4, 32)}, profile)
    assert outside_profile("decoder", {"z": (1,)}, profile) == ["decoder input z is not in the built profile"]
    assert format_range(((1, 77), (2, 77), (3, 77))) == "[1..3, 77]"


# --- buffer planning --------------------------------------------------------------------------------------------


def test_plan_decoder_output_is_8x() -> None:
    plan = plan_buffers(DECODER, {"latents": (2, 4, 32, 48)})
    assert plan == {"latents": ((2, 4, 32, 48), torch.float32), "images": ((2, 3, 256, 384), torch.float32)}


def test_plan_unet_cfg_output_is_x_shape() -> None:
    plan = plan_buffers(UNET_CFG, {"x": (3, 4, 40, 32), "t": (3,), "conds": (2, 512), "weights": (2,)})
    assert plan["v"] == ((3, 4, 40, 32), torch.float32)
    assert plan["conds"] == ((2, 512), torch.float32)


def test_plan_text_encoder_dtypes() -> None:
    plan = plan_buffers(TEXT_ENCODER, {"tokens": torch.Size([5, 77])})
    assert plan == {"tokens": ((5, 77), torch.int64), "embed": ((5, 512), torch.float32)}


@pytest.mark.parametrize(("shapes", "message"), [
    ({"x": (2, 4, 32, 32), "t": (2,), "conds": (2, 512)}, "takes inputs"),
    ({"x": (2, 4, 32, 32), "t": (3,), "conds": (2, 512), "weights": (2,)}, "dimension batch is 2"),
    ({"x": (2, 3, 32, 32), "t": (2,), "conds": (2, 512), "weights": (2,)}, "expected"),
    ({"x": (2, 4, 32), "t": (2,), "conds": (2, 512), "weights": (2,)}, "expected"),
])
def test_bind_dims_rejects_broken_shapes(shapes: dict[str, tuple[int, ...]], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        bind_dims(UNET_CFG, shapes)


class FakeContext:
    """The part of IExecutionContext that Engine.allocate uses; outputs resolved the way TensorRT would."""

    def __init__(self) -> None:
        self.inputs: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}
        self.shape_calls = 0

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        self.inputs[name] = tuple(shape)
        self.shape_calls += 1
        return True

    def set_tensor_address(self, name: str, address: int) -> bool:
        self.addresses[name] = address
        return True

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        n, _, h, w = self.inputs["latents"]
        return (n, 3, 8 * h, 8 * w)


def test_allocate_reuses_and_grows_buffers() -> None:
    engine = Engine(Path("decoder.engine"), DECODER, torch.device("cpu"))
    context = FakeContext()
    engine._context = context  # type: ignore[assignment]
    engine.profile = graph_profile("decoder", ProfileParams(batch=(1, 2, 4), height=(16, 32, 32)))

    first = engine.allocate({"latents": (2, 4, 32, 32)})
    assert first["images"].shape == (2, 3, 256, 256) and first["latents"].dtype == torch.float32
    assert context.addresses["images"] == first["images"].data_ptr()
    assert engine.allocate({"latents": (2, 4, 32, 32)}) is first and context.shape_calls == 1

    smaller = engine.allocate({"latents": (1, 4, 16, 32)})  # a prefix of the same memory
    assert smaller["images"].shape == (1, 3, 128, 256)
    assert smaller["images"].data_ptr() == first["images"].data_ptr()
    assert context.inputs["latents"] == (1, 4, 16, 32)

    engine._graphs[(("latents", (2, 4, 32, 32)),)] = object()  # type: ignore[assignment]
    larger = engine.allocate({"latents": (4, 4, 32, 32)})
    assert larger["images"].shape == (4, 3, 256, 256)
    assert context.addresses["images"] == larger["images"].data_ptr()
    assert engine._graphs == {}  # captured on addresses that are gone

    with pytest.raises(UserError, match=r"latents shape \[8, 4, 32, 32\] is outside the built range"):
        engine.allocate({"latents": (8, 4, 32, 32)})


# --- sidecar ----------------------------------------------------------------------------------------------------


def _built(**changes: object) -> Sidecar:
    fields: dict = dict(tensorrt_version="10.13.0.35", gpu_name="NVIDIA H100 80GB HBM3", compute_capability="9.0",
                        onnx_sha256="ab" * 32, onnx_file="decoder.fp16.onnx", precision="fp16",
                        profiles=graph_profile("decoder", ProfileParams()),
                        builder={"opt_level": 3, "workspace_gib": None, "typing": "flag"},
                        created="2025-01-01T00:00:00+00:00")
    fields.update(changes)
    return Sidecar(**fields)


def test_sidecar_roundtrip(tmp_path: Path) -> None:
    engine = tmp_path / "decoder.fp16.engine"
    assert sidecar_path(engine) == tmp_path / "decoder.fp16.engine.json"
    write_sidecar(engine, _built())
    assert read_sidecar(engine) == _built()


def test_sidecar_missing_or_corrupt(tmp_path: Path) -> None:
    engine = tmp_path / "decoder.engine"
    with pytest.raises(UserError, match="has no sidecar"):
        read_sidecar(engine)
    sidecar_path(engine).write_text("{not json")
    with pytest.raises(UserError, match="unreadable"):
        read_sidecar(engine)


def test_check_sidecar_matches_itself_and_skips_unknowns() -> None:
    assert check_sidecar(_built(), _built()) == []
    runtime_view = Sidecar(tensorrt_version="10.13.0.35", gpu_name="NVIDIA H100 80GB HBM3", compute_capability="9.0")
    assert check_sidecar(_built(), runtime_view) == []


def test_check_sidecar_names_each_mismatch() -> None:
    current = _built(tensorrt_version="11.4.0.106", gpu_name="NVIDIA L4", compute_capability="8.9",
                     onnx_sha256="cd" * 32, precision="fp32",
                     profiles=graph_profile("decoder", ProfileParams(batch=(1, 1, 8))))
    problems = check_sidecar(_built(), current)
    assert len(problems) == 5
    assert "built with TensorRT 10.13.0.35, this is TensorRT 11.4.0.106" in problems
    assert "built for NVIDIA H100 80GB HBM3 (compute 9.0), this GPU is NVIDIA L4 (compute 8.9)" in problems
    assert "the ONNX graph changed since the build (its SHA-256 differs)" in problems
    assert "built as fp16, fp32 requested" in problems
    assert "requested input latents shape [8, 4, 32, 32] is outside the built range [1..4, 4, 32, 32]" in problems


def test_requested_profile_inside_the_built_one_fits() -> None:
    inside = _built(profiles=graph_profile("decoder", ProfileParams(batch=(2, 2, 3))))
    assert check_sidecar(_built(), inside) == []


def test_require_fit_raises_one_line(tmp_path: Path) -> None:
    engine = tmp_path / "decoder.fp16.engine"
    write_sidecar(engine, _built())
    assert require_fit(engine, _built()) == _built()
    with pytest.raises(UserError) as e:
        require_fit(engine, _built(tensorrt_version="11.0.0.1", compute_capability="8.0"))
    message = str(e.value)
    assert "\n" not in message and "TensorRT 11.0.0.1" in message and "compute 8.0" in message
    assert message.endswith(REBUILD_HINT)


def test_stale_reasons_for_rebuilding() -> None:
    assert stale_reasons(_built(), _built()) == []
    assert stale_reasons(_built(), _built(profiles=graph_profile("decoder", ProfileParams(batch=(1, 2, 4))))) == [
        "the optimisation profile changed"]
    (reason,) = stale_reasons(_built(), _built(builder={"opt_level": 5, "workspace_gib": None, "typing": "flag"}))
    assert reason.startswith("builder options changed")


# --- build decisions and errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("version", "has_flag", "typing"), [
    ("11.4.0.106", True, "default"), ("11.0.0", False, "default"), ("10.13.0.35", True, "flag"),
    ("10.0.1", False, "weak")])
def test_network_typing(version: str, has_flag: bool, typing: str) -> None:
    assert network_typing(version, has_flag) == typing


def test_engine_and_precision_names(tmp_path: Path) -> None:
    assert onnx_precision(Path("m/unet_cfg.fp16.onnx")) == "fp16"
    assert onnx_precision(Path("m/unet_cfg.onnx")) == "fp32"
    assert engine_file(tmp_path, "unet_cfg", "fp16") == tmp_path / "unet_cfg.fp16.engine"
    assert engine_file(tmp_path, "decoder", "fp32") == tmp_path / "decoder.engine"


def _no_tensorrt(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises ImportError


def test_build_without_tensorrt_is_one_line_user_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _no_tensorrt(monkeypatch)
    onnx = tmp_path / "decoder.fp16.onnx"
    onnx.write_bytes(b"")
    with pytest.raises(UserError) as e:
        build_engine(onnx, tmp_path / "decoder.fp16.engine", graph_profile("decoder", ProfileParams()))
    message = str(e.value)
    assert message.startswith("TensorRT is not installed: ") and "\n" not in message
    assert "pip install 'ccld-trt[tensorrt]'" in message
    assert not (tmp_path / "decoder.fp16.engine").exists()


def test_type_stubs_alone_are_not_tensorrt(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))  # what tensorrt-stubs leave
    with pytest.raises(UserError, match="only its type stubs"):
        require_tensorrt()


def test_build_checks_its_options_first(tmp_path: Path) -> None:
    profile = graph_profile("decoder", ProfileParams())
    with pytest.raises(UserError, match="optimisation level must be 0 to 5"):
        build_engine(tmp_path / "d.onnx", tmp_path / "d.engine", profile, opt_level=7)
    with pytest.raises(UserError, match="workspace size"):
        build_engine(tmp_path / "d.onnx", tmp_path / "d.engine", profile, workspace_gib=0)
    with pytest.raises(UserError, match="min <= opt <= max"):
        build_engine(tmp_path / "d.onnx", tmp_path / "d.engine", {"latents": ((2, 4, 32, 32),) * 2 + ((1, 4, 32, 32),)})


# --- on a GPU with TensorRT -------------------------------------------------------------------------------------


def _have_tensorrt() -> bool:
    try:
        require_tensorrt()
    except UserError:
        return False
    return True


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and _have_tensorrt()), reason="needs a CUDA GPU and TensorRT")
def test_build_and_run_a_tiny_text_encoder(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = torch.randn(77, 512, generator=torch.Generator().manual_seed(0))
    graph = helper.make_graph(
        [helper.make_node("Cast", ["tokens"], ["f"], to=TensorProto.FLOAT),
         helper.make_node("MatMul", ["f", "w"], ["embed"])],
        "text_encoder",
        [helper.make_tensor_value_info("tokens", TensorProto.INT64, ["batch", 77])],
        [helper.make_tensor_value_info("embed", TensorProto.FLOAT, ["batch", 512])],
        [numpy_helper.from_array(weight.numpy(), "w")])
    onnx_path = tmp_path / "text_encoder.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), onnx_path)
    engine_path = engine_file(tmp_path, "text_encoder", "fp32")
    profile = graph_profile("text_encoder", ProfileParams(conds_max=5))
    cache = tmp_path / "timing.cache"

    assert build_engine(onnx_path, engine_path, profile, opt_level=0, timing_cache_path=cache)
    assert cache.is_file() and read_sidecar(engine_path).precision == "fp32"
    assert not build_engine(onnx_path, engine_path, profile, opt_level=0, timing_cache_path=cache)

    device = torch.device("cuda", torch.cuda.current_device())
    engine = Engine(engine_path, TEXT_ENCODER, device)
    stream = torch.cuda.Stream(device)
    for n, cuda_graph in ((4, False), (2, True), (2, True), (3, False)):
        tokens = torch.randint(0, 8, (n, 77), device=device)  # small: TensorRT may use TF32
        stream.wait_stream(torch.cuda.current_stream(device))
        out = engine.infer({"tokens": tokens}, stream, cuda_graph=cuda_graph)["embed"]
        stream.synchronize()
        torch.testing.assert_close(out, tokens.float() @ weight.to(device), rtol=1e-2, atol=1e-2)

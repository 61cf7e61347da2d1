"""The TensorRT side without a GPU: profiles, sidecars, buffer planning, flavours, the build's decisions and
errors, the Engine's bookkeeping against a fake execution context. Real TensorRT-RTX builds are in
test_engine_build.py; the one test that builds and runs a real engine needs a CUDA GPU and TensorRT (marked gpu)."""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import sys
import threading
import types
import weakref
from collections.abc import Mapping
from pathlib import Path

import pytest
import torch

from ccld_trt.backends.base import GraphBackend
from ccld_trt.backends.tensorrt_backend import engines_flavor
from ccld_trt.engines import engine as engine_module
from ccld_trt.engines import flavor as flavor_module
from ccld_trt.engines import runtime_cache as runtime_cache_module
from ccld_trt.engines import sidecar as sidecar_module
from ccld_trt.engines.build import (
    BuildOptions,
    _load_timing_cache,
    _timing_identity,
    build_engine,
    network_typing,
    onnx_precision,
    stale_reasons,
)
from ccld_trt.engines.engine import (
    Engine,
    engine_file,
    io_problems,
    plan_buffers,
    require_tensorrt,
    runtime_cache_file,
    tensor_dtype_name,
)
from ccld_trt.engines.flavor import parse_capabilities, parse_flavor, resolve_flavor
from ccld_trt.engines.profiles import (
    ProfileParams,
    all_profiles,
    as_profile,
    format_range,
    graph_profile,
    outside_profile,
)
from ccld_trt.engines.runtime_cache import RuntimeCacheFile
from ccld_trt.engines.sidecar import (
    REBUILD_HINT,
    Sidecar,
    check_sidecar,
    checkpoint_digests,
    read_sidecar,
    require_fit,
    sidecar_path,
    write_sidecar,
)
from ccld_trt.export.errors import UserError
from ccld_trt.export.graph_specs import BACKEND_GRAPHS, DECODER, GRAPHS, TEXT_ENCODER, UNET_CFG
from ccld_trt.export.onnx_manifest import COMPONENT
from ccld_trt.export.shapes import bind_dims

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
    """The part of IExecutionContext that Engine uses; outputs resolved the way TensorRT would, launches logged
    with the input shapes they ran at."""

    def __init__(self, launches: list | None = None) -> None:
        self.inputs: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}
        self.shape_calls = 0
        self.refuse: tuple[int, ...] | None = None  # an input shape set_input_shape refuses
        self.launches: list = [] if launches is None else launches  # shared by an engine's contexts

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        self.shape_calls += 1
        if tuple(shape) == self.refuse:
            return False
        self.inputs[name] = tuple(shape)
        return True

    def execute_async_v3(self, stream_handle: int) -> bool:
        self.launches.append(self.inputs["latents"])
        return True

    def set_tensor_address(self, name: str, address: int) -> bool:
        self.addresses[name] = address
        return True

    def set_device_memory(self, address: int, size: int) -> None:
        self.scratch = (address, size)

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

    larger = engine.allocate({"latents": (4, 4, 32, 32)})
    assert larger["images"].shape == (4, 3, 256, 256)
    assert context.addresses["images"] == larger["images"].data_ptr()

    with pytest.raises(UserError, match=r"latents shape \[8, 4, 32, 32\] is outside the built range"):
        engine.allocate({"latents": (8, 4, 32, 32)})


FAKE_STREAM = types.SimpleNamespace(cuda_stream=0)


def _fake_engine(**kwargs: object) -> tuple[Engine, FakeContext]:
    engine = Engine(Path("decoder.engine"), DECODER, torch.device("cpu"), **kwargs)  # type: ignore[arg-type]
    context = FakeContext()
    engine._context = context  # type: ignore[assignment]
    engine.profile = graph_profile("decoder", ProfileParams(batch=(1, 2, 4)))
    return engine, context


def test_allocate_is_all_or_nothing() -> None:
    engine, context = _fake_engine()
    engine.allocate({"latents": (2, 4, 32, 32)})
    context.refuse = (3, 4, 32, 32)
    with pytest.raises(RuntimeError, match="refused shape"):
        engine.allocate({"latents": (3, 4, 32, 32)})  # the buffers grew before the context refused
    calls = context.shape_calls
    back = engine.allocate({"latents": (2, 4, 32, 32)})  # not taken for the current shape: set again
    assert context.shape_calls == calls + 1 and context.inputs["latents"] == (2, 4, 32, 32)
    assert context.addresses["latents"] == back["latents"].data_ptr()
    assert back["images"].shape == (2, 3, 256, 256)


class FakeGraph:
    """A captured launch: replays what its context ran at capture time."""

    def __init__(self, context: FakeContext, captured: list[tuple[int, ...]]) -> None:
        self.context = context
        self.shape = context.inputs["latents"]
        captured.append(self.shape)

    def replay(self) -> None:
        self.context.launches.append(("replay", self.shape, id(self.context)))


class FakeContextMaker:
    """The ICudaEngine side of regular TensorRT: every context it makes logs into one list."""

    def __init__(self) -> None:
        self.launches: list = []
        self.contexts: list[FakeContext] = []

    device_memory_size_v2 = 4096  # scratch bytes a context needs

    def create_execution_context(self, strategy: str = "static") -> FakeContext:
        context = FakeContext(self.launches)
        context.strategy = strategy  # type: ignore[attr-defined]
        self.contexts.append(context)
        return context


def _graphed_engine(monkeypatch: pytest.MonkeyPatch) -> tuple[Engine, FakeContextMaker, list[tuple[int, ...]]]:
    engine = Engine(Path("decoder.engine"), DECODER, torch.device("cpu"), cuda_graph=True)
    maker = FakeContextMaker()
    engine._engine = maker  # type: ignore[assignment]
    engine.profile = graph_profile("decoder", ProfileParams(batch=(1, 2, 8)))
    captured: list[tuple[int, ...]] = []
    monkeypatch.setattr(engine, "_capture", lambda context, stream: FakeGraph(context, captured))
    strategies = types.SimpleNamespace(USER_MANAGED="user-managed")
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(ExecutionContextAllocationStrategy=strategies))
    return engine, maker, captured


def _step(engine: Engine, n: int) -> dict[str, torch.Tensor]:
    buffers = engine.allocate({"latents": (n, 4, 32, 32)})
    engine.launch(FAKE_STREAM)  # type: ignore[arg-type]
    return buffers


def test_alternating_shapes_replay_their_own_cuda_graphs(monkeypatch: pytest.MonkeyPatch) -> None:
    # -n 6 on a batch-4 profile: 4 + 2 rows every step. Each shape set keeps its context, buffers and graph.
    engine, maker, captured = _graphed_engine(monkeypatch)
    buffers = {n: _step(engine, n) for n in (4, 2)}
    for _ in range(5):
        for n in (4, 2):
            assert _step(engine, n)["images"].data_ptr() == buffers[n]["images"].data_ptr()
    assert captured == [(4, 4, 32, 32), (2, 4, 32, 32)]  # once each, never again
    assert len(maker.contexts) == 2
    eager = [launch for launch in maker.launches if launch[0] != "replay"]
    assert eager == [(4, 4, 32, 32), (2, 4, 32, 32)]  # the one eager launch before each capture
    replays = [launch[1][0] for launch in maker.launches if launch[0] == "replay"]
    assert replays == [4, 2] * 6
    # each context was set to its own shape once, with its own buffers' addresses, and one scratch for all
    assert engine._scratch is not None
    for context, n in zip(maker.contexts, (4, 2), strict=True):
        assert context.shape_calls == 1 and context.addresses["images"] == buffers[n]["images"].data_ptr()
        assert context.strategy == "user-managed"  # type: ignore[attr-defined]
        assert context.scratch == (engine._scratch.data_ptr(), 4096)  # type: ignore[attr-defined]


def test_cuda_graphs_are_bounded_least_recently_used_first(monkeypatch: pytest.MonkeyPatch) -> None:
    engine, _, captured = _graphed_engine(monkeypatch)
    sizes = list(range(1, engine_module.MAX_GRAPHS + 2))  # one more shape set than are kept
    for n in sizes:
        _step(engine, n)
    assert len(engine._slots) == engine_module.MAX_GRAPHS
    _step(engine, sizes[-1])  # still there: replayed
    _step(engine, sizes[0])  # the least recently used was dropped: captured again
    assert captured == [(n, 4, 32, 32) for n in sizes] + [(sizes[0], 4, 32, 32)]
    assert len(engine._slots) == engine_module.MAX_GRAPHS


def test_rtx_engines_leave_cuda_graphs_to_tensorrt_rtx(monkeypatch: pytest.MonkeyPatch) -> None:
    engine, context = _fake_engine(flavor="tensorrt-rtx", cuda_graph=True)
    monkeypatch.setattr(engine, "_capture", lambda context, stream: pytest.fail("captured by hand"))
    engine.allocate({"latents": (2, 4, 32, 32)})
    engine.launch(FAKE_STREAM)  # type: ignore[arg-type]
    assert context.launches == [(2, 4, 32, 32)]


class FakeRuntimeCache:
    """Its serialized form lists the shapes its context has run (kernels specialised per shape), plus any
    kernel compiled later (``late``)."""

    def __init__(self, context: FakeContext) -> None:
        self.context = context
        self.late: list[str] = []
        self.serialized = 0

    def serialize(self) -> bytes:
        self.serialized += 1
        shapes = sorted({launch for launch in self.context.launches})
        return repr((shapes, self.late)).encode()


def _rtx_engine(path: Path) -> tuple[Engine, FakeContext, FakeRuntimeCache]:
    engine, context = _fake_engine(flavor="tensorrt-rtx")
    engine.path = path
    cache = FakeRuntimeCache(context)
    engine.runtime_cache = RuntimeCacheFile(runtime_cache_file(path), cache)
    return engine, context, cache


def _written(engine: Engine) -> None:
    assert engine.runtime_cache is not None
    if engine.runtime_cache.pending is not None:
        engine.runtime_cache.pending.result()


def test_rtx_runtime_cache_written_when_it_changed_off_the_hot_path_and_at_close(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    engine, _, cache = _rtx_engine(tmp_path / "decoder.engine")
    writes: list[tuple[bytes, str]] = []
    real_write = runtime_cache_module.write_atomic

    def write(path: Path, data: memoryview) -> None:
        writes.append((bytes(data), threading.current_thread().name))
        real_write(path, data)

    monkeypatch.setattr(runtime_cache_module, "write_atomic", write)
    monkeypatch.setattr(runtime_cache_module, "CACHE_SAVE_INTERVAL_S", 0.0)
    for _ in range(15):  # 15 split steps: 4 + 2 rows each
        for n in (4, 2):
            _step(engine, n)
    _written(engine)
    # written once per new content (not on each of the 30 shape changes), on the writer thread
    assert len(writes) == 2 and all(name.startswith("ccld-trt-runtime-cache") for _, name in writes)
    cache.late.append("kernel compiled lazily after its shape's first launch")
    engine.close()
    assert len(writes) == 3 and writes[-1][1] == threading.current_thread().name
    assert runtime_cache_file(engine.path).read_bytes() == cache.serialize()
    engine.close()  # nothing new: nothing written
    assert len(writes) == 3


def test_rtx_runtime_cache_looks_at_most_every_interval(tmp_path: Path) -> None:
    engine, _, cache = _rtx_engine(tmp_path / "decoder.engine")
    for n in (1, 2, 3, 4):  # a new shape each call, well within CACHE_SAVE_INTERVAL_S
        _step(engine, n)
    assert cache.serialized == 0 and not runtime_cache_file(engine.path).exists()
    engine.close()
    assert runtime_cache_file(engine.path).read_bytes() == cache.serialize()


def test_read_only_engine_directory_is_one_warning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    engine, context, cache = _rtx_engine(blocker / "decoder.engine")  # every write there fails (OSError)
    monkeypatch.setattr(runtime_cache_module, "CACHE_SAVE_INTERVAL_S", 0.0)
    with caplog.at_level(logging.WARNING):
        for n in (1, 2, 3, 1, 2):
            _step(engine, n)
            _written(engine)
        cache.late.append("more")
        engine.close()
        engine.close()
    warnings = [r for r in caplog.records if "cannot save the TensorRT-RTX runtime cache" in r.getMessage()]
    assert len(warnings) == 1 and [launch[0] for launch in context.launches] == [1, 2, 3, 1, 2]


class FakeRuntimeConfig:
    def __init__(self, cache: object) -> None:
        self.cache = cache
        self.cuda_graph_strategy = None

    def create_runtime_cache(self) -> object:
        return self.cache

    def set_runtime_cache(self, cache: object) -> bool:
        return True


class FakeRtxCudaEngine:
    """create_runtime_config / create_execution_context(config): the context keeps no reference to the config
    (as TensorRT-RTX's Python binding does not), so only the Engine can keep it alive."""

    def __init__(self) -> None:
        self.configs: list[weakref.ref[FakeRuntimeConfig]] = []

    def create_runtime_config(self) -> FakeRuntimeConfig:
        config = FakeRuntimeConfig(types.SimpleNamespace(deserialize=lambda data: True, reset=lambda: True))
        self.configs.append(weakref.ref(config))
        return config

    def create_execution_context(self, config: FakeRuntimeConfig) -> FakeContext:
        return FakeContext()


def test_rtx_runtime_config_lives_as_long_as_the_context(tmp_path: Path) -> None:
    engine = Engine(tmp_path / "decoder.engine", DECODER, torch.device("cpu"), "tensorrt-rtx")
    cuda_engine = FakeRtxCudaEngine()
    engine._engine = cuda_engine  # type: ignore[assignment]
    engine.activate()
    gc.collect()
    (config,) = cuda_engine.configs
    assert engine._context is not None and config() is not None


@pytest.mark.parametrize(("diagnostic", "expected", "absent"), [
    ("OLD_CUDA_DRIVER", "the NVIDIA driver is too old", "--compute-capability"),
    ("VERSION_MISMATCH", "built by another TensorRT-RTX version", "--compute-capability"),
    ("UNSUPPORTED_CC", "rebuild it with --compute-capability 8.9", "driver"),
])
def test_invalid_rtx_engine_names_its_real_reason_and_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         diagnostic: str, expected: str, absent: str) -> None:
    trtx = pytest.importorskip("tensorrt_rtx")

    class Runtime:
        def __init__(self, logger: object) -> None:
            pass

        def get_engine_validity(self, data: bytes) -> tuple[object, object]:
            return trtx.EngineValidity.INVALID, trtx.EngineInvalidityDiagnostics.__members__[diagnostic]

    monkeypatch.setattr(trtx, "Runtime", Runtime)
    engine = Engine(tmp_path / "decoder.engine", DECODER, torch.device("cpu"), "tensorrt-rtx")
    monkeypatch.setattr(engine, "_capability", lambda: "8.9")
    with pytest.raises(UserError) as e:
        engine._deserialize(b"engine")
    message = str(e.value)
    assert expected in message and absent not in message and "\n" not in message


class FakeDataType:
    def __init__(self, name: str) -> None:
        self.name = name


class FakeCudaEngine:
    """I/O of a decoder engine whose output dtype is ``dtype``."""

    def __init__(self, dtype: str) -> None:
        self.io = {"latents": ("INPUT", "FLOAT"), "images": ("OUTPUT", dtype)}
        self.num_io_tensors = 2

    def get_tensor_name(self, i: int) -> str:
        return list(self.io)[i]

    def get_tensor_mode(self, name: str) -> FakeDataType:
        return FakeDataType(self.io[name][0])

    def get_tensor_dtype(self, name: str) -> FakeDataType:
        return FakeDataType(self.io[name][1])


def test_engine_dtypes_by_table_bf16_included() -> None:
    assert tensor_dtype_name(FakeDataType("BF16")) == "bfloat16"
    assert tensor_dtype_name(FakeDataType("HALF")) == "float16"
    assert tensor_dtype_name(FakeDataType("INT4")) == "int4"
    assert io_problems(FakeCudaEngine("FLOAT"), DECODER) == []  # type: ignore[arg-type]
    assert io_problems(FakeCudaEngine("BF16"), DECODER) == ["images is bfloat16, not float32"]  # type: ignore[arg-type]
    assert io_problems(FakeCudaEngine("FP8"), TEXT_ENCODER) == ["no input tokens", "no output embed"]  # type: ignore[arg-type]


# --- flavours ---------------------------------------------------------------------------------------------------


def test_parse_flavor_and_capabilities() -> None:
    assert [parse_flavor(c) for c in ("auto", "TensorRT", "rtx", "tensorrt_rtx")] == [
        "auto", "tensorrt", "tensorrt-rtx", "tensorrt-rtx"]
    with pytest.raises(UserError, match="unknown TensorRT flavour 'trt': choose one of auto, tensorrt, rtx"):
        parse_flavor("trt")
    assert parse_capabilities("12.0, 8.6,8.6,8.0") == ("8.0", "8.6", "12.0")
    with pytest.raises(UserError, match=r"MAJOR\.MINOR"):
        parse_capabilities("sm86")


def test_auto_flavor(monkeypatch: pytest.MonkeyPatch) -> None:
    def have(*flavors: str) -> None:
        monkeypatch.setattr(flavor_module, "installed_flavors", lambda: {f: "1" for f in flavors})

    monkeypatch.setattr(flavor_module, "rtx_capabilities", lambda: ("7.5", "8.0", "8.6", "8.9", "12.0", "12.1"))
    have("tensorrt", "tensorrt-rtx")
    assert resolve_flavor("auto", None) == "tensorrt-rtx"  # the one that builds without a GPU
    assert resolve_flavor("auto", "9.0") == "tensorrt"
    assert resolve_flavor("auto", "8.9") == "tensorrt"  # tuned on this GPU
    have("tensorrt-rtx")
    assert resolve_flavor("auto", "8.9") == "tensorrt-rtx"
    with pytest.raises(UserError, match=r"does not run on this GPU \(compute 9.0"):
        resolve_flavor("auto", "9.0")
    have("tensorrt")
    with pytest.raises(UserError, match="only on the GPU that runs them"):
        resolve_flavor("auto", None)
    have()
    with pytest.raises(UserError, match=r"no TensorRT is installed: pip install 'ccld-trt\[tensorrt-rtx\]'"):
        resolve_flavor("auto", None)


def test_runtime_flavor_is_the_engines(monkeypatch: pytest.MonkeyPatch) -> None:
    assert engines_flavor("auto", {"decoder": _rtx(), "unet_cfg": _rtx()}) == "tensorrt-rtx"
    assert engines_flavor("tensorrt", {"decoder": _rtx()}) == "tensorrt"  # the sidecar check then says why not
    with pytest.raises(UserError, match="built with tensorrt, tensorrt-rtx"):
        engines_flavor("auto", {"decoder": _rtx(), "unet_cfg": _built()})


def test_timing_cache_of_another_build_is_not_loaded(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cache = tmp_path / "timing.cache"
    assert _load_timing_cache(cache, _rtx()) is None  # none yet
    cache.write_bytes(b"tactics")
    (tmp_path / "timing.cache.json").write_text(json.dumps(_timing_identity(_rtx())))
    assert _load_timing_cache(cache, _rtx()) == cache
    with caplog.at_level(logging.WARNING):
        assert _load_timing_cache(cache, _rtx(version="1.8.0.1")) is None
    assert "starting a new one" in caplog.text


def test_checkpoint_digests_are_cached_by_size_and_mtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt, cache = tmp_path / "unet.ckpt", tmp_path / "engines" / "checkpoints.json"
    ckpt.write_bytes(b"weights")
    expected = hashlib.sha256(b"weights").hexdigest()
    assert checkpoint_digests({"unet": ckpt}, cache) == {"unet": expected}
    monkeypatch.setattr(sidecar_module, "sha256_file", lambda path: pytest.fail("hashed again"))
    assert checkpoint_digests({"unet": ckpt}, cache) == {"unet": expected}
    monkeypatch.undo()
    ckpt.write_bytes(b"other weights!")
    assert checkpoint_digests({"unet": ckpt}, cache) == {"unet": hashlib.sha256(b"other weights!").hexdigest()}


# --- calls larger than a profile --------------------------------------------------------------------------------


class FakeGraphBackend(GraphBackend):
    """unet_cfg as v = sum_c w_c (x + t + sum(cond_c)), the decoder as a repeat: analytic oracles, with the
    batch / conds of every call recorded."""

    name = "fake"
    device = torch.device("cpu")

    def __init__(self, limits: dict[str, int]) -> None:
        self._limits = limits
        self.calls: list[tuple[int, ...]] = []

    def limits(self, graph: str) -> dict[str, int]:
        return self._limits

    def _run(self, graph: str, feed: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if graph == "unet_cfg":
            x, t, conds, w = feed["x"], feed["t"], feed["conds"], feed["weights"]
            self.calls.append((len(x), len(conds)))
            assert len(x) <= self._limits.get("batch", 99) and len(conds) <= self._limits.get("conds", 99)
            per_cond = x[None] + t[None, :, None, None, None] + conds.sum(1)[:, None, None, None, None]
            return (w[:, None, None, None, None] * per_cond).sum(0)
        self.calls.append((len(feed["latents"]),))
        return feed["latents"].repeat(1, 1, 8, 8)[:, :3]


def test_calls_beyond_the_profile_are_split() -> None:
    gen = torch.Generator().manual_seed(0)
    x, t = torch.randn(7, 4, 8, 8, generator=gen), torch.rand(7, generator=gen)
    conds, w = torch.randn(5, 512, generator=gen), torch.randn(5, generator=gen)
    whole = FakeGraphBackend({}).unet(x, t, conds, w)
    split = FakeGraphBackend({"batch": 3, "conds": 2})
    torch.testing.assert_close(split.unet(x, t, conds, w), whole, rtol=1e-6, atol=1e-5)
    assert split.calls == [(3, 2), (3, 2), (1, 2), (3, 2), (3, 2), (1, 2), (3, 1), (3, 1), (1, 1)]
    latents = torch.randn(5, 4, 8, 8, generator=gen)
    decoder = FakeGraphBackend({"batch": 4})
    assert torch.equal(decoder.decode(latents), FakeGraphBackend({}).decode(latents))
    assert decoder.calls == [(4,), (1,)]


# --- sidecar ----------------------------------------------------------------------------------------------------


def _built(**changes: object) -> Sidecar:
    fields: dict = dict(flavor="tensorrt", version="10.13.0.35", compute_capabilities=("9.0",),
                        gpu_name="NVIDIA H100 80GB HBM3", onnx_file="decoder.fp16.onnx",
                        onnx_sha256={"decoder.fp16.onnx": "ab" * 32}, sources={"autoencoder": "12" * 32},
                        precision="fp16", profiles=graph_profile("decoder", ProfileParams()),
                        builder=BuildOptions().builder_facts(), engine_sha256="ef" * 32,
                        created="2025-01-01T00:00:00+00:00")
    fields.update(changes)
    return Sidecar(**fields)


def _rtx(**changes: object) -> Sidecar:
    return _built(**{"flavor": "tensorrt-rtx", "version": "1.7.1.116", "gpu_name": "",
                     "compute_capabilities": ("8.0", "8.6", "8.9", "12.0"), **changes})


def test_sidecar_roundtrip(tmp_path: Path) -> None:
    engine = tmp_path / "decoder.fp16.engine"
    assert sidecar_path(engine) == tmp_path / "decoder.fp16.engine.json"
    for sidecar in (_built(), _rtx()):
        write_sidecar(engine, sidecar)
        assert read_sidecar(engine) == sidecar


def test_sidecar_missing_corrupt_or_old(tmp_path: Path) -> None:
    engine = tmp_path / "decoder.engine"
    with pytest.raises(UserError, match="has no sidecar"):
        read_sidecar(engine)
    sidecar_path(engine).write_text("{not json")
    with pytest.raises(UserError, match="unreadable"):
        read_sidecar(engine)
    sidecar_path(engine).write_text('{"sidecar_version": 1, "tensorrt_version": "10.13.0.35"}')
    with pytest.raises(UserError, match="older sidecar_version"):
        read_sidecar(engine)


def test_check_sidecar_matches_itself_and_skips_unknowns() -> None:
    assert check_sidecar(_built(), _built()) == []
    runtime_view = Sidecar(flavor="tensorrt", version="10.13.0.35", compute_capabilities=("9.0",),
                           gpu_name="NVIDIA H100 80GB HBM3")
    assert check_sidecar(_built(), runtime_view) == []


def test_check_sidecar_names_each_mismatch() -> None:
    current = _built(version="11.4.0.106", gpu_name="NVIDIA L4", compute_capabilities=("8.9",),
                     onnx_sha256={"decoder.fp16.onnx": "cd" * 32}, sources={"autoencoder": "34" * 32},
                     precision="fp32", profiles=graph_profile("decoder", ProfileParams(batch=(1, 1, 8))))
    problems = check_sidecar(_built(), current)
    assert problems == [
        "built with TensorRT 10.13.0.35, this is TensorRT 11.4.0.106",
        "built for NVIDIA H100 80GB HBM3 (compute 9.0), this is NVIDIA L4 (compute 8.9)",
        "the ONNX graph changed since the build (its SHA-256 differs)",
        "built from another autoencoder checkpoint (its SHA-256 differs)",
        "built as fp16, fp32 requested",
        "requested input latents shape [8, 4, 32, 32] is outside the built range [1..4, 4, 32, 32]",
    ]


def test_rtx_engines_fit_each_of_their_targets() -> None:
    for capability in ("8.0", "8.9", "12.0"):
        here = Sidecar(flavor="tensorrt-rtx", version="1.7.1.116", compute_capabilities=(capability,),
                       gpu_name="NVIDIA GeForce RTX")
        assert check_sidecar(_rtx(), here) == []
    hopper = Sidecar(flavor="tensorrt-rtx", version="1.7.1.116", compute_capabilities=("9.0",),
                     gpu_name="NVIDIA H100")
    assert check_sidecar(_rtx(), hopper) == ["built for (compute 8.0, 8.6, 8.9, 12.0), this is NVIDIA H100 "
                                             "(compute 9.0)"]
    regular = Sidecar(flavor="tensorrt", version="10.13.0.35", compute_capabilities=("8.9",))
    assert check_sidecar(_rtx(), regular)[0] == "built with TensorRT-RTX, this is TensorRT"


def test_requested_profile_inside_the_built_one_fits() -> None:
    inside = _built(profiles={"latents": ((2, 4, 32, 32), (2, 4, 32, 32), (3, 4, 32, 32))})
    assert check_sidecar(_built(), inside) == []


def test_require_fit_raises_one_line(tmp_path: Path) -> None:
    engine = tmp_path / "decoder.fp16.engine"
    write_sidecar(engine, _built())
    assert require_fit(engine, _built()) == _built()
    with pytest.raises(UserError) as e:
        require_fit(engine, _built(version="11.0.0.1", compute_capabilities=("8.0",)))
    message = str(e.value)
    assert "\n" not in message and "TensorRT 11.0.0.1" in message and "compute 8.0" in message
    assert message.endswith(REBUILD_HINT)


def test_stale_reasons_for_rebuilding() -> None:
    assert stale_reasons(_rtx(), _rtx()) == []
    assert stale_reasons(_built(), _built(profiles=graph_profile("decoder", ProfileParams(batch=(1, 2, 4))))) == [
        "the optimisation profile changed"]
    (reason,) = stale_reasons(_built(), _built(builder={**BuildOptions().builder_facts(), "opt_level": 5}))
    assert reason.startswith("builder options changed")
    assert stale_reasons(_rtx(), _rtx(compute_capabilities=("8.9",))) == [
        "the target compute capabilities changed (8.0, 8.6, 8.9, 12.0 -> 8.9)"]
    (reason,) = stale_reasons(_rtx(), _rtx(compute_capabilities=("8.9", "12.1")))
    assert reason.startswith("built for (compute 8.0, 8.6, 8.9, 12.0), this is (compute 8.9, 12.1)")


# --- build decisions and errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("version", "has_flag", "typing"), [
    ("11.4.0.106", True, "default"), ("11.0.0", False, "default"), ("10.13.0.35", True, "flag"),
    ("1.7.1.116", True, "flag")])  # TensorRT-RTX 1.x has the flag
def test_network_typing(version: str, has_flag: bool, typing: str) -> None:
    assert network_typing(version, has_flag) == typing
    with pytest.raises(UserError, match="cannot build strongly typed networks"):
        network_typing("9.0.1", False)


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
        build_engine(onnx, tmp_path / "decoder.fp16.engine", graph_profile("decoder", ProfileParams()),
                     BuildOptions(flavor="tensorrt"))
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
        build_engine(tmp_path / "d.onnx", tmp_path / "d.engine", profile, BuildOptions(opt_level=7))
    with pytest.raises(UserError, match="workspace size"):
        build_engine(tmp_path / "d.onnx", tmp_path / "d.engine", profile, BuildOptions(workspace_gib=0))
    with pytest.raises(UserError, match=r"compute capability must be MAJOR\.MINOR"):
        build_engine(tmp_path / "d.onnx", tmp_path / "d.engine", profile, BuildOptions(compute_capabilities=("86",)))
    with pytest.raises(UserError, match="compute capabilities are for TensorRT-RTX"):
        build_engine(tmp_path / "d.onnx", tmp_path / "d.engine", profile,
                     BuildOptions(flavor="tensorrt", compute_capabilities=("8.6",)))
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

    # Small integers: every product and sum is exact in fp32, and in TF32 too (10-bit mantissa), so the engine
    # must match exactly whatever the GPU's matrix units do.
    weight = torch.randint(-8, 9, (77, 512), generator=torch.Generator().manual_seed(0)).float()
    graph = helper.make_graph(
        [helper.make_node("Cast", ["tokens"], ["f"], to=TensorProto.FLOAT),
         helper.make_node("MatMul", ["f", "w"], ["embed"])],
        "text_encoder",
        [helper.make_tensor_value_info("tokens", TensorProto.INT64, ["batch", 77])],
        [helper.make_tensor_value_info("embed", TensorProto.FLOAT, ["batch", 512])],
        [numpy_helper.from_array(weight.numpy(), "w")])
    onnx_path = tmp_path / "text_encoder.onnx"
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    helper.set_model_props(model, {"ccld_trt.source_sha256": json.dumps({"cloob": "12" * 32})})  # a build needs it
    onnx.save(model, onnx_path)
    engine_path = engine_file(tmp_path, "text_encoder", "fp32")
    profile = graph_profile("text_encoder", ProfileParams(conds_max=5))
    cache = tmp_path / "timing.cache"
    options = BuildOptions(flavor="tensorrt", opt_level=0)

    assert build_engine(onnx_path, engine_path, profile, options, timing_cache_path=cache)
    assert cache.is_file() and read_sidecar(engine_path).precision == "fp32"
    assert not build_engine(onnx_path, engine_path, profile, options, timing_cache_path=cache)

    device = torch.device("cuda", torch.cuda.current_device())
    sha = read_sidecar(engine_path).engine_sha256
    eager = Engine(engine_path, TEXT_ENCODER, device, engine_sha256=sha)
    graphed = Engine(engine_path, TEXT_ENCODER, device, engine_sha256=sha, cuda_graph=True)
    stream = torch.cuda.Stream(device)
    for n in (4, 2, 3, 2, 2):  # back to an earlier shape: captured again, same results as eager
        tokens = torch.randint(0, 8, (n, 77), device=device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):  # the copies ordered after each launch
            outs = [e.infer({"tokens": tokens}, stream)["embed"].clone() for e in (eager, graphed)]
        stream.synchronize()
        expected = tokens.float() @ weight.to(device)
        for out in outs:
            torch.testing.assert_close(out, expected, rtol=0, atol=0)


# --- issue 19: engines tied to their model files, stream order, profiles, RTX targets, merged rows -------------


def test_checkpoint_digest_cache_sees_a_rewrite_that_keeps_size_and_mtime(tmp_path: Path) -> None:
    ckpt, cache = tmp_path / "unet.ckpt", tmp_path / "checkpoints.json"
    ckpt.write_bytes(b"weights A")
    stat = ckpt.stat()
    assert checkpoint_digests({"unet": ckpt}, cache) == {"unet": hashlib.sha256(b"weights A").hexdigest()}
    ckpt.write_bytes(b"weights B")  # same size; then the mtime set back, as cp -p or rsync -t would
    os.utime(ckpt, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert ckpt.stat().st_mtime_ns == stat.st_mtime_ns and ckpt.stat().st_size == stat.st_size
    assert checkpoint_digests({"unet": ckpt}, cache) == {"unet": hashlib.sha256(b"weights B").hexdigest()}


def test_engines_without_their_checkpoints_are_refused_at_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ccld_trt.backends import tensorrt_backend
    from ccld_trt.backends.tensorrt_backend import TensorRTBackend

    monkeypatch.setattr(tensorrt_backend, "gpu_identity", lambda device: ("NVIDIA GeForce RTX 4090", "8.9"))
    monkeypatch.setattr(tensorrt_backend, "require_flavor", lambda flavor: "1.7.1.116")
    for graph in BACKEND_GRAPHS:
        path = engine_file(tmp_path, graph, "fp16")
        path.write_bytes(b"engine")
        sources = {} if graph == "decoder" else {COMPONENT[graph]: "12" * 32}  # as graphs without metadata gave
        write_sidecar(path, _rtx(sources=sources, profiles={}))
    with pytest.raises(UserError) as e:
        TensorRTBackend(tmp_path)  # no model files named: the tie itself is still required
    message = str(e.value)
    assert "decoder.fp16.engine does not fit: its sidecar names no autoencoder checkpoint" in message
    assert "\n" not in message


def test_a_graph_without_source_metadata_builds_no_engine(tmp_path: Path) -> None:
    pytest.importorskip("tensorrt_rtx")
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["latents"], ["images"])], "decoder",
        [helper.make_tensor_value_info("latents", TensorProto.FLOAT, ["batch", 4, "height", "width"])],
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 4, "height", "width"])])
    onnx_file = tmp_path / "decoder.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), onnx_file)
    with pytest.raises(UserError, match="does not record the checkpoint it was exported from"):
        build_engine(onnx_file, tmp_path / "decoder.engine", graph_profile("decoder", ProfileParams()))
    assert not (tmp_path / "decoder.engine").exists()


def test_profiles_whose_batch_starts_above_one_are_refused() -> None:
    # --batch 2,2,4 with -n 5 would split 4 + 1, and the 1-row part falls outside the profile
    with pytest.raises(UserError, match=r"batch range must start at 1, got \[2, 2, 4\]"):
        graph_profile("unet_cfg", ProfileParams(batch=(2, 2, 4)))
    from ccld_trt.backends.tensorrt_backend import small_call_problems

    built = {"latents": ((2, 4, 32, 32), (2, 4, 32, 32), (4, 4, 32, 32))}
    assert small_call_problems(DECODER, built) == ["decoder input latents takes batch >= 2"]
    assert small_call_problems(DECODER, graph_profile("decoder", ProfileParams())) == []


def test_rtx_targets_are_rtx_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    assert flavor_module.RTX_DEFAULT_TARGETS == ("8.6", "8.9", "12.0")  # NVIDIA's portable default
    assert BuildOptions().validate().compute_capabilities == ("8.6", "8.9", "12.0")
    assert BuildOptions(compute_capabilities=("7.5",)).validate().compute_capabilities == ("7.5",)
    for datacenter in ("8.0", "9.0"):  # A100; H100, H200
        with pytest.raises(UserError, match=rf"compute capability {datacenter} is not an RTX GPU: .*regular TensorRT"):
            BuildOptions(compute_capabilities=("8.6", datacenter)).validate()
    monkeypatch.setattr(flavor_module, "installed_flavors", lambda: {"tensorrt-rtx": "1"})
    monkeypatch.setattr(flavor_module, "rtx_capabilities", lambda: ("7.5", "8.0", "8.6", "8.9", "12.0", "12.1"))
    assert resolve_flavor("auto", "7.5") == "tensorrt-rtx"
    with pytest.raises(UserError, match=r"does not run on this GPU \(compute 8.0; it runs on 7.5, 8.6, 8.9, 12.0, "):
        resolve_flavor("auto", "8.0")


class OrderLog:
    """Streams and tensors that log what is enqueued, in order."""

    def __init__(self) -> None:
        self.events: list[str] = []


class LoggedStream:
    def __init__(self, log: OrderLog, name: str) -> None:
        self.log, self.name = log, name

    def wait_stream(self, other: LoggedStream) -> None:
        self.log.events.append(f"{self.name} waits for {other.name}")


class LoggedTensor:
    def __init__(self, log: OrderLog, name: str, value: torch.Tensor) -> None:
        self.log, self.name, self.value = log, name, value
        self.shape = value.shape

    def to(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        self.log.events.append(f"convert {self.name}")
        return self.value.to(device, dtype)


class FakeRowEngine:
    """An engine without a GPU: unet_cfg as v = sum_c w_c f(x, t, cond_c), the plain unet as f(x, t, embed) per
    row, with f nonlinear in every input; the rows of every call recorded."""

    def __init__(self, graph: str, params: ProfileParams, log: OrderLog | None = None) -> None:
        self.graph, self.log = graph, log
        self.calls: list[int] = []
        self.profile = graph_profile(graph, params)

    def activate(self) -> None:
        pass

    def infer(self, feed: Mapping[str, torch.Tensor], stream: object) -> dict[str, torch.Tensor]:
        if self.log is not None:
            self.log.events.append(f"{self.graph} on the engine stream")
        if self.graph == "unet":
            self.calls.append(len(feed["x"]))
            return {"v": row_f(feed["x"], feed["t"], feed["embed"])}
        x, t, conds, w = feed["x"], feed["t"], feed["conds"], feed["weights"]
        self.calls.append(len(x))
        per_cond = torch.stack([row_f(x, t, c.expand(len(x), -1)) for c in conds])
        return {"v": (w[:, None, None, None, None] * per_cond).sum(0)}


def row_f(x: torch.Tensor, t: torch.Tensor, embed: torch.Tensor) -> torch.Tensor:
    return torch.tanh(x * (1 + t[:, None, None, None]) + embed[:, :4, None, None])


def _fake_backend(monkeypatch: pytest.MonkeyPatch, log: OrderLog | None = None):  # type: ignore[no-untyped-def]
    from ccld_trt.backends.tensorrt_backend import TensorRTBackend

    log = log or OrderLog()
    backend = TensorRTBackend.__new__(TensorRTBackend)
    backend.device = torch.device("cpu")
    # unet_cfg: up to 3 images x 2 conditions; the plain unet: up to 3 x 2 = 6 rows
    params = ProfileParams(batch=(1, 1, 3), conds_max=2, height=(8, 8, 8), width=(8, 8, 8))
    engines: dict = {"unet_cfg": FakeRowEngine("unet_cfg", params, log), "unet": FakeRowEngine("unet", params)}
    backend.engines = engines
    backend.stream = LoggedStream(log, "engine")  # type: ignore[assignment]
    backend._hint = "rebuild"
    caller = LoggedStream(log, "caller")
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: caller)
    return backend


def test_inputs_are_converted_before_the_engine_stream_waits(monkeypatch: pytest.MonkeyPatch) -> None:
    log = OrderLog()
    backend = _fake_backend(monkeypatch, log)
    gen = torch.Generator().manual_seed(0)
    feed = {"x": torch.randn(2, 4, 8, 8, generator=gen, dtype=torch.float64), "t": torch.rand(2, generator=gen),
            "conds": torch.randn(2, 512, generator=gen), "weights": torch.ones(2)}
    backend._run("unet_cfg", {k: LoggedTensor(log, k, v) for k, v in feed.items()})  # type: ignore[misc]
    assert log.events == ["convert x", "convert t", "convert conds", "convert weights", "engine waits for caller",
                          "unet_cfg on the engine stream", "caller waits for engine"]


def test_tensorrt_rows_merge_through_the_step_batcher(monkeypatch: pytest.MonkeyPatch) -> None:
    from ccld_trt.cluster.batcher import StepBatcher
    from ccld_trt.cluster.rows import RowBackend, SerialBackend, UNetCall

    backend = _fake_backend(monkeypatch)
    as_object: object = backend
    assert isinstance(as_object, RowBackend)  # so run_merged merges on it
    rows_engine = backend.engines["unet"]
    assert isinstance(rows_engine, FakeRowEngine)
    gen = torch.Generator().manual_seed(1)
    calls = [UNetCall(torch.randn(n, 4, 8, 8, generator=gen), torch.rand(n, generator=gen),
                      torch.randn(c, 512, generator=gen), torch.randn(c, generator=gen))
             for n, c in ((1, 2), (2, 2), (1, 3), (1, 1))]
    solo = [backend.unet(c.x, c.t, c.conds, c.weights) for c in calls]
    serial = SerialBackend(backend)  # type: ignore[arg-type]
    batcher = StepBatcher(serial.merged, lambda call: call.rows, max_rows=64, window_s=30.0)
    results: list[torch.Tensor | None] = [None] * len(calls)
    entered = threading.Barrier(len(calls))

    def work(k: int) -> None:
        with batcher.sampling():
            entered.wait()
            results[k] = batcher.evaluate(calls[k])

    threads = [threading.Thread(target=work, args=(k,)) for k in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    batcher.close()
    assert batcher.stats()["merged_calls"] == 1 and batcher.stats()["requests_per_call_max"] == 4
    # 2 + 4 + 3 + 1 = 10 rows in one merged evaluation, split to the unet engine's profile (6 rows)
    assert rows_engine.calls == [6, 4]
    for got, expected in zip(results, solo, strict=True):
        assert got is not None
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_unet_rows_without_a_unet_engine_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    backend = _fake_backend(monkeypatch)
    del backend.engines["unet"]
    with pytest.raises(UserError, match="no unet engine for merged U-Net rows"):
        backend.unet_rows(torch.zeros(1, 4, 8, 8), torch.zeros(1), torch.zeros(1, 512))

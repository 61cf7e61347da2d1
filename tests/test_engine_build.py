"""Real engines on a machine without a GPU: TensorRT-RTX builds ahead of time, from the project's own exports of
the small seed-3 demo weights (a second seed for "the model changed"). Each build takes a second or two."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from ccld_trt.engines.build import (
    ENGINE_GRAPHS,
    BuildOptions,
    _polygraphy,
    build_engine,
    build_engines,
    configure,
    parse_network,
)
from ccld_trt.engines.engine import engine_file
from ccld_trt.engines.flavor import RTX_DEFAULT_TARGETS, require_flavor
from ccld_trt.engines.profiles import ProfileParams, graph_profile
from ccld_trt.engines.sidecar import read_sidecar, sidecar_path
from ccld_trt.export.errors import UserError
from ccld_trt.export.file_digests import sha256_file
from ccld_trt.export.models import ModelFiles
from ccld_trt.export.onnx_export import export_all, onnx_path

pytestmark = pytest.mark.skipif(importlib.util.find_spec("tensorrt_rtx") is None,
                                reason="needs tensorrt-rtx (pip install 'ccld-trt[tensorrt-rtx]')")

RTX = BuildOptions(flavor="tensorrt-rtx")
SMALL = ProfileParams(image_size=64)  # the small demo CLOOB's input side


@pytest.fixture(scope="module")
def seed3_onnx(seed3_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fp16 backend graphs of the seed-3 weights (test_onnx's export when it ran first in this session)."""
    from test_onnx import export_seed3  # tests/ is on sys.path under pytest's default import mode

    return export_seed3(seed3_dir, tmp_path_factory)[1]


@pytest.fixture(scope="module")
def seed4_decoder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(models dir, fp16 decoder ONNX) of other weights: seed 4."""
    from ccld_trt.export.demo_weights import write_demo_weights

    models = tmp_path_factory.mktemp("seed4")
    write_demo_weights(models, "small", seed=4)
    out = tmp_path_factory.mktemp("seed4-onnx")
    export_all(ModelFiles.resolve(models), out, ["decoder"], progress=False)
    return models, onnx_path(out, "decoder", "fp16")


def test_build_writes_the_engine_and_a_full_sidecar(seed3_onnx: Path, seed3_dir: Path, tmp_path: Path) -> None:
    onnx_file = onnx_path(seed3_onnx, "decoder", "fp16")
    engine = engine_file(tmp_path, "decoder", "fp16")
    profile = graph_profile("decoder", SMALL)
    assert build_engine(onnx_file, engine, profile, RTX, timing_cache_path=tmp_path / "timing.cache")
    sidecar = read_sidecar(engine)
    assert (sidecar.flavor, sidecar.version) == ("tensorrt-rtx", require_flavor("tensorrt-rtx"))
    assert sidecar.compute_capabilities == RTX_DEFAULT_TARGETS == ("8.6", "8.9", "12.0")
    assert sidecar.gpu_name == "" and sidecar.precision == "fp16" and sidecar.profiles == profile
    assert sidecar.onnx_sha256 == {onnx_file.name: sha256_file(onnx_file)}
    assert sidecar.sources == {"autoencoder": sha256_file(seed3_dir / "ae_model.ckpt")}
    assert sidecar.engine_sha256 == sha256_file(engine)
    assert sidecar.builder == {"opt_level": 3, "workspace_gib": None, "tf32": False, "typing": "strong"}
    assert json.loads(sidecar_path(engine).read_text())["flavor"] == "tensorrt-rtx"

    # nothing changed: nothing rebuilt, the files untouched
    stamps = [engine.stat().st_mtime_ns, sidecar_path(engine).stat().st_mtime_ns]
    assert not build_engine(onnx_file, engine, profile, RTX, timing_cache_path=tmp_path / "timing.cache")
    assert [engine.stat().st_mtime_ns, sidecar_path(engine).stat().st_mtime_ns] == stamps

    # other targets, or an engine file its sidecar does not describe: rebuilt
    assert build_engine(onnx_file, engine, profile, BuildOptions(compute_capabilities=("8.9",)))
    assert read_sidecar(engine).compute_capabilities == ("8.9",)
    engine.write_bytes(engine.read_bytes()[:-1] + b"\0")
    assert build_engine(onnx_file, engine, profile, BuildOptions(compute_capabilities=("8.9",)))
    assert read_sidecar(engine).engine_sha256 == sha256_file(engine)


def test_changed_model_rebuilds(seed3_onnx: Path, seed4_decoder: tuple[Path, Path], tmp_path: Path) -> None:
    engine = engine_file(tmp_path, "decoder", "fp16")
    profile = graph_profile("decoder", SMALL)
    assert build_engine(onnx_path(seed3_onnx, "decoder", "fp16"), engine, profile, RTX)
    models, other = seed4_decoder
    assert build_engine(other, engine, profile, RTX)
    assert read_sidecar(engine).sources == {"autoencoder": sha256_file(models / "ae_model.ckpt")}


def test_the_builder_config_has_tf32_off_and_the_rtx_targets(seed3_onnx: Path) -> None:
    pg = _polygraphy("tensorrt-rtx")
    profile = graph_profile("text_encoder", SMALL)
    network = parse_network(pg, onnx_path(seed3_onnx, "text_encoder", "fp16"), profile, require_flavor("tensorrt-rtx"))
    config = configure(pg, network, profile, RTX.validate(), None)
    assert not config.get_flag(pg.trt.BuilderFlag.TF32)
    targets = [config.get_compute_capability(i).name for i in range(config.num_compute_capabilities)]
    assert targets == ["SM86", "SM89", "SM120"]
    with pytest.raises(UserError, match=r"cannot build for compute capability 9\.0"):
        configure(pg, network, profile, BuildOptions(compute_capabilities=("9.0",)), None)


def test_a_graph_tensorrt_cannot_parse_is_one_line(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Frobnicate", ["latents"], ["images"])], "decoder",
        [helper.make_tensor_value_info("latents", TensorProto.FLOAT, ["batch", 4, "height", "width"])],
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, "h8", "w8"])])
    bad = tmp_path / "decoder.onnx"
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    helper.set_model_props(model, {"ccld_trt.source_sha256": json.dumps({"autoencoder": "12" * 32})})
    onnx.save(model, bad)
    with pytest.raises(UserError) as e:
        build_engine(bad, tmp_path / "decoder.engine", graph_profile("decoder", SMALL), RTX)
    message = str(e.value)
    assert message.startswith(f"TensorRT cannot parse {bad}: ") and "Frobnicate" in message and "\n" not in message
    assert not (tmp_path / "decoder.engine").exists()


@pytest.fixture(scope="module")
def seed3_engines(seed3_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """(engine directory, progress lines) of the seed-3 engines (the plain per-row unet too), built once for the
    module."""
    lines: list[str] = []
    engines = tmp_path_factory.mktemp("engines")
    build_engines({g: onnx_path(seed3_onnx, g, "fp16") for g in ENGINE_GRAPHS}, engines, SMALL, RTX,
                  progress=lines.append)
    return engines, lines


def test_build_engines_makes_the_four_and_reports_each(seed3_onnx: Path, seed3_engines: tuple[Path, list[str]]) -> None:
    engines, lines = seed3_engines
    paths = [engines / f"{g}.fp16.engine" for g in ENGINE_GRAPHS]
    assert ENGINE_GRAPHS[-1] == "unet" and read_sidecar(paths[-1]).profiles == graph_profile("unet", SMALL)
    assert all(read_sidecar(p).flavor == "tensorrt-rtx" for p in paths)
    assert [line.split(":")[0] for line in lines] == [f"engine {p.name}" for p in paths]
    assert all(" built in " in line and line.endswith(" s") for line in lines)
    again: list[str] = []
    sources = {g: onnx_path(seed3_onnx, g, "fp16") for g in ENGINE_GRAPHS}
    assert build_engines(sources, engines, SMALL, RTX, progress=again.append) == paths
    assert again == [f"engine {p.name}: up to date" for p in paths]


def test_engines_of_other_model_files_are_refused(seed3_engines: tuple[Path, list[str]], seed3_dir: Path,
                                                  seed4_decoder: tuple[Path, Path], tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from ccld_trt.backends import tensorrt_backend
    from ccld_trt.backends.tensorrt_backend import TensorRTBackend

    engines = seed3_engines[0]
    monkeypatch.setattr(tensorrt_backend, "gpu_identity", lambda device: ("NVIDIA GeForce RTX 4090", "8.9"))
    other = tmp_path / "other"
    shutil.copytree(seed3_dir, other)
    shutil.copy(seed4_decoder[0] / "ae_model.ckpt", other / "ae_model.ckpt")
    with pytest.raises(UserError) as e:
        TensorRTBackend(engines, models=ModelFiles.resolve(other))
    message = str(e.value)
    assert "built from another autoencoder checkpoint" in message and "\n" not in message
    assert message.endswith(f"rebuild them: ccld-trt engines build --models {other} --output {engines}")

    monkeypatch.setattr(tensorrt_backend, "gpu_identity", lambda device: ("NVIDIA H100", "9.0"))
    with pytest.raises(UserError, match=r"built for \(compute 8.6, 8.9, 12.0\), this is \(compute 9.0\)"):
        TensorRTBackend(engines, models=ModelFiles.resolve(seed3_dir))
    with pytest.raises(UserError, match="TensorRT is not installed"):  # asked for, and regular TensorRT is not here
        TensorRTBackend(engines, flavor="tensorrt", models=ModelFiles.resolve(seed3_dir))
    with pytest.raises(UserError, match="runs fp32 or fp16 engines, not 'bf16'"):
        TensorRTBackend(engines, precision="bf16")


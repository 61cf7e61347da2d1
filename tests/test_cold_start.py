"""Time to first image (issue 30): a backend reads only what it runs, weights come through mapped safetensors
copies tied to their sources by SHA-256, and nothing of this changes a single bit of the images or lets a stale
artefact be used."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from ccld_trt.export.cloob import cloob_param_shapes
from ccld_trt.export.cloob_pickle import haiku_to_torch, read_cloob_params
from ccld_trt.export.graph_specs import BACKEND_GRAPHS
from ccld_trt.export.models import ModelFiles, load_networks
from ccld_trt.export.weights_cache import WEIGHTS_DIR, copy_path, source_sha256
from ccld_trt.runner import BackendOptions, ModelSource, open_session
from test_quiet_imports import QUIETING

HAS_OPENVINO = importlib.util.find_spec("openvino") is not None
GRAPH_BACKENDS = ["onnxruntime", *(["openvino"] if HAS_OPENVINO else [])]


def _copy_models(source: Path, target: Path) -> Path:
    target.mkdir()
    for path in source.iterdir():
        if path.is_file():
            shutil.copy2(path, target / path.name)
    return target


@pytest.fixture(scope="module")
def build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("build")


@pytest.fixture(scope="module")
def models(seed3_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private copy of the seed-3 models (tests below rewrite a checkpoint)."""
    return _copy_models(seed3_dir, tmp_path_factory.mktemp("cold") / "models")


def _open(backend: str, models: Path, build: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("CCLD_TRT_BUILD", str(build))
    precision = "fp32"
    return open_session(BackendOptions(backend=backend, precision=precision), ModelSource(ModelFiles.resolve(models)))


def _tripwire(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("a torch network was read although the exported graphs are current")


def _image(session: Any, seed: int = 5) -> torch.Tensor:
    from ccld_trt.jobs import assemble, run

    job = assemble(["a lighthouse:3"], image_size=session.image_size, autoencoder_scale=2.55, seed=seed,
                   steps=3, method="unipc")
    return run(session.backend, job).latents


@pytest.mark.parametrize("backend", GRAPH_BACKENDS)
def test_graph_backend_reads_no_network_when_current(backend: str, models: Path, build: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    first = _open(backend, models, build, monkeypatch)  # exports if needed (reads the networks)
    latents = _image(first)
    # current graphs: opening again reads no torch network at all
    monkeypatch.setattr("ccld_trt.runner.load_networks", _tripwire)
    monkeypatch.setattr("ccld_trt.export.onnx_export.load_networks", _tripwire)
    monkeypatch.setattr("ccld_trt.export.models.load_networks", _tripwire)
    again = _open(backend, models, build, monkeypatch)
    assert torch.equal(_image(again), latents)  # the same image, bit for bit
    # the U-Net checkpoint's stored scale is read when asked, and is the checkpoint's
    state = torch.load(models / "model_student.ckpt", weights_only=True)
    assert again.checkpoint_autoencoder_scale == float(state["autoencoder_scale"])


@pytest.mark.parametrize("backend", GRAPH_BACKENDS)
def test_on_demand_graphs_open_on_first_use_with_the_same_result(backend: str, models: Path, build: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A text-only request opens neither the CLOOB image encoder nor the autoencoder's encoder; an image prompt
    opens the image encoder then, with the embedding it gives when everything is opened at start-up."""
    from ccld_trt.export.graph_specs import ON_DEMAND_GRAPHS

    lazy = _open(backend, models, build, monkeypatch).backend
    opened = lazy.sessions if backend == "onnxruntime" else lazy.compiled
    assert not set(ON_DEMAND_GRAPHS) & set(opened)
    _image(_open(backend, models, build, monkeypatch))
    pixels = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    eager = _open(backend, models, build, monkeypatch).backend
    eager.open_all()
    assert set(ON_DEMAND_GRAPHS) <= set(eager.sessions if backend == "onnxruntime" else eager.compiled)
    assert torch.equal(lazy.encode_image(pixels), eager.encode_image(pixels))
    assert "image_encoder" in opened


@pytest.mark.parametrize("backend", GRAPH_BACKENDS)
def test_first_open_exports_only_what_a_text_prompt_runs(backend: str, models: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A first run exports the graphs its request runs, not the CLOOB image encoder nor the autoencoder's encoder
    (a fifth to a third of a first run's export on the full-size models); an image prompt later exports the image
    encoder then, reading the networks once more, and gets the torch backend's embedding."""
    from ccld_trt.export.graph_specs import EAGER_GRAPHS, ON_DEMAND_GRAPHS
    from ccld_trt.export.onnx_files import onnx_path

    build = tmp_path / "build"
    lazy = _open(backend, models, build, monkeypatch)
    onnx_dir = lazy.backend.onnx_dir
    assert all(onnx_path(onnx_dir, graph, "fp32").is_file() for graph in EAGER_GRAPHS)
    assert not any(onnx_path(onnx_dir, graph, "fp32").exists() for graph in ON_DEMAND_GRAPHS)
    pixels = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    embed = lazy.backend.encode_image(pixels)
    assert onnx_path(onnx_dir, "image_encoder", "fp32").is_file()
    assert not onnx_path(onnx_dir, "encoder", "fp32").exists()
    reference = _open("torch", models, build, monkeypatch).backend.encode_image(pixels)
    torch.testing.assert_close(embed, reference, rtol=1e-4, atol=1e-5)
    # a server's start exports every graph, so no request waits for an export
    open_session(BackendOptions(backend=backend, precision="fp32"), ModelSource(ModelFiles.resolve(models)),
                 graphs=BACKEND_GRAPHS)
    assert onnx_path(onnx_dir, "encoder", "fp32").is_file()


@pytest.mark.skipif(not HAS_OPENVINO, reason="needs openvino")
def test_openvino_says_which_graphs_it_compiles_anew(models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """A first run's compiles (seconds each on a small CPU, after the export) are said, one line per graph; a
    start that loads them from OpenVINO's cache says nothing."""
    import re

    _open("openvino", models, tmp_path / "build", monkeypatch)
    said = re.findall(r"^openvino: compiling (\S+) for this CPU", capsys.readouterr().err, re.MULTILINE)
    assert sorted(said) == ["decoder.onnx", "text_encoder.onnx", "unet_cfg.onnx"]
    _open("openvino", models, tmp_path / "build", monkeypatch)
    assert "openvino: compiling" not in capsys.readouterr().err


def test_a_stale_on_demand_graph_is_exported_again_when_first_run(seed3_dir: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """After the autoencoder checkpoint changes, opening exports its decoder again at once and its encoder (which
    only image-to-image runs) when first run, saying so, with the new weights' result."""
    models = _copy_models(seed3_dir, tmp_path / "models")
    build = tmp_path / "build"
    monkeypatch.setenv("CCLD_TRT_BUILD", str(build))
    open_session(BackendOptions(backend="onnxruntime", precision="fp32"), ModelSource(ModelFiles.resolve(models)),
                 graphs=BACKEND_GRAPHS)  # every graph current
    checkpoint = torch.load(models / "ae_model.ckpt", weights_only=True)
    for name, tensor in checkpoint["state_dict"].items():
        if name.endswith("weight") and tensor.dim() == 4:
            checkpoint["state_dict"][name] = tensor * 1.25  # a changed autoencoder: both of its halves
    torch.save(checkpoint, models / "ae_model.ckpt")
    capsys.readouterr()
    lazy = _open("onnxruntime", models, build, monkeypatch)
    err = capsys.readouterr().err
    assert "onnx: exporting decoder.onnx: its autoencoder checkpoint changed" in err, err
    assert "encoder.onnx" not in err.replace("decoder.onnx", "")
    images = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    latents = lazy.backend.encode_latents(images)
    assert "onnx: exporting encoder.onnx: its autoencoder checkpoint changed" in capsys.readouterr().err
    reference = _open("torch", models, build, monkeypatch).backend.encode_latents(images)
    torch.testing.assert_close(latents, reference, rtol=1e-4, atol=1e-5)


def test_a_job_names_the_graphs_it_runs(models: Path) -> None:
    """``sample`` exports, before its image, what its job runs: the image encoder with image prompts, the
    autoencoder's encoder with an init image, neither for text alone."""
    from PIL import Image

    from ccld_trt.export.graph_specs import EAGER_GRAPHS
    from ccld_trt.jobs import assemble, graphs_run

    image = Image.new("RGB", (64, 64), (200, 30, 30))
    text = assemble(["a lighthouse"], image_size=64)
    both = assemble(["a lighthouse"], [image], image_size=64, init=image, strength=0.5)
    assert graphs_run(text) == EAGER_GRAPHS
    assert sorted(graphs_run(both)) == sorted([*EAGER_GRAPHS, "image_encoder", "encoder"])


def test_onnxruntime_saved_optimised_graph_gives_the_same_image(models: Path, build: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The first CPU session saves the graph as ONNX Runtime optimised it; the next opens that copy without
    optimising again, bit-identical, and a rewritten graph never opens an old copy."""
    from ccld_trt.backends.onnxruntime_sessions import OPTIMIZED_DIR, OPTIMIZED_NAME

    session = _open("onnxruntime", models, build, monkeypatch)
    onnx_dir = session.backend.onnx_dir
    shutil.rmtree(onnx_dir / OPTIMIZED_DIR, ignore_errors=True)
    fresh = _image(_open("onnxruntime", models, build, monkeypatch))  # optimises, saves the copies
    copies = sorted((onnx_dir / OPTIMIZED_DIR).iterdir())
    saved = [p.name for p in copies]
    assert len(saved) == 3 and all(name.split("-")[0].endswith(".onnx") for name in saved)
    for folder in copies:  # the weights beside the graph, for ONNX Runtime to map rather than parse
        graph, weights = folder / OPTIMIZED_NAME, folder / f"{OPTIMIZED_NAME}.data"
        assert weights.stat().st_size > 10 * graph.stat().st_size, folder
    assert torch.equal(_image(_open("onnxruntime", models, build, monkeypatch)), fresh)
    decoder = onnx_dir / "decoder.onnx"
    os.utime(decoder, ns=(decoder.stat().st_atime_ns, decoder.stat().st_mtime_ns + 10**9))  # "rewritten"
    _open("onnxruntime", models, build, monkeypatch)
    after = sorted(p.name for p in (onnx_dir / OPTIMIZED_DIR).iterdir())
    assert len(after) == 3 and [n for n in after if n.startswith("decoder")] != \
        [n for n in saved if n.startswith("decoder")]


def test_changed_checkpoint_is_exported_again_and_says_so(seed3_dir: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    models = _copy_models(seed3_dir, tmp_path / "models")
    build = tmp_path / "build"
    before = _image(_open("onnxruntime", models, build, monkeypatch))
    capsys.readouterr()
    state = torch.load(models / "model_student.ckpt", weights_only=True)
    state["autoencoder_scale"] = state["autoencoder_scale"] * 2  # a changed U-Net checkpoint
    first_key = next(k for k in state if k.endswith("weight") and state[k].dim() == 4)
    state[first_key] = state[first_key] * 1.5
    torch.save(state, models / "model_student.ckpt")
    after = _open("onnxruntime", models, build, monkeypatch)
    err = capsys.readouterr().err
    assert "onnx: exporting unet_cfg.onnx: its unet checkpoint changed" in err, err
    assert "decoder.onnx" not in err  # only the graphs of the changed checkpoint
    assert not torch.equal(_image(after), before)
    assert after.checkpoint_autoencoder_scale == float(state["autoencoder_scale"])


def test_converted_copy_is_used_while_it_matches_and_never_when_the_source_changed(
        seed3_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    models = _copy_models(seed3_dir, tmp_path / "models")
    build = tmp_path / "build"
    monkeypatch.setenv("CCLD_TRT_BUILD", str(build))
    files = ModelFiles.resolve(models)
    reference = load_networks(files)  # converts: copies written under <build>/weights
    # the networks hold exactly the tensors of the files as read without any cache
    state = torch.load(models / "model_student.ckpt", weights_only=True)
    assert all(torch.equal(v, state[k]) for k, v in reference.unet.state_dict().items())
    image_params, text_params = read_cloob_params(files.cloob, cloob_param_shapes(reference.cloob_config))
    image_state, text_state = haiku_to_torch(image_params, text_params)
    assert all(torch.equal(v, text_state[k]) for k, v in reference.text_encoder.state_dict().items())
    copies = sorted(p.name for p in (build / WEIGHTS_DIR).glob("*.safetensors"))
    assert [c.split("-")[0] for c in copies] == ["ae_model.ckpt", "cloob.pkl", "model_student.ckpt"]
    # while the copies match, the pickles are not read at all
    monkeypatch.setattr("ccld_trt.export.checkpoints.torch.load", _tripwire)
    monkeypatch.setattr("ccld_trt.export.cloob.read_cloob_params", _tripwire)
    mapped = load_networks(files)
    for name in ("unet", "decoder", "encoder", "text_encoder", "image_encoder"):
        a, b = getattr(reference, name).state_dict(), getattr(mapped, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    assert torch.equal(reference.image_encoder.mean, mapped.image_encoder.mean)
    assert all(torch.equal(v, image_state[k]) for k, v in mapped.image_encoder.state_dict().items())
    monkeypatch.undo()
    monkeypatch.setenv("CCLD_TRT_BUILD", str(build))
    # a changed source: its old copy is never used, a new one is made from the new bytes
    state = torch.load(models / "model_student.ckpt", weights_only=True)
    state["autoencoder_scale"] = torch.tensor(7.0)
    torch.save(state, models / "model_student.ckpt")
    old_copy = copy_path(models / "model_student.ckpt", "0" * 64)  # the name shape; the digest differs
    assert old_copy.parent == build / WEIGHTS_DIR
    capsys.readouterr()
    changed = load_networks(ModelFiles.resolve(models))
    assert float(changed.unet.autoencoder_scale) == 7.0
    err = capsys.readouterr().err
    assert "model_student.ckpt changed since it was last converted" in err and "ae_model" not in err, err
    digest = source_sha256(models / "model_student.ckpt")
    assert copy_path(models / "model_student.ckpt", digest).is_file()


def test_a_copy_that_cannot_be_written_leaves_nothing_and_the_run_goes_on(
        seed3_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk while a converted copy is written: the networks still load (from the pickles), no half copy
    or temporary file is left to be mistaken for one, and the next load converts again."""
    import safetensors.torch
    from safetensors import SafetensorError

    models = _copy_models(seed3_dir, tmp_path / "models")
    build = tmp_path / "build"
    monkeypatch.setenv("CCLD_TRT_BUILD", str(build))
    files = ModelFiles.resolve(models)

    def disk_full(tensors: Any, filename: Any, metadata: Any = None) -> None:
        Path(filename).write_bytes(safetensors.torch.save(tensors, metadata)[:1000])
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    with monkeypatch.context() as patch:
        patch.setattr(safetensors.torch, "save_file", disk_full)
        networks = load_networks(files)
    state = torch.load(models / "model_student.ckpt", weights_only=True)
    assert all(torch.equal(v, state[k]) for k, v in networks.unet.state_dict().items())
    assert not [p.name for p in (build / WEIGHTS_DIR).iterdir() if p.name.endswith((".safetensors", ".tmp"))]
    load_networks(files)
    copies = sorted(p.name.split("-")[0] for p in (build / WEIGHTS_DIR).glob("*.safetensors"))
    assert copies == ["ae_model.ckpt", "cloob.pkl", "model_student.ckpt"]


def test_stale_copy_with_the_current_name_is_not_used(seed3_dir: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A copy recording another source digest (say, a copy left from other bytes) is converted again."""
    from safetensors.torch import save_file

    models = _copy_models(seed3_dir, tmp_path / "models")
    monkeypatch.setenv("CCLD_TRT_BUILD", str(tmp_path / "build"))
    source = models / "model_student.ckpt"
    digest = source_sha256(source)
    state = torch.load(source, weights_only=True)
    lie = {k: torch.zeros_like(v).contiguous() for k, v in state.items()}
    copy_path(source, digest).parent.mkdir(parents=True, exist_ok=True)
    save_file(lie, copy_path(source, digest), metadata={"source": source.name, "source_sha256": "f" * 64})
    from ccld_trt.export.unet import load_unet

    unet, scale = load_unet(source)
    assert scale == float(state["autoencoder_scale"]) != 0.0
    assert all(torch.equal(v, state[k]) for k, v in unet.state_dict().items())


def test_beside_copy_of_a_changed_pickle_is_not_preferred(seed3_dir: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """``ccld-trt convert``'s copy beside the models is preferred only while it records the pickle's digest."""
    from ccld_trt.export.checkpoints import convert_to_safetensors

    models = _copy_models(seed3_dir, tmp_path / "models")
    monkeypatch.setenv("CCLD_TRT_BUILD", str(tmp_path / "build"))
    convert_to_safetensors(models / "model_student.ckpt", "U-Net checkpoint")
    assert ModelFiles.resolve(models).unet.name == "model_student.safetensors"
    state = torch.load(models / "model_student.ckpt", weights_only=True)
    state["autoencoder_scale"] = torch.tensor(3.0)
    torch.save(state, models / "model_student.ckpt")
    assert ModelFiles.resolve(models).unet.name == "model_student.ckpt"
    (models / "model_student.ckpt").unlink()  # the copy alone is still the model
    assert ModelFiles.resolve(models).unet.name == "model_student.safetensors"


HEAVY = ("gradio", "ray", "matplotlib", "onnx", "onnxslim", "onnxconverter_common", "nncf", "fastapi",
         "ccld_trt.export.onnx_export", "ccld_trt.serve", "ccld_trt.cluster", "ccld_trt.benchmarks",
         "torch._dynamo", "ftfy",  # ftfy: not for a plain ASCII prompt (tokenizer._fix_text)
         "openvino_telemetry")  # OpenVINO's usage telemetry (export.quiet_imports)
_PROBE = """
import atexit, json, sys
atexit.register(lambda: print("MODULES " + json.dumps(sorted(k for k, m in sys.modules.items() if m is not None)),
                              file=sys.stderr))
from ccld_trt.cli import run
sys.exit(run(sys.argv[1:]))
"""


@pytest.mark.parametrize("backend", GRAPH_BACKENDS)
def test_sample_imports_only_what_it_uses(backend: str, models: Path, build: Path, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    _open(backend, models, build, monkeypatch)  # the graphs are current: the run below only samples
    home = tmp_path / "home"  # where OpenVINO's and ONNX Runtime's telemetry would write their IDs
    home.mkdir()
    env = {**{k: v for k, v in os.environ.items() if k not in QUIETING}, "CCLD_TRT_BUILD": str(build),
           "HOME": str(home)}
    argv = ["sample", "a lighthouse", "--fast", "--backend", backend, "--precision", "fp32", "--models",
            str(models), "--output-dir", str(tmp_path / "out")]
    done = subprocess.run([sys.executable, "-c", _PROBE, *argv], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    line = next(line for line in done.stderr.splitlines() if line.startswith("MODULES "))
    modules = set(json.loads(line[len("MODULES "):]))
    imported = sorted(m for m in modules if any(m == h or m.startswith(h + ".") for h in HEAVY))
    assert not imported, imported
    assert not any(home.iterdir())
    assert (tmp_path / "out" / "out_00000.png").is_file()
    assert "onnx: exporting" not in done.stderr


def test_import_ccld_trt_is_cheap() -> None:
    done = subprocess.run([sys.executable, "-c", "import sys, ccld_trt; print(sorted(sys.modules))"],
                          capture_output=True, text=True, timeout=120)
    modules = set(eval(done.stdout))  # a printed list of str
    assert not {"torch", "numpy", "onnx", "openvino", "onnxruntime"} & modules


def test_serve_page_code_imports_no_torch() -> None:
    """``ccld-trt serve`` builds and opens its page before torch is imported (~1.3 s): the model loader and the
    first job import it, after the page answers."""
    probe = ("import sys, ccld_trt.cli, ccld_trt.serve, ccld_trt.runner; "
             "print(sorted({'torch', 'ccld_trt.jobs', 'ccld_trt.pipeline'} & set(sys.modules)))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


def test_serve_builds_its_page_before_torch_is_imported(seed3_dir: Path) -> None:
    """The whole of ``ccld-trt serve`` up to building the page (its checks of the flags and the model files, the
    demo-weights check included) imports no torch: ~1 s sooner to the page. The page (Gradio's import) is built
    with the collector held (collector.start_up: 0.4 s of collections in Gradio's import)."""
    probe = ("import gc, sys\n"
             "import ccld_trt.serve as serve\n"
             "def build_app(*args, **kwargs):\n"
             "    print(sorted({'torch', 'ccld_trt.jobs', 'ccld_trt.pipeline'} & set(sys.modules)), flush=True)\n"
             "    print('collecting', gc.isenabled(), flush=True)\n"
             "    raise SystemExit(0)\n"
             "serve.build_app = build_app\n"
             "from ccld_trt.cli import run\n"
             "run(sys.argv[1:])\n")
    for backend in ("torch", "openvino"):
        done = subprocess.run([sys.executable, "-c", probe, "serve", "--backend", backend, "--models", str(seed3_dir),
                               "--port", "8765"], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        assert done.stdout.splitlines() == ["[]", "collecting False"], backend


def test_a_bad_flag_is_answered_before_torch_is_imported() -> None:
    """The parser (every command's, the bench's included) is built from names only: ``--help`` and a mistyped flag
    get their answer in a fraction of a second, not after torch's ~1 s import."""
    probe = _PROBE.replace("MODULES ", "MODULES-AT-EXIT ")
    done = subprocess.run([sys.executable, "-c", probe, "sample", "a lighthouse", "--no-such-flag"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "unrecognized arguments: --no-such-flag" in done.stderr
    line = next(line for line in done.stderr.splitlines() if line.startswith("MODULES-AT-EXIT "))
    assert not {"torch", "numpy", "onnxruntime", "openvino"} & set(json.loads(line.split(" ", 1)[1]))


def test_loading_the_networks_imports_no_dynamo(seed3_dir: Path, tmp_path: Path) -> None:
    """The networks are built on the meta device and take the checkpoints' tensors without drawing random values
    first: torch's normal_ on meta imports torch._dynamo, ~1 s of every start of the torch backend."""
    probe = ("import sys; from pathlib import Path; from ccld_trt.export.models import ModelFiles, load_networks; "
             "nets = load_networks(ModelFiles.resolve(Path(sys.argv[1]))); "
             "print(nets.text_encoder.embed.weight.is_meta, 'torch._dynamo' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", probe, str(seed3_dir)], capture_output=True, text=True,
                          env={**os.environ, "CCLD_TRT_BUILD": str(tmp_path / "build")}, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["False", "False"]

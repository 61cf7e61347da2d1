"""``sample`` opens a graph backend's graphs in a thread while it imports torch (runner.prefetch_graphs, issue 30):
the thread itself imports no torch, what it opened is used only while it is what the backend would open now, and
the images are the same bit for bit."""

from __future__ import annotations

import importlib.util
import locale
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from ccld_trt.backends.base import take_opened
from ccld_trt.download import convert_checkpoints
from ccld_trt.export.graph_specs import BACKEND_GRAPHS, ON_DEMAND_GRAPHS
from ccld_trt.export.models import ModelFiles
from ccld_trt.export.onnx_files import default_onnx_dir
from ccld_trt.runner import BackendOptions, ModelSource, open_session, prefetch_graphs

HAS_OPENVINO = importlib.util.find_spec("openvino") is not None
GRAPH_BACKENDS = ["onnxruntime", *(["openvino"] if HAS_OPENVINO else [])]
EAGER = sorted(set(BACKEND_GRAPHS) - set(ON_DEMAND_GRAPHS))
# where each backend opens a graph when nothing was prefetched (patched in the tests to count the calls)
OPENERS = {"onnxruntime": "ccld_trt.backends.onnxruntime_backend.open_cpu_session",
           "openvino": "ccld_trt.backends.openvino_backend.compile_graph"}


@pytest.fixture(scope="module")
def models(seed3_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The seed-3 models with converted safetensors copies beside the pickles (as ``ccld-trt download`` leaves
    them), so that choosing the files involves the copies' digests too."""
    target = tmp_path_factory.mktemp("prefetch") / "models"
    shutil.copytree(seed3_dir, target)
    convert_checkpoints(target)
    return target


@pytest.fixture(scope="module")
def build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("build")


def _options(backend: str) -> BackendOptions:
    return BackendOptions(backend=backend, precision="fp32")


def _image(session: Any) -> torch.Tensor:
    from ccld_trt.jobs import assemble, run

    job = assemble(["a lighthouse:3"], image_size=session.image_size, autoencoder_scale=2.55, seed=5, steps=3,
                   method="unipc")
    return run(session.backend, job).latents


def _counting(monkeypatch: pytest.MonkeyPatch, backend: str) -> list[str]:
    """Patch the backend's own opener to record the graph file of each call (and still open it)."""
    module, name = OPENERS[backend].rsplit(".", 1)
    real = getattr(sys.modules[module], name)
    calls: list[str] = []

    def opener(*args: Any) -> Any:
        calls.append(Path(args[1] if backend == "openvino" else args[0]).name)
        return real(*args)

    monkeypatch.setattr(OPENERS[backend], opener)
    return calls


@pytest.mark.parametrize("backend", GRAPH_BACKENDS)
def test_prefetched_graphs_are_used_and_give_the_same_image(backend: str, models: Path, build: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CCLD_TRT_BUILD", str(build))
    source = ModelSource(ModelFiles.resolve(models))
    # nothing built yet: the thread opens nothing (or fails), and the backend exports and opens everything itself
    first = open_session(_options(backend), source, prefetch_graphs(_options(backend), source))
    reference = _image(open_session(_options(backend), source))  # opened without any prefetching
    assert torch.equal(_image(first), reference)
    prefetched = prefetch_graphs(_options(backend), source)
    assert prefetched is not None and sorted(prefetched.result()) == EAGER
    calls = _counting(monkeypatch, backend)
    session = open_session(_options(backend), source, prefetched)
    assert calls == []  # every graph the backend opened came from the thread
    assert torch.equal(_image(session), reference)


@pytest.mark.parametrize("backend", GRAPH_BACKENDS)
def test_a_graph_changed_after_it_was_prefetched_is_opened_again(backend: str, models: Path, build: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CCLD_TRT_BUILD", str(build))
    source = ModelSource(ModelFiles.resolve(models))
    reference = _image(open_session(_options(backend), source))  # also builds what the thread opens
    prefetched = prefetch_graphs(_options(backend), source)
    assert prefetched is not None and sorted(prefetched.result()) == EAGER
    decoder = default_onnx_dir(source.files) / "decoder.onnx"
    stat = decoder.stat()
    os.utime(decoder, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # a new version, to the backend
    calls = _counting(monkeypatch, backend)
    session = open_session(_options(backend), source, prefetched)
    assert calls == ["decoder.onnx"]  # only the changed file is opened again, by the backend itself
    assert prefetched.result() == {}  # and the old one is let go, not held to the end of the process
    assert torch.equal(_image(session), reference)


def test_take_opened_gives_a_handle_only_for_the_same_key() -> None:
    opened: dict[str, tuple[Any, Any]] = {"unet_cfg": ("v1", "handle")}
    assert take_opened(opened, "decoder", "v1") is None
    assert take_opened(dict(opened), "unet_cfg", "v2") is None
    assert take_opened(opened, "unet_cfg", "v1") == "handle" and opened == {}


@pytest.mark.parametrize("options", [BackendOptions("torch"), BackendOptions("onnxruntime", device="cuda"),
                                     BackendOptions("openvino", precision="int8"),
                                     BackendOptions("tensorrt", device="cuda")])
def test_nothing_is_prefetched_where_nothing_can_be_gained(options: BackendOptions, models: Path) -> None:
    assert prefetch_graphs(options, ModelSource(ModelFiles.resolve(models))) is None


_PROBE = """
import sys
from pathlib import Path
from ccld_trt.export.models import ModelFiles
from ccld_trt.runner import BackendOptions, ModelSource, prefetch_graphs
files = ModelFiles.resolve(Path(sys.argv[1]))
opened = prefetch_graphs(BackendOptions(sys.argv[2], precision="fp32"), ModelSource(files)).result()
print(files.unet.suffix, sorted(opened), "torch" in sys.modules)
"""


@pytest.mark.parametrize("backend", GRAPH_BACKENDS)
def test_choosing_and_opening_the_graphs_imports_no_torch(backend: str, models: Path, build: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Choosing the model files (their converted copies' digests included) and opening the graphs needs no torch,
    so the thread does not wait for the main thread's import of it: the two run on both cores at once."""
    monkeypatch.setenv("CCLD_TRT_BUILD", str(build))
    open_session(_options(backend), ModelSource(ModelFiles.resolve(models)))  # built (and current)
    done = subprocess.run([sys.executable, "-c", _PROBE, str(models), backend], capture_output=True, text=True,
                          env={**os.environ, "CCLD_TRT_BUILD": str(build)}, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == f".safetensors {EAGER} False"


_FIRST_IMPORTS = """
import sys
import threading
from pathlib import Path

first = {}  # module -> the thread that imported it first


class Watch:
    @staticmethod
    def find_spec(name, path=None, target=None):
        first.setdefault(name, threading.current_thread().name)


sys.meta_path.insert(0, Watch)
from ccld_trt.export.models import ModelFiles
from ccld_trt.runner import BackendOptions, ModelSource, prefetch_graphs

prefetch_graphs(BackendOptions(sys.argv[2], precision="fp32"), ModelSource(ModelFiles.resolve(Path(sys.argv[1])))
                ).exception()  # nothing was built: what matters is what the thread imported on its way
print(first["numpy"], first[sys.argv[2]])
"""


@pytest.mark.parametrize("backend", GRAPH_BACKENDS)
def test_numpy_is_imported_before_the_thread_starts(backend: str, seed3_dir: Path, tmp_path: Path) -> None:
    """The thread's library and the main thread's torch both import numpy; two threads importing it at once can
    meet its circular imports half done (ImportError: partially initialized module, seen in a first run), so the
    main thread imports it before it starts the thread. Models without converted copies: resolving those imports
    numpy by itself."""
    done = subprocess.run([sys.executable, "-c", _FIRST_IMPORTS, str(seed3_dir), backend], capture_output=True,
                          text=True, env={**os.environ, "CCLD_TRT_BUILD": str(tmp_path)}, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["MainThread", "ccld-trt-prefetch_0"]


@pytest.mark.parametrize("backend", GRAPH_BACKENDS)
def test_opening_the_graphs_leaves_the_process_locale_as_it_was(backend: str, models: Path, build: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """OpenVINO's compile switches the process's locale and back: two compiles at once (the thread once opened the
    graphs a thread each) left "C" behind, and Python's text files defaulted to ASCII for the rest of the process
    (a report with a dash then failed to write)."""
    monkeypatch.setenv("CCLD_TRT_BUILD", str(build))
    source = ModelSource(ModelFiles.resolve(models))
    open_session(_options(backend), source)  # built (and current): the thread opens every graph
    before = locale.setlocale(locale.LC_ALL)
    for _ in range(3):  # the interleaving that leaves "C" is not certain in one go
        prefetched = prefetch_graphs(_options(backend), source)
        assert prefetched is not None and sorted(prefetched.result()) == EAGER
        assert locale.setlocale(locale.LC_ALL) == before

"""A text job on a graph backend runs without torch (graph_sample, issue 30): the sampler's recorded arithmetic,
the replicated noise and the whole ``sample`` process give the torch path's results bit for bit, a tape is data,
and whatever the path does not cover, or an earlier run has not recorded, or a changed model file, runs with
torch as before."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ccld_trt import graph_sample
from ccld_trt.cpu_features import cpu_flags
from ccld_trt.jobs import Job, assemble
from ccld_trt.randn import randn
from ccld_trt.request import Request
from ccld_trt.runner import BackendOptions
from ccld_trt.sampler_names import METHODS, needs_step_noise
from ccld_trt.sampler_tape import from_json, record, replay, to_json
from ccld_trt.samplers import sample
from ccld_trt.schedule import method_timesteps

HAS_OPENVINO = importlib.util.find_spec("openvino") is not None
GRAPH_BACKENDS = ["onnxruntime", *(["openvino"] if HAS_OPENVINO else [])]
DETERMINISTIC = [m for m in METHODS if not needs_step_noise(m, 0.0)]
AVX2 = {"avx2", "fma"} <= (cpu_flags() or frozenset())


def _model(x: np.ndarray, t: np.ndarray) -> np.ndarray:
    """A made-up velocity, nonlinear in x and t, computed the same way for both paths."""
    t4 = np.asarray(t, np.float32).reshape(-1, 1, 1, 1)
    return (np.tanh(x * np.float32(1.3)) * np.cos(t4) + x * np.float32(0.25) * t4).astype(np.float32)


@pytest.mark.parametrize("method", DETERMINISTIC)
def test_a_tape_replays_the_sampler_bit_for_bit(method: str) -> None:
    for steps in (1, 2, 3, 7, 15):
        for rows in (1, 3):
            tape = from_json(json.loads(json.dumps(to_json(record(method, steps, rows)))))
            x = torch.randn([rows, 4, 8, 8], generator=torch.Generator().manual_seed(steps))
            expected = sample(lambda a, t: torch.from_numpy(_model(a.numpy(), t.numpy())), x,
                              method_timesteps(method, steps), method)
            got = replay(tape, x.numpy(), _model)
            assert got.dtype == np.float32
            assert np.array_equal(got.view(np.uint32), expected.numpy().view(np.uint32)), (method, steps, rows)
            assert tape.evaluations == Request(prompts=[("a", 3.0)], steps=steps, method=method).evaluations


def test_a_long_replay_holds_few_latents_at_once() -> None:
    """Each node is let go after its last use: prk's 200 steps make 9,200 of them, ~600 MB if all were kept."""
    import tracemalloc

    tape = record("prk", 200, 4)
    x = np.zeros([4, 4, 32, 32], np.float32)
    tracemalloc.start()
    replay(tape, x, _model)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(tape.ops) > 9000 and peak < 100 * x.nbytes, peak


@pytest.mark.parametrize(("method", "eta"), [("ddpm", 0.0), ("ddim", 0.5), ("ddim", 1.0)])
def test_a_tape_takes_the_noise_a_sampler_adds_at_its_steps(method: str, eta: float) -> None:
    """ddpm and ddim with eta > 0 add fresh noise at each step but the last: the tape takes it as inputs, in the
    order the pipeline draws it, and replays the sampler bit for bit."""
    for steps in (1, 2, 5):
        for rows in (1, 3):
            tape = from_json(json.loads(json.dumps(to_json(record(method, steps, rows, eta)))))
            generator = torch.Generator().manual_seed(steps)
            x, *noise = (torch.randn([rows, 4, 8, 8], generator=generator) for _ in range(steps))
            expected = sample(lambda a, t: torch.from_numpy(_model(a.numpy(), t.numpy())), x,
                              method_timesteps(method, steps), method, eta, noise)
            got = replay(tape, x.numpy(), _model, [n.numpy() for n in noise])
            assert tape.noise_draws == steps - 1
            assert np.array_equal(got.view(np.uint32), expected.numpy().view(np.uint32)), (method, steps, rows)
    with pytest.raises(ValueError, match="noise draws"):
        replay(tape, x.numpy(), _model)


@pytest.mark.skipif(not AVX2, reason="randn replicates torch's AVX2 normal kernel; this CPU runs another")
def test_randn_is_torch_randn_bit_for_bit() -> None:
    for seed in (0, 5, 2**31 + 7, 2**32 + 5, 2**63 - 1):
        for size in (16, 17, 31, 100, 4096, 3 * 4 * 32 * 32 + 5):
            expected = torch.randn(size, generator=torch.Generator().manual_seed(seed)).numpy()
            assert np.array_equal(randn(seed, size).view(np.uint32), expected.view(np.uint32)), (seed, size)
    with pytest.raises(ValueError):
        randn(0, 15)


@pytest.mark.parametrize("bad", [
    {"ops": [["system", 0, 0]], "result": 1},                                    # not an operation of a tape
    {"ops": [["add", 0, 2]], "result": 1},                                       # a node not made yet
    {"ops": [["mul", 0, {"shape": [2], "bits": [1]}]], "result": 1},             # bits that do not fill the shape
    {"ops": [["neg", 0]], "result": 5},                                          # a result that is no node
    {"ops": [["add", 0]], "result": 1},                                          # the wrong number of operands
    {"ops": [["add", 0, "__import__('os')"]], "result": 1},                      # neither node nor constant
    [1, 2],
])
def test_a_tape_is_data(bad: object) -> None:
    with pytest.raises(ValueError):
        from_json(bad)


def _job(**fields: object) -> Job:
    return assemble(["a lighthouse"], image_size=16, **fields)  # type: ignore[arg-type]


def test_what_the_path_covers() -> None:
    ov = BackendOptions(backend="openvino", precision="fp32")
    assert graph_sample.covers(ov, _job(method="unipc", steps=7))
    assert graph_sample.covers(BackendOptions(backend="onnxruntime", precision="fp32"), _job(n=2, batch_size=2))
    assert graph_sample.covers(ov, _job(n=5, batch_size=2))  # batches of 2, 2 and 1 rows: two tapes
    assert graph_sample.covers(ov, _job(method="ddpm")) and graph_sample.covers(ov, _job(method="ddim", eta=0.5))
    image_prompt = [(np.zeros([1, 3, 16, 16], np.float32), 3.0)]
    assert graph_sample.covers(ov, Job(Request(prompts=[], image_prompts=[(Path("p.png"), 3.0)]), image_prompt, 2.55))
    parts = _job(n=5, batch_size=2).request.batches()
    assert [(s.start, s.stop) for s in parts] == [(0, 2), (2, 4), (4, 5)]
    for options, job in [
        (BackendOptions(backend="torch", precision="fp32"), _job()),
        (BackendOptions(backend="openvino", precision="int8"), _job()),
        (ov, Job(Request(prompts=[("a", 3.0)], n=5, latent_size=(1, 1), method="ddpm"), [], 2.55)),  # 20 values
        (ov, Job(Request(prompts=[("a", 3.0)], latent_size=(1, 1)), [], 2.55)),  # 4 values: torch draws otherwise
        (ov, Job(Request(prompts=[("a", 3.0)], init=Path("i.png")), [], 2.55, torch.zeros(1, 3, 256, 256))),  # init
    ]:
        assert not graph_sample.covers(options, job), (options, job.request)


def test_a_tape_file_is_used_only_with_todays_key(tmp_path: Path) -> None:
    request = _job(method="dpmpp-2m", steps=4, n=3, batch_size=2).request
    assert graph_sample.load_tapes(request, tmp_path) is None
    if not graph_sample.save_tapes(request, tmp_path):
        pytest.skip("randn does not match this machine's torch.randn: no tape is kept here")
    tapes = graph_sample.load_tapes(request, tmp_path)
    assert tapes is not None and sorted(tapes) == [1, 2] and tapes[2].evaluations == 4
    path = graph_sample.tape_path(request, 1, tmp_path)
    data = json.loads(path.read_text())
    data["key"]["torch"] = "0.0"  # recorded by another torch
    path.write_text(json.dumps(data))
    assert graph_sample.load_tapes(request, tmp_path) is None
    path.write_text("{not json")
    assert graph_sample.load_tapes(request, tmp_path) is None


_PROBE = """
import atexit, sys
atexit.register(lambda: print("TORCH", "torch" in sys.modules, file=sys.stderr))
from ccld_trt.cli import run
sys.exit(run(sys.argv[1:]))
"""


def _sample(models: Path, build: Path, out: Path, backend: str, *flags: str) -> tuple[bool, str]:
    """A fresh ``sample`` process -> (whether it imported torch, its stderr)."""
    argv = ["sample", "a lighthouse", "--backend", backend, "--precision", "fp32", "--models", str(models),
            "--output-dir", str(out), *flags]
    done = subprocess.run([sys.executable, "-c", _PROBE, *argv], env={**os.environ, "CCLD_TRT_BUILD": str(build)},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    line = next(line for line in done.stderr.splitlines() if line.startswith("TORCH "))
    return line == "TORCH True", done.stderr


@pytest.mark.skipif(not AVX2, reason="randn replicates torch's AVX2 normal kernel; this CPU runs another")
@pytest.mark.parametrize("backend", GRAPH_BACKENDS)
def test_sample_runs_without_torch_and_writes_the_same_files(backend: str, seed3_dir: Path, tmp_path: Path) -> None:
    models, build, out = seed3_dir, tmp_path / "build", tmp_path / "out"
    picture = tmp_path / "picture.png"  # an image prompt: the CLOOB image encoder is opened at its first call
    Image.fromarray(np.arange(40 * 30 * 3, dtype=np.uint8).reshape(30, 40, 3)).save(picture)
    for run, flags in enumerate((["--fast", "--seed", "3"],
                                 ["--method", "plms", "--steps", "4", "-n", "3", "--batch-size", "2", "--seed", "11"],
                                 ["--images", f"{picture}:2", "--method", "ddim", "--steps", "3", "--seed", "5"],
                                 ["--method", "ddim", "--eta", "0.5", "--steps", "4", "-n", "2", "--seed", "9"])):
        latents = [tmp_path / f"{run}-{i}.npy" for i in range(2)]
        # the first run exports the graphs and samples with torch, then records the job's tape
        with_torch, _ = _sample(models, build, out, backend, *flags, "--save-latents", str(latents[0]))
        assert with_torch
        before = sorted(out.iterdir())
        without_torch, stderr = _sample(models, build, out, backend, *flags, "--save-latents", str(latents[1]))
        assert not without_torch, stderr[-2000:]
        assert f"backend: {backend} fp32 on cpu" in stderr
        new = sorted(set(out.iterdir()) - set(before))
        assert [p.read_bytes() for p in new] == [p.read_bytes() for p in before[-len(new):]]
        assert np.load(latents[1]).tobytes() == np.load(latents[0]).tobytes()


@pytest.mark.skipif(not AVX2, reason="randn replicates torch's AVX2 normal kernel; this CPU runs another")
def test_a_stale_tape_or_graph_runs_with_torch(seed3_dir: Path, tmp_path: Path) -> None:
    backend = GRAPH_BACKENDS[-1]
    models, build, out = tmp_path / "models", tmp_path / "build", tmp_path / "out"
    shutil.copytree(seed3_dir, models)
    assert _sample(models, build, out, backend, "--fast")[0]  # exports, records
    assert not _sample(models, build, out, backend, "--fast")[0]
    # a tape recorded by other code is recorded again, by a run with torch
    (path,) = (build / graph_sample.TAPE_DIR).iterdir()
    data = json.loads(path.read_text())
    data["key"]["code"] = "0" * 64
    path.write_text(json.dumps(data))
    assert _sample(models, build, out, backend, "--fast")[0]
    assert not _sample(models, build, out, backend, "--fast")[0]
    # a changed checkpoint: its graph is exported again (with torch), never run from the stale file
    state = torch.load(models / "model_student.ckpt", weights_only=True)
    state["autoencoder_scale"] = state["autoencoder_scale"] * 2
    next(v for k, v in state.items() if k.endswith("weight") and v.ndim == 4).mul_(1.5)
    torch.save(state, models / "model_student.ckpt")
    with_torch, stderr = _sample(models, build, out, backend, "--fast")
    assert with_torch and "export" in stderr.lower(), stderr[-2000:]

"""The CLI contract: bad input gives one line and a non-zero exit, outputs are never overwritten."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ccld_trt.cli import run


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ccld_trt", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize(("args", "needle"), [
    (["--steps", "0"], "--steps"),
    (["-n", "0"], "-n"),
    (["--batch-size", "0"], "--batch-size"),
    (["--method", "euler"], "--method"),
    (["--seed", "abc"], "--seed"),
    (["--eta", "2"], "--eta"),
    (["--autoencoder-scale", "big"], "--autoencoder-scale"),
    (["--autoencoder-scale", "-1"], "--autoencoder-scale must be positive"),  # assembled as every front end's
    (["--preset", "slow"], "--preset"),
    (["--fast", "--preset", "balanced"], "--fast is --preset fast"),
])
def test_bad_arguments(args, needle, seed3_dir, tmp_path):
    result = cli("sample", "a cat", "--models", str(seed3_dir), "--output-dir", str(tmp_path), *args)
    assert_one_line_error(result, needle)
    assert not list(tmp_path.iterdir())


def test_bad_prompt_weight_and_missing_prompt(seed3_dir, tmp_path):
    assert_one_line_error(cli("sample", "a cat:heavy", "--models", str(seed3_dir)), "a cat:heavy")
    assert_one_line_error(cli("sample", "--models", str(seed3_dir)), "prompt")


def test_missing_models_say_what_to_do(tmp_path):
    result = cli("sample", "a cat", "--models", str(tmp_path / "nothing"))
    assert_one_line_error(result, "model_student.ckpt", "ccld-trt download")


def test_debug_shows_the_traceback(tmp_path):
    result = cli("--debug", "sample", "a cat", "--models", str(tmp_path / "nothing"))
    assert result.returncode != 0 and "Traceback" in result.stderr


def copy_models(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_truncated_unet_checkpoint(seed3_dir, tmp_path):
    models = copy_models(seed3_dir, tmp_path / "m")
    data = (models / "model_student.ckpt").read_bytes()
    (models / "model_student.ckpt").write_bytes(data[: len(data) // 2])
    assert_one_line_error(cli("sample", "a cat", "--models", str(models)), "model_student.ckpt")


def test_hostile_unet_checkpoint_is_not_executed(seed3_dir, tmp_path):
    models = copy_models(seed3_dir, tmp_path / "m")
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"net.0.main.0.weight": Evil()}, models / "model_student.ckpt")
    result = cli("sample", "a cat", "--models", str(models))
    assert_one_line_error(result, "model_student.ckpt")
    assert not marker.exists()


def test_hostile_cloob_pickle_is_not_executed(seed3_dir, tmp_path):
    models = copy_models(seed3_dir, tmp_path / "m")
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (models / "cloob.pkl").write_bytes(pickle.dumps({"params": Evil()}))
    assert_one_line_error(cli("sample", "a cat", "--models", str(models)), "cloob.pkl")
    assert not marker.exists()


def test_unet_checkpoint_missing_a_tensor_names_it(seed3_dir, tmp_path):
    models = copy_models(seed3_dir, tmp_path / "m")
    state = torch.load(models / "model_student.ckpt", weights_only=True)
    del state["net.8.main.4.weight"]
    torch.save(state, models / "model_student.ckpt")
    assert_one_line_error(cli("sample", "a cat", "--models", str(models)), "net.8.main.4.weight")


def test_malformed_yaml_names_the_file(seed3_dir, tmp_path):
    models = copy_models(seed3_dir, tmp_path / "m")
    (models / "ae_model.yaml").write_text("model: [unclosed\n")
    assert_one_line_error(cli("sample", "a cat", "--models", str(models)), "ae_model.yaml")


def test_malformed_cloob_config_names_the_file(seed3_dir, tmp_path):
    models = copy_models(seed3_dir, tmp_path / "m")
    (models / "cloob_config.json").write_text("{not json")
    assert_one_line_error(cli("sample", "a cat", "--models", str(models)), "cloob_config.json")


def test_missing_image_prompt(seed3_dir, tmp_path):
    result = cli("sample", "a cat", "--images", str(tmp_path / "none.png"), "--models", str(seed3_dir))
    assert_one_line_error(result, "none.png")


def test_non_image_file_as_image_prompt(seed3_dir, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    result = cli("sample", "a cat", "--images", f"{bad}:2", "--models", str(seed3_dir), "--steps", "1")
    assert_one_line_error(result, "bad.png")


def test_never_overwrites_and_batches_match(seed3_dir, tmp_path):
    out = tmp_path / "out"
    base = ["sample", "a red house", "--models", str(seed3_dir), "--steps", "3", "--output-dir", str(out)]
    assert run([*base, "-n", "3", "--seed", "5", "--save-latents", str(tmp_path / "a.npy")]) == 0
    assert run([*base, "-n", "3", "--seed", "5", "--batch-size", "2", "--save-latents", str(tmp_path / "b.npy")]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == [f"out_{i:05}.png" for i in range(6)]
    a, b = np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy")
    assert a.shape == (3, 4, 32, 32)
    # batching changes only float rounding (the original runs all n in one batch)
    assert np.linalg.norm(a - b) / np.linalg.norm(a) < 1e-5
    # an existing latents file is never replaced
    assert run([*base, "--save-latents", str(tmp_path / "a.npy")]) == 1
    assert np.array_equal(np.load(tmp_path / "a.npy"), a)


def test_autoencoder_scale_choices(seed3_dir, tmp_path):
    base = ["sample", "a red house", "--models", str(seed3_dir), "--steps", "2", "--seed", "1"]
    pngs = []
    for i, scale in enumerate(["2.55", "checkpoint", "1.0"]):
        out = tmp_path / str(i)
        assert run([*base, "--autoencoder-scale", scale, "--output-dir", str(out)]) == 0
        pngs.append(np.asarray(Image.open(out / "out_00000.png")))
    assert np.array_equal(pngs[0], pngs[1])  # the demo checkpoints store 2.55
    assert not np.array_equal(pngs[0], pngs[2])


def test_demo_weights_refuse_to_overwrite(tmp_path):
    assert run(["demo-weights", str(tmp_path / "d")]) == 0
    assert (tmp_path / "d" / "DEMO_WEIGHTS.txt").exists()
    assert_one_line_error(cli("demo-weights", str(tmp_path / "d")), "refusing to overwrite")


def test_download_offline_says_what_to_put_where(tmp_path):
    result = cli("download", "--models", str(tmp_path / "m"),
                 env={"HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"})
    assert_one_line_error(result, "model_student.ckpt", str(tmp_path / "m"))


@pytest.mark.parametrize("source", ["--onnx", "--models"])
def test_engines_build_without_tensorrt_is_one_clear_line(source, tmp_path):
    # checked before the ONNX export or any model file is looked at
    result = cli("engines", "build", source, str(tmp_path / "none"), "--output", str(tmp_path / "engines"),
                 "--trt-flavor", "tensorrt")  # regular TensorRT (tensorrt-rtx may be installed)
    assert_one_line_error(result, "TensorRT is not installed")
    assert not list(tmp_path.iterdir())


def test_sample_with_tensorrt_backend_without_tensorrt_is_one_clear_line(seed3_dir, tmp_path):
    for device in ("cpu", "cuda"):
        result = cli("sample", "a cat", "--models", str(seed3_dir), "--backend", "tensorrt", "--device", device,
                     "--output-dir", str(tmp_path))
        assert_one_line_error(result, "tensorrt" if device == "cpu" else "")
    assert not list(tmp_path.iterdir())


def test_doctor_runs_without_gpu_and_names_tensorrt_missing():
    result = cli("doctor")
    assert result.returncode == 0
    assert "TensorRT is not installed" in result.stdout


def test_models_dir_with_the_reference_kits_short_names(seed3_dir, tmp_path):
    models = copy_models(seed3_dir, tmp_path / "m")
    for old, new in [("model_student.ckpt", "unet.ckpt"), ("ae_model.ckpt", "ae.ckpt"), ("ae_model.yaml", "ae.yaml")]:
        (models / old).rename(models / new)
    base = ["sample", "a red house", "--steps", "2", "--seed", "4"]
    assert run([*base, "--models", str(models), "--save-latents", str(tmp_path / "short.npy"),
                "--output-dir", str(tmp_path / "a")]) == 0
    assert run([*base, "--models", str(seed3_dir), "--save-latents", str(tmp_path / "long.npy"),
                "--output-dir", str(tmp_path / "b")]) == 0
    assert np.array_equal(np.load(tmp_path / "short.npy"), np.load(tmp_path / "long.npy"))


def test_backend_flags_are_one_group_parsed_into_backend_options():
    from ccld_trt.cli import build_parser
    from ccld_trt.cli_args import backend_options
    from ccld_trt.runner import BackendOptions

    flags = ["--backend", "onnxruntime", "--device", "cuda:1", "--precision", "fp16", "--onnx-dir", "g",
             "--engines", "e"]
    want = BackendOptions(backend="onnxruntime", device="cuda:1", precision="fp16", engine_dir=Path("e"),
                          onnx_dir=Path("g"))
    parser = build_parser()
    assert backend_options(parser.parse_args(["sample", "a cat", *flags])) == want
    assert backend_options(parser.parse_args(["serve", *flags])) == want
    # bench picks backends and precisions per variant: only the device comes from the group
    assert backend_options(parser.parse_args(["bench", "--device", "cuda:1"])) == BackendOptions(device="cuda:1")


def test_bench_command_comes_from_the_entry_point():
    from importlib.metadata import entry_points

    from ccld_trt.cli import COMMANDS_GROUP

    found = {e.name: e.value for e in entry_points(group=COMMANDS_GROUP)}
    assert found == {"bench": "ccld_trt.benchmarks.cli:add_commands"}
    assert_one_line_error(cli("bench", "--backends", "tensorflow"), "list of torch, torch-cudagraph, onnxruntime")


def test_only_a_higher_layers_command_line_loads_their_commands():
    """The higher layers' commands (bench) are found and imported only where the command line may name one: a
    built-in command's start skips them (~45 ms, and the benchmarks' modules)."""
    from ccld_trt.cli import build_parser

    with pytest.raises(SystemExit):  # "invalid choice: 'bench'": the parser of a `sample` line has no bench
        build_parser(["sample", "a cat"]).parse_args(["bench"])
    for argv in (["bench", "--repeats", "2"], ["--debug", "bench"], ["--help"], []):
        assert build_parser(argv).parse_args(["bench", "--repeats", "2"]).repeats == 2
    done = subprocess.run([sys.executable, "-m", "ccld_trt", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "bench" in done.stdout


def test_precision_a_backend_cannot_run_is_one_line_before_loading(seed3_dir, tmp_path):
    result = cli("sample", "a cat", "--models", str(seed3_dir), "--backend", "onnxruntime", "--precision", "bf16",
                 "--onnx-dir", str(tmp_path / "onnx"))
    assert_one_line_error(result, "the onnxruntime backend runs fp32 or fp16, not 'bf16'")
    assert not (tmp_path / "onnx").exists()  # refused before any export


def test_repeated_images_flags_add_up():
    """`--images a --images b` is both images (argparse's default would silently keep only b)."""
    from ccld_trt.cli import build_parser

    args = build_parser().parse_args(["sample", "x", "--images", "a.png:2", "--images", "b.png", "c.png:-1"])
    assert args.images == ["a.png:2", "b.png", "c.png:-1"]
    assert build_parser().parse_args(["sample", "x"]).images == []

"""The published files as they are: Lightning training checkpoints, safetensors and jax/haiku CLOOB pickles load
as data (goldens reproduced), and hostile payloads anywhere in them never run."""

from __future__ import annotations

import functools
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from ccld_trt.cli import run
from ccld_trt.export.autoencoder import load_decoder
from ccld_trt.export.checkpoints import convert_to_safetensors, load_checkpoint
from ccld_trt.export.errors import UserError
from ccld_trt.export.file_digests import safetensors_source, sha256_file
from ccld_trt.export.models import ModelFiles
from ccld_trt.export.unet import load_unet
from foreign_pickles import as_jax_haiku, dumps_jax_haiku, under, write_lightning_checkpoint

FIXTURES = Path(__file__).resolve().parent / "fixtures"
CASES = ["e2e_plms", "e2e_ddim", "e2e_prk", "e2e_pie", "e2e_plms2", "e2e_ddpm", "e2e_multi"]


def rel_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a.astype(np.float64) - b) / np.linalg.norm(b.astype(np.float64)))


def ldm_state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["state_dict"]


@pytest.fixture(scope="module")
def published_dir(seed3_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The seed-3 models as the published files come: a Lightning autoencoder checkpoint, the U-Net converted to
    safetensors (the .ckpt kept beside it), and the CLOOB pickle as jax arrays in haiku FlatMappings."""
    directory = tmp_path_factory.mktemp("published")
    for f in seed3_dir.iterdir():
        shutil.copy(f, directory / f.name)
    write_lightning_checkpoint(directory / "ae_model.ckpt", ldm_state(seed3_dir / "ae_model.ckpt"))
    convert_to_safetensors(directory / "model_student.ckpt", "U-Net checkpoint")
    cloob = pickle.loads((seed3_dir / "cloob.pkl").read_bytes())
    cloob["params"] = tuple(as_jax_haiku(part) for part in cloob["params"])
    (directory / "cloob.pkl").write_bytes(dumps_jax_haiku(cloob))
    return directory


def test_published_dir_is_what_the_test_means(published_dir: Path) -> None:
    files = ModelFiles.resolve(published_dir)
    assert files.unet.name == "model_student.safetensors"  # the converted copy is preferred
    assert files.autoencoder_config.name == "ae_model.yaml"
    assert b"pytorch_lightning.callbacks.model_checkpoint" in (published_dir / "ae_model.ckpt").read_bytes()
    raw = (published_dir / "cloob.pkl").read_bytes()
    assert b"jax._src.array" in raw and b"haiku._src.data_structures" in raw
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        torch.load(published_dir / "ae_model.ckpt", weights_only=True)  # why the loader needed to change


def test_lightning_autoencoder_reproduces_golden(published_dir: Path, golden: dict[str, np.ndarray]) -> None:
    decoder = load_decoder(published_dir / "ae_model.ckpt", published_dir / "ae_model.yaml")
    with torch.no_grad():
        image = decoder(torch.from_numpy(golden["ae_z"])).numpy()
    assert rel_error(image, golden["ae_img"]) <= 1e-4


def test_safetensors_unet_reproduces_golden(published_dir: Path, golden: dict[str, np.ndarray]) -> None:
    unet, scale = load_unet(published_dir / "model_student.safetensors")
    with torch.no_grad():
        v = unet(*(torch.from_numpy(golden[k]) for k in ("unet_x", "unet_t", "unet_embed"))).numpy()
    assert rel_error(v, golden["unet_v"]) <= 1e-4
    stored = load_checkpoint(published_dir / "model_student.ckpt", "u")["autoencoder_scale"]
    assert scale == pytest.approx(float(stored))


def test_safetensors_copy_keeps_its_source(published_dir: Path, seed3_dir: Path) -> None:
    meta = safetensors_source(published_dir / "model_student.safetensors")
    assert meta == {"source": "model_student.ckpt", "source_sha256": sha256_file(seed3_dir / "model_student.ckpt")}
    a = load_checkpoint(published_dir / "model_student.safetensors", "u")
    b = load_checkpoint(seed3_dir / "model_student.ckpt", "u")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", CASES)
def test_golden_case_from_published_files(name: str, e2e_cases: dict[str, dict], golden: dict[str, np.ndarray],
                                          published_dir: Path, tmp_path: Path) -> None:
    case = e2e_cases[name]
    args = ["sample", *case["prompt_list"], "--models", str(published_dir), "-n", str(case["n"]),
            "--seed", str(case["seed"]), "--steps", str(case["steps_n"]), "--method", case["method"],
            "--output-dir", str(tmp_path / "png"), "--save-latents", str(tmp_path / "latents.npy")]
    if case["image_prompts"]:
        args += ["--images", *(f"{FIXTURES / image}:{w}" for image, w in case["image_prompts"])]
    assert run(args) == 0
    pixels = np.stack([np.asarray(Image.open(p)) for p in sorted((tmp_path / "png").glob("out_*.png"))])
    assert rel_error(np.load(tmp_path / "latents.npy"), golden[f"{name}_latents"]) <= 1e-3
    assert np.abs(pixels.astype(int) - golden[f"{name}_pixels"].astype(int)).max() <= 2


class _Hostile:
    def __init__(self, reduce: tuple[Any, ...]) -> None:
        self.reduce = reduce

    def __reduce__(self) -> tuple[Any, ...]:
        return self.reduce


def _payload(kind: str, marker: Path) -> _Hostile:
    return _Hostile({
        "os.system": (os.system, (f"touch {marker}",)),
        "eval": (eval, (f"open({str(marker)!r}, 'w').close()",)),
        "subprocess": (subprocess.call, (["touch", str(marker)],)),
        "partial": (functools.partial(os.system, f"touch {marker}"), ()),
    }[kind])


GLOBAL_NAMES = {"os.system": f"{os.system.__module__}.system", "eval": "builtins.eval",
                "subprocess": "subprocess.call", "partial": "functools.partial"}


@pytest.mark.parametrize("place", ["callbacks", "state_dict", "top"])
@pytest.mark.parametrize("kind", list(GLOBAL_NAMES))
def test_hostile_payload_anywhere_is_refused_without_running(tmp_path: Path, kind: str, place: str) -> None:
    marker = tmp_path / "pwned"
    state: dict[str, Any] = {"w": torch.ones(2)}
    if place == "state_dict":
        state["evil"] = _payload(kind, marker)
    path = write_lightning_checkpoint(tmp_path / "ae.ckpt", state,
                                      extra=_payload(kind, marker) if place == "callbacks" else None)
    if place == "top":
        torch.save({"state_dict": {"w": torch.ones(2)}, "loops": [_payload(kind, marker)]}, path)
    with pytest.raises(UserError) as raised:
        load_checkpoint(path, "autoencoder checkpoint")
    message = str(raised.value)
    assert message == (f"autoencoder checkpoint {path}: refused to load: it references {GLOBAL_NAMES[kind]}, "
                       "which is code, not data (only tensors, plain containers, numpy scalars and "
                       "Lightning/omegaconf metadata are accepted)")
    assert not marker.exists()


def test_stand_ins_are_never_the_real_classes(tmp_path: Path) -> None:
    """Even with Lightning importable, its classes are never constructed or given state."""
    marker = tmp_path / "called"

    class Trap:
        def __new__(cls, *args: Any) -> Any:
            marker.touch()
            return super().__new__(cls)

        def __setstate__(self, state: Any) -> None:
            marker.touch()

    path = write_lightning_checkpoint(tmp_path / "ae.ckpt", {"w": torch.ones(2)})
    with (under("pytorch_lightning.callbacks.model_checkpoint", ModelCheckpoint=Trap),
          under("pytorch_lightning.utilities.parsing", AttributeDict=Trap),
          under("omegaconf.dictconfig", DictConfig=Trap)):
        assert load_checkpoint(path, "c").keys() == {"w"}
    assert not marker.exists()


def test_only_tensors_in_the_state_dict(tmp_path: Path) -> None:
    path = write_lightning_checkpoint(tmp_path / "ae.ckpt", {"w": torch.ones(2), "step": 3})  # type: ignore[dict-item]
    with pytest.raises(UserError, match=r"ae\.ckpt: expected a state dict of tensors, but step are not tensors"):
        load_checkpoint(path, "c")


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_corrupt_files_give_one_clean_line(tmp_path: Path, suffix: str) -> None:
    source = write_lightning_checkpoint(tmp_path / "ae.ckpt", {"w": torch.ones(64, 64)})
    if suffix == ".safetensors":
        source = convert_to_safetensors(source, "c")
    data = source.read_bytes()
    for name, content in (("truncated", data[: len(data) // 2]), ("empty", b""), ("garbage", bytes(range(256)) * 4)):
        path = tmp_path / f"{name}{suffix}"
        path.write_bytes(content)
        with pytest.raises(UserError) as raised:
            load_checkpoint(path, "c")
        message = str(raised.value)
        assert f"{path}: not a readable" in message and "corrupt" in message
        assert "\n" not in message and "\x1b" not in message


def test_a_different_model_names_the_first_mismatching_tensors(published_dir: Path, tmp_path: Path) -> None:
    """A Stable Diffusion-like VAE (other widths) saved as safetensors: the mismatch is named, not a traceback."""
    state = load_checkpoint(published_dir / "ae_model.ckpt", "c")
    other = {k: torch.zeros(*(2 * s for s in v.shape)) if k.startswith("decoder.conv_in") else v
             for k, v in state.items()}
    from safetensors.torch import save_file

    save_file(other, tmp_path / "sd_vae.safetensors")
    with pytest.raises(UserError, match=r"sd_vae\.safetensors: tensor decoder\.conv_in\.\w+ has shape"):
        load_decoder(tmp_path / "sd_vae.safetensors", published_dir / "ae_model.yaml")


def test_cli_refuses_a_hostile_lightning_checkpoint_in_one_line(published_dir: Path, tmp_path: Path) -> None:
    models = tmp_path / "m"
    shutil.copytree(published_dir, models)
    marker = tmp_path / "pwned"
    write_lightning_checkpoint(models / "ae_model.ckpt", {"w": torch.ones(2)}, extra=_payload("os.system", marker))
    result = subprocess.run([sys.executable, "-m", "ccld_trt", "sample", "a cat", "--models", str(models)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and not marker.exists()
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "ae_model.ckpt" in lines[0] and "refused to load" in lines[0], result.stderr
    assert "\x1b" not in result.stderr and "Traceback" not in result.stderr


def test_convert_refuses_safetensors_and_leaves_the_source(published_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="already a safetensors file"):
        convert_to_safetensors(published_dir / "model_student.safetensors", "U-Net checkpoint")
    source = shutil.copy(published_dir / "ae_model.ckpt", tmp_path / "ae_model.ckpt")
    before = sha256_file(Path(source))
    target = convert_to_safetensors(Path(source), "autoencoder checkpoint")
    assert sha256_file(Path(source)) == before
    assert safetensors_source(target)["source_sha256"] == before
    assert load_checkpoint(target, "c").keys() == load_checkpoint(Path(source), "c").keys()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ae_model.ckpt", "ae_model.safetensors"]


def test_jax_haiku_cloob_pickle_gives_the_same_encoders(published_dir: Path, seed3_dir: Path) -> None:
    from ccld_trt.export.cloob import load_cloob
    from ccld_trt.export.cloob_config import load_cloob_config

    config = load_cloob_config(str(seed3_dir / "cloob_config.json"))
    for ours, reference in zip(load_cloob(published_dir / "cloob.pkl", config),
                               load_cloob(seed3_dir / "cloob.pkl", config), strict=True):
        a, b = ours.state_dict(), reference.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_jax_array_must_wrap_a_numpy_array(tmp_path: Path) -> None:
    from ccld_trt.export.cloob_pickle import read_cloob_params
    from foreign_pickles import JaxArray

    class NotAnArray(JaxArray):
        def __reduce__(self) -> tuple[Any, ...]:
            rebuild, _ = super().__reduce__()
            return (rebuild, (np.dtype, ("f4",), None, {}))  # a numpy callable, but not the array rebuild

    path = tmp_path / "c.pkl"
    path.write_bytes(dumps_jax_haiku({"params": ({"m": {"w": NotAnArray(np.zeros(2))}}, {})}))
    with pytest.raises(UserError, match=r"c\.pkl.*a jax array that is not a pickled numpy array"):
        read_cloob_params(path, ({"m": {"w": (2,)}}, {}))


def test_convert_command_writes_keeps_and_refreshes_copies(seed3_dir: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    models = shutil.copytree(seed3_dir, tmp_path / "m")
    assert run(["convert", "--models", str(models)]) == 0
    copies = [models / "model_student.safetensors", models / "ae_model.safetensors"]
    assert capsys.readouterr().out.split() == [str(p) for p in copies]
    for copy in copies:
        assert safetensors_source(copy)["source_sha256"] == sha256_file(models / copy.with_suffix(".ckpt").name)
    stamps = [p.stat().st_mtime_ns for p in copies]
    assert run(["convert", "--models", str(models)]) == 0  # up to date: nothing rewritten
    assert [p.stat().st_mtime_ns for p in copies] == stamps
    state = load_checkpoint(models / "model_student.ckpt", "u")
    state["autoencoder_scale"] = torch.tensor(1.5)
    torch.save(state, models / "model_student.ckpt")
    assert run(["convert", "--models", str(models)]) == 0  # the source changed: the copy follows it
    assert float(load_checkpoint(copies[0], "u")["autoencoder_scale"]) == 1.5
    assert ModelFiles.resolve(models).unet == copies[0]


def test_convert_command_without_checkpoints_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["convert", "--models", str(tmp_path)]) != 0
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no U-Net or autoencoder checkpoint" in err


def test_standard_normal_draws_as_randn_and_nothing_on_meta() -> None:
    """Modules built for training or demo weights keep torch.randn's draws; on meta nothing is drawn."""
    from ccld_trt.export.checkpoints import standard_normal

    torch.manual_seed(3)
    drawn = standard_normal(4, 5)
    torch.manual_seed(3)
    assert torch.equal(drawn, torch.randn(4, 5))
    with torch.device("meta"):
        assert standard_normal(2, 3).is_meta

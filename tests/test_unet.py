"""The U-Net: state-dict layout of the original, golden outputs, config inference, load errors, dynamic shapes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from ccld_trt.export.errors import UserError
from ccld_trt.export.unet import DiffusionModel, infer_unet_config, load_unet, unet_state_shapes

SPECS = Path(__file__).resolve().parents[2] / "shared" / "reference" / "specs"
STUDENT = (192, [1, 1, 2, 2])
SMALL = (64, [1, 1, 2, 2])
TEACHER = (192, [4, 4, 8, 8])
# A cheap configuration for checkpoints the tests write themselves.
TINY = (64, [1, 1, 1, 1])


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out - ref).norm() / ref.norm())


def meta_state(config: tuple[int, list[int]]) -> dict[str, torch.Tensor]:
    return {k: torch.empty(s, device="meta") for k, s in unet_state_shapes(*config).items()}


def write_checkpoint(path: Path, state: dict[str, torch.Tensor]) -> Path:
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def tiny_state() -> dict[str, torch.Tensor]:
    state = {k: torch.zeros(s) for k, s in unet_state_shapes(*TINY).items()}
    state["autoencoder_scale"] = torch.tensor(2.55)
    return state


@pytest.fixture(scope="module")
def seed3_unet(seed3_dir: Path) -> tuple[DiffusionModel, float]:
    return load_unet(seed3_dir / "model_student.ckpt")


@pytest.mark.parametrize(("spec", "config"), [("unet_student", STUDENT), ("unet_small", SMALL)])
def test_state_dict_layout_matches_the_original(spec: str, config: tuple[int, list[int]]) -> None:
    path = SPECS / f"{spec}.json"
    if not path.exists():
        pytest.skip(f"reference specs not found at {SPECS}")
    expected = {k: tuple(v) for k, v in json.loads(path.read_text()).items()}
    shapes = unet_state_shapes(*config)
    assert list(shapes) == list(expected)
    assert shapes == expected


def test_student_has_105_38_m_parameters() -> None:
    total = sum(math.prod(s) for s in unet_state_shapes(*STUDENT).values())
    assert round(total / 1e6, 2) == 105.38


def test_teacher_shapes_cost_no_memory() -> None:
    total = sum(math.prod(s) for s in unet_state_shapes(*TEACHER).values())
    assert round(total / 1e9, 2) == 1.17


@pytest.mark.parametrize("config", [STUDENT, SMALL, TEACHER, TINY])
def test_infer_config_from_shapes(config: tuple[int, list[int]]) -> None:
    assert infer_unet_config(meta_state(config)) == config


def test_infer_config_rejects_other_state_dicts() -> None:
    state = meta_state(SMALL)
    del state["net.4.main.9.main.1.main.0.weight"]
    with pytest.raises(UserError, match=r"net\.4\.main\.9\.main\.1\.main\.0\.weight"):
        infer_unet_config(state)
    with pytest.raises(UserError, match=r"net\.0\.main\.0\.weight has shape \[64, 20\]"):
        infer_unet_config({"net.0.main.0.weight": torch.empty(64, 20)})


def test_golden_output(seed3_unet: tuple[DiffusionModel, float], golden: dict[str, np.ndarray]) -> None:
    model, scale = seed3_unet
    assert scale == pytest.approx(2.55)
    with torch.no_grad():
        v = model(*(torch.from_numpy(golden[k]) for k in ("unet_x", "unet_t", "unet_embed")))
    assert rel_error(v, torch.from_numpy(golden["unet_v"])) <= 1e-4


def test_non_square_latents_and_batch_independence(seed3_unet: tuple[DiffusionModel, float]) -> None:
    model, _ = seed3_unet
    gen = torch.Generator().manual_seed(0)
    x = torch.randn([2, 4, 24, 40], generator=gen)
    t = torch.tensor([0.9, 0.3])
    embed = torch.randn([2, 512], generator=gen)
    embed[0] = 0  # the unconditional branch: normalising a zero vector must stay finite
    with torch.no_grad():
        v = model(x, t, embed)
        v_row = model(x[1:2], t[1:2], embed[1:2])
    assert v.shape == x.shape
    assert torch.isfinite(v).all()
    assert rel_error(v[1:2], v_row) <= 1e-5


@pytest.mark.slow
# The legacy exporter is the one that needs no onnxscript; GroupNorm's batch-size check (training only) makes
# the tracer warn about a Python bool that plays no part in the graph.
@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")
def test_onnx_export_has_dynamic_batch_and_size(seed3_unet: tuple[DiffusionModel, float], tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    model, _ = seed3_unet
    args = (torch.randn([2, 4, 32, 32]), torch.rand([2]), torch.randn([2, 512]))
    dims = {0: "n", 2: "h", 3: "w"}
    torch.onnx.export(model, args, tmp_path / "unet.onnx", input_names=["x", "t", "embed"], output_names=["v"],
                      dynamic_axes={"x": dims, "t": {0: "n"}, "embed": {0: "n"}, "v": dims}, dynamo=False)
    session = ort.InferenceSession(str(tmp_path / "unet.onnx"), providers=["CPUExecutionProvider"])
    x, t, embed = torch.randn([3, 4, 24, 40]), torch.rand([3]), torch.randn([3, 512])
    (v,) = session.run(None, {"x": x.numpy(), "t": t.numpy(), "embed": embed.numpy()})
    with torch.no_grad():
        ref = model(x, t, embed)
    assert rel_error(torch.from_numpy(v), ref) <= 1e-4


def test_load_infers_config_and_scale(tmp_path: Path, tiny_state: dict[str, torch.Tensor]) -> None:
    model, scale = load_unet(write_checkpoint(tmp_path / "u.ckpt", tiny_state))
    assert not model.training
    assert scale == pytest.approx(2.55)
    assert unet_state_shapes(*TINY) == {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_load_names_a_missing_tensor(tmp_path: Path, tiny_state: dict[str, torch.Tensor]) -> None:
    state = {k: v for k, v in tiny_state.items() if k != "net.5.main.4.weight"}
    with pytest.raises(UserError, match=r"u\.ckpt.*missing 1 tensor.*net\.5\.main\.4\.weight"):
        load_unet(write_checkpoint(tmp_path / "u.ckpt", state))


def test_load_names_a_misshaped_tensor(tmp_path: Path, tiny_state: dict[str, torch.Tensor]) -> None:
    state = {**tiny_state, "mapping.1.main.0.bias": torch.zeros(1000)}
    with pytest.raises(UserError, match=r"mapping\.1\.main\.0\.bias has shape \[1000\]"):
        load_unet(write_checkpoint(tmp_path / "u.ckpt", state))


def test_load_of_something_else_names_the_file(tmp_path: Path) -> None:
    path = write_checkpoint(tmp_path / "other.ckpt", {"weight": torch.zeros(3)})
    with pytest.raises(UserError, match=r"other\.ckpt.*not a CCLD U-Net.*net\.0\.main\.0\.weight"):
        load_unet(path)


def test_config_flags_override_inference(tmp_path: Path, tiny_state: dict[str, torch.Tensor]) -> None:
    path = write_checkpoint(tmp_path / "u.ckpt", tiny_state)
    model, _ = load_unet(path, 32, [2, 2, 2, 2])  # the same widths, spelled differently
    assert unet_state_shapes(*TINY) == {k: tuple(v.shape) for k, v in model.state_dict().items()}
    with pytest.raises(UserError, match="has shape"):
        load_unet(path, channel_multipliers=[2, 2, 2, 2])
    with pytest.raises(UserError, match="base channels 16"):
        load_unet(path, base_channels=16)

"""CLOOB encoders: golden embeddings, the original's masking quirk, checkpoint safety, configs, image prompts."""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import pickle
import subprocess
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch.nn import functional as F

from ccld_trt.export.cloob import CLOOBImageEncoder, CLOOBTextEncoder, cloob_param_shapes, load_cloob
from ccld_trt.export.cloob_config import DEFAULT_CLOOB_CONFIG, load_cloob_config
from ccld_trt.export.cloob_pickle import ParamShapes, read_cloob_params
from ccld_trt.export.errors import UserError
from ccld_trt.image_prompt import load_image_prompt, to_array
from ccld_trt.tokenizer import EOT_TOKEN, tokenize

FIXTURES = Path(__file__).resolve().parent / "fixtures"
SPECS = Path(__file__).resolve().parents[2] / "shared" / "reference" / "specs"
PROMPTS = json.loads((FIXTURES / "prompts.json").read_text())


def rel_error(got: torch.Tensor, ref: np.ndarray) -> float:
    ref_t = torch.from_numpy(ref)
    return float((got - ref_t).norm() / ref_t.norm())


@pytest.fixture(scope="module")
def small_config(seed3_dir: Path) -> dict[str, Any]:
    return load_cloob_config(seed3_dir / "cloob_config.json")


@pytest.fixture(scope="module")
def encoders(seed3_dir: Path, small_config: dict[str, Any]) -> tuple[CLOOBTextEncoder, CLOOBImageEncoder]:
    return load_cloob(seed3_dir / "cloob.pkl", small_config)


# --- configs and shapes -------------------------------------------------------------------------------------

@pytest.mark.parametrize(("config", "spec"), [
    (SPECS / "cloob_small_config.json", "cloob_small.json"),
    (DEFAULT_CLOOB_CONFIG, "cloob_vit_b_16.json"),
])
def test_param_shapes_equal_reference_specs(config: str | Path, spec: str) -> None:
    if not (SPECS / spec).exists():
        pytest.skip("reference specs not available")
    image, text = cloob_param_shapes(load_cloob_config(config))
    as_lists = {"image": {m: {p: list(s) for p, s in ps.items()} for m, ps in image.items()},
                "text": {m: {p: list(s) for p, s in ps.items()} for m, ps in text.items()}}
    assert as_lists == json.loads((SPECS / spec).read_text())


def test_builtin_config() -> None:
    config = load_cloob_config(DEFAULT_CLOOB_CONFIG)
    assert config["d_embed"] == 512 and config["image_encoder"]["image_size"] == 224
    assert config["url"].endswith(".pkl")


def test_config_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{ not json")
    with pytest.raises(UserError, match=r"bad\.json"):
        load_cloob_config(bad)
    config = json.loads(json.dumps(load_cloob_config(DEFAULT_CLOOB_CONFIG)))
    del config["text_encoder"]["n_heads"]
    bad.write_text(json.dumps(config))
    with pytest.raises(UserError, match=r"bad\.json.*text_encoder\.n_heads"):
        load_cloob_config(bad)
    config["text_encoder"]["n_heads"] = "8"
    bad.write_text(json.dumps(config))
    with pytest.raises(UserError, match="positive integer"):
        load_cloob_config(bad)
    with pytest.raises(UserError, match="not found"):
        load_cloob_config(tmp_path / "missing.json")


# --- golden fidelity ----------------------------------------------------------------------------------------

def test_text_embedding_matches_golden(encoders: tuple[CLOOBTextEncoder, CLOOBImageEncoder],
                                       golden: dict[str, np.ndarray]) -> None:
    text, _ = encoders
    with torch.no_grad():
        embed = text(tokenize(PROMPTS["prompts"]))
    assert embed.shape == (4, 512) and embed.dtype == torch.float32
    assert rel_error(embed, golden["text_embed"]) <= 1e-4


def test_image_embedding_matches_golden(encoders: tuple[CLOOBTextEncoder, CLOOBImageEncoder],
                                        golden: dict[str, np.ndarray]) -> None:
    _, image = encoders
    pixels = load_image_prompt(FIXTURES / "image_prompt.png", image.image_size)
    assert pixels.shape == (1, 3, 64, 64) and pixels.dtype == np.float32
    assert pixels.min() >= 0.0 and pixels.max() <= 1.0
    with torch.no_grad():
        embed = image(torch.from_numpy(pixels))
    assert rel_error(embed, golden["image_embed"]) <= 1e-4


def test_rows_do_not_depend_on_batch(encoders: tuple[CLOOBTextEncoder, CLOOBImageEncoder]) -> None:
    text, image = encoders
    tokens = tokenize(["a cat", "sketch of a 3D printer", "x"])
    pixels = torch.rand(3, 3, image.image_size, image.image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for model, batch in ((text, tokens), (image, pixels)):
            torch.testing.assert_close(model(batch)[1], model(batch[1:2])[0], atol=1e-6, rtol=0)


def test_onnx_export_has_dynamic_batch(encoders: tuple[CLOOBTextEncoder, CLOOBImageEncoder],
                                       tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    text, image = encoders
    tokens = tokenize(["a cat", "sketch of a 3D printer", "x"])
    pixels = torch.rand(3, 3, image.image_size, image.image_size, generator=torch.Generator().manual_seed(1))
    for name, model, batch in (("text", text, tokens), ("image", image, pixels)):
        path = tmp_path / f"{name}.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # exporter deprecation/tracer chatter
            torch.onnx.export(model, (batch[:1],), str(path), input_names=["x"], output_names=["y"],
                              dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}}, dynamo=False)
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        with torch.no_grad():
            expected = model(batch).numpy()
        np.testing.assert_allclose(session.run(None, {"x": batch.numpy()})[0], expected, atol=1e-5, rtol=0)


# --- the original's text padding mask -------------------------------------------------------------------------

def original_text_forward(enc: CLOOBTextEncoder, tokens: torch.Tensor) -> torch.Tensor:
    """cloob-training's torch text encoder, written out step by step from its weights (fp32)."""
    eot = tokens == enc.eot_token
    # The original writes `cumsum(eot) == 0 | eot`, which Python groups as `cumsum(eot) == (0 | eot)`.
    keep = torch.cumsum(eot, dim=-1) == eot.long()
    x = enc.embed(tokens) + enc.pos_embed.weight
    for layer in enc.layers:
        attn = layer.attn
        h = attn.norm(x)
        n, s, d = h.shape
        heads, size = attn.n_heads, d // attn.n_heads
        q, k, v = (p(h).view(n, s, heads, size) for p in (attn.query, attn.key, attn.value))
        logits = torch.einsum("nthd,nThd->nhtT", q, k) / size**0.5
        logits = torch.where(keep[:, None, :, None], logits, torch.tensor(-1e30))
        mixed = torch.einsum("nhtT,nThd->nthd", logits.softmax(-1), v).reshape(n, s, d)
        x = x + attn.out(mixed)
        x = x + layer.ff(x)
    return F.normalize(enc.proj(x[:, 0]), dim=-1)


def test_text_mask_reproduces_original_quirk() -> None:
    config = load_cloob_config(DEFAULT_CLOOB_CONFIG)
    config["text_encoder"]["n_layers"] = 2  # padding only reaches token 0 through a second layer
    torch.manual_seed(0)
    enc = CLOOBTextEncoder(config).eval()
    with torch.no_grad():
        for name, p in enc.named_parameters():
            if name != "embed.weight":  # already N(0, 1); the rest (positions included) must not be trivial
                p.add_(torch.randn_like(p) * 0.02)
    rows = torch.zeros(6, 77, dtype=torch.int64)
    rows[0, :4] = torch.tensor([49406, 320, 2368, EOT_TOKEN])               # usual prompt
    rows[1] = torch.randint(1, 49000, (77,))                                # no EOT at all
    rows[2] = EOT_TOKEN                                                      # only EOTs
    rows[3, [0, 3, 9]] = EOT_TOKEN                                           # EOT first, later EOTs
    rows[4] = torch.randint(1, 49000, (77,))
    rows[4, 76] = EOT_TOKEN                                                  # EOT in the last slot
    # rows[5]: all padding, no EOT
    with torch.no_grad():
        ours = enc(rows)
        original = original_text_forward(enc, rows)
        x = enc.pos_embed(enc.embed(rows))
        for layer in enc.layers:
            x = layer(x, None)
        unmasked = F.normalize(enc.proj(x[:, 0]), dim=-1)
    torch.testing.assert_close(ours, original, atol=1e-6, rtol=0)
    # The test can see the mask: rows that have padding after an EOT come out differently without it.
    assert (ours[[0, 3]] - unmasked[[0, 3]]).abs().max() > 1e-3


# --- checkpoint safety ----------------------------------------------------------------------------------------

TINY: tuple[ParamShapes, ParamShapes] = (
    {"vi_t_image_encoder": {"class_embed": (4,)}},
    {"text_encoder/proj": {"w": (2, 3), "b": (3,)}},
)


def tiny_params() -> tuple[dict[str, Any], dict[str, Any]]:
    return ({"vi_t_image_encoder": {"class_embed": np.arange(4, dtype=np.float32)}},
            {"text_encoder/proj": {"w": np.ones((2, 3), np.float32), "b": np.zeros(3, np.float64)}})


def dump(path: Path, obj: Any, protocol: int = pickle.DEFAULT_PROTOCOL) -> Path:
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    return path


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_numpy_pickles_of_every_protocol_load(tmp_path: Path, protocol: int) -> None:
    path = dump(tmp_path / "c.pkl", {"params": tiny_params(), "epoch": 16}, protocol)
    image, text = read_cloob_params(path, TINY)
    np.testing.assert_array_equal(image["vi_t_image_encoder"]["class_embed"], np.arange(4))
    assert text["text_encoder/proj"]["b"].dtype == np.float32


class _Hostile:
    def __init__(self, reduce: tuple[Any, ...]) -> None:
        self.reduce = reduce

    def __reduce__(self) -> tuple[Any, ...]:
        return self.reduce


@pytest.mark.parametrize(("kind", "global_name"), [
    ("os.system", f"{os.system.__module__}.system"),
    ("eval", "builtins.eval"),
    ("subprocess", "subprocess.call"),
    ("partial", "functools.partial"),
])
def test_hostile_pickle_is_refused_without_running(tmp_path: Path, kind: str, global_name: str) -> None:
    marker = tmp_path / "pwned"
    reduce = {
        "os.system": (os.system, (f"touch {marker}",)),
        "eval": (eval, (f"open({str(marker)!r}, 'w').close()",)),
        "subprocess": (subprocess.call, (["touch", str(marker)],)),
        "partial": (functools.partial(os.system, f"touch {marker}"), ()),
    }[kind]
    image, text = tiny_params()
    text["text_encoder/proj"]["b"] = _Hostile(reduce)  # after some valid arrays
    path = dump(tmp_path / "c.pkl", {"params": (image, text)})
    with pytest.raises(UserError, match=f"refused to unpickle {global_name}"):
        read_cloob_params(path, TINY)
    assert not marker.exists()


def test_corrupt_pickles(tmp_path: Path) -> None:
    good = pickle.dumps({"params": tiny_params()})
    for name, data in (("truncated.pkl", good[: len(good) // 2]), ("empty.pkl", b""),
                       ("garbage.pkl", bytes(range(256)))):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(UserError, match=rf"{name}.*truncated or corrupt"):
            read_cloob_params(tmp_path / name, TINY)


def test_hash_in_file_name_is_verified(tmp_path: Path) -> None:
    data = pickle.dumps({"params": tiny_params()})
    actual = hashlib.sha256(data).hexdigest()
    wrong = tmp_path / f"cloob_model-{'0' * 64}.pkl"
    wrong.write_bytes(data)
    with pytest.raises(UserError, match=rf"cloob_model-0+\.pkl.*000000000000.*{actual[:12]}"):
        read_cloob_params(wrong, TINY)
    right = tmp_path / f"cloob_model-{actual}.pkl"
    right.write_bytes(data)
    read_cloob_params(right, TINY)


def test_structure_errors_are_named(tmp_path: Path) -> None:
    def check(obj: Any, pattern: str) -> None:
        with pytest.raises(UserError, match=pattern):
            read_cloob_params(dump(tmp_path / "c.pkl", obj), TINY)

    check([1, 2], r"expected a pickled dict")
    check({"params": 1}, r"expected a pickled dict")
    image, text = tiny_params()
    check({"params": (image, {})}, r"missing text module\(s\) text_encoder/proj")
    check({"params": (image, {**text, "text_encoder/layer_9/x": {}})}, r"unexpected text module.*layer_9")
    check({"params": (image, {"text_encoder/proj": {"w": text["text_encoder/proj"]["w"]}})},
          r"text_encoder/proj lacks parameter\(s\) b")
    check({"params": (image, {"text_encoder/proj": {"w": np.ones((3, 2), np.float32), "b": np.zeros(3)}})},
          r"text_encoder/proj/w has shape \[3, 2\], the CLOOB config expects \[2, 3\]")
    check({"params": (image, {"text_encoder/proj": {"w": np.ones((2, 3), np.int64), "b": np.zeros(3)}})},
          r"text_encoder/proj/w is int64, expected a float array")


def test_load_cloob_names_missing_parameter(seed3_dir: Path, small_config: dict[str, Any],
                                            tmp_path: Path) -> None:
    image, text = read_cloob_params(seed3_dir / "cloob.pkl", cloob_param_shapes(small_config))
    del image["vi_t_image_encoder/layer_0/feed_forward/linear_1"]["b"]
    path = dump(tmp_path / "cloob.pkl", {"params": (image, text), "epoch": 16})
    with pytest.raises(UserError, match=r"cloob\.pkl.*feed_forward/linear_1 lacks parameter\(s\) b"):
        load_cloob(path, small_config)
    with pytest.raises(UserError, match="not found"):
        load_cloob(tmp_path / "absent.pkl", small_config)


# --- image prompts --------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("width", "first_column"), [(97, 16), (99, 18)])
def test_center_crop_rounds_like_torchvision(tmp_path: Path, width: int, first_column: int) -> None:
    # (97 - 64) / 2 = 16.5 and (99 - 64) / 2 = 17.5: Python's round goes to the even neighbour.
    ramp = np.broadcast_to(np.arange(width, dtype=np.uint8)[None, :, None], (64, width, 3))
    Image.fromarray(np.ascontiguousarray(ramp)).save(tmp_path / "ramp.png")
    pixels = load_image_prompt(tmp_path / "ramp.png", 64)
    assert math.isclose(float(pixels[0, 0, 0, 0]) * 255, first_column, abs_tol=1e-4)


def test_short_side_rounding_leaves_zero_edge_like_torchvision(tmp_path: Path) -> None:
    # 64 / 49 * 49 = 63.99...: the original resizes to 63x63 and torchvision pads the crop's far edges with 0.
    Image.new("RGB", (49, 49), (255, 255, 255)).save(tmp_path / "white.png")
    pixels = load_image_prompt(tmp_path / "white.png", 64)
    assert pixels[..., :63, :63].min() == 1.0
    assert pixels[..., 63, :].max() == 0.0 and pixels[..., :, 63].max() == 0.0


def test_pixels_are_torchvisions_to_tensor_bit_for_bit() -> None:
    """``to_array`` (numpy: a run without torch reads image prompts with it) gives the float32 values of
    torchvision's ``to_tensor`` (bytes as float, divided by 255) for every byte value."""
    values = np.arange(256, dtype=np.uint8)
    rgb = np.stack([values, values[::-1], np.roll(values, 7)], axis=-1).reshape(16, 16, 3)
    want = torch.from_numpy(rgb.copy()).permute(2, 0, 1).unsqueeze(0).float().div(255)
    got = to_array(Image.fromarray(rgb))
    assert got.shape == (1, 3, 16, 16) and got.dtype == np.float32 and got.flags.c_contiguous
    assert np.array_equal(got.view(np.uint32), want.contiguous().numpy().view(np.uint32))


def test_image_modes_become_rgb(tmp_path: Path) -> None:
    Image.new("LA", (80, 64), (128, 200)).save(tmp_path / "gray.png")
    pixels = load_image_prompt(tmp_path / "gray.png", 64)
    assert pixels.shape == (1, 3, 64, 64)
    assert math.isclose(float(pixels.mean()) * 255, 128, abs_tol=1e-3)


def test_unreadable_image_prompts(tmp_path: Path) -> None:
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(UserError, match=r"notes\.png.*not a readable image"):
        load_image_prompt(tmp_path / "notes.png", 64)
    with pytest.raises(UserError, match=r"missing\.png"):
        load_image_prompt(tmp_path / "missing.png", 64)
    with pytest.raises(UserError, match="URLs are not fetched"):
        load_image_prompt("https://example.com/cat.png", 64)

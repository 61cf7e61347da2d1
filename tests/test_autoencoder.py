"""The autoencoder's two halves: checkpoint layout of the original, the decoder's golden output, config and load
errors, dynamic shapes; the encoder's layout, strict loading and posterior mean."""

from __future__ import annotations

import json
import locale
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from ccld_trt.export.autoencoder import (
    AutoencoderDecoder,
    AutoencoderEncoder,
    autoencoder_state_shapes,
    load_autoencoder,
    load_autoencoder_config,
    load_decoder,
)
from ccld_trt.export.errors import UserError

SPECS = Path(__file__).resolve().parents[2] / "shared" / "reference" / "specs"
# A cheap config for checkpoints the tests write themselves: 4x upsampling, an extra attention level.
TINY: dict[str, Any] = {"double_z": True, "z_channels": 4, "resolution": 64, "in_channels": 3, "out_ch": 3,
                        "ch": 32, "ch_mult": [1, 2, 2], "num_res_blocks": 1, "attn_resolutions": [32],
                        "dropout": 0.0}


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out - ref).norm() / ref.norm())


def write_yaml(path: Path, embed_dim: int = 4, ddconfig: dict[str, Any] = TINY) -> Path:
    doc = {"model": {"target": "ldm.models.autoencoder.AutoencoderKL",
                     "params": {"embed_dim": embed_dim, "lossconfig": {"target": "torch.nn.Identity"},
                                "ddconfig": ddconfig}}}
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tiny_state() -> dict[str, torch.Tensor]:
    """A full AutoencoderKL state dict (encoder included) plus a loss tensor, as ldm training saves."""
    gen = torch.Generator().manual_seed(0)
    state = {k: torch.randn(s, generator=gen) * 0.1 for k, s in autoencoder_state_shapes(4, TINY).items()}
    return {**state, "loss.logvar": torch.zeros([])}


@pytest.mark.parametrize(("spec", "config"), [("ae_small", "small"), ("ae_kl_f8", "kl_f8")])
def test_checkpoint_layout_matches_the_original(spec: str, config: str) -> None:
    if not (SPECS / f"{spec}.json").exists():
        pytest.skip(f"reference specs not found at {SPECS}")
    ddconfig = json.loads((SPECS / "ae_configs.json").read_text())[config]
    expected = {k: tuple(v) for k, v in json.loads((SPECS / f"{spec}.json").read_text()).items()}
    shapes = autoencoder_state_shapes(4, ddconfig)
    assert list(shapes) == list(expected)
    assert shapes == expected


def test_decoder_is_the_decoding_part_of_the_checkpoint() -> None:
    full = autoencoder_state_shapes(4, TINY)
    with torch.device("meta"):
        decoder = AutoencoderDecoder(4, TINY)
    own = {k: tuple(v.shape) for k, v in decoder.state_dict().items()}
    assert own == {k: s for k, s in full.items() if k.startswith(("decoder.", "post_quant_conv."))}
    assert "decoder.up.1.attn.0.q.weight" in own  # attn_resolutions [32]: the middle level at 64 // 2


def test_golden_output(seed3_decoder: AutoencoderDecoder, golden: dict[str, np.ndarray]) -> None:
    with torch.no_grad():
        img = seed3_decoder(torch.from_numpy(golden["ae_z"]))
    assert rel_error(img, torch.from_numpy(golden["ae_img"])) <= 1e-4


def test_non_square_latents(seed3_decoder: AutoencoderDecoder) -> None:
    with torch.no_grad():
        img = seed3_decoder(torch.randn([1, 4, 24, 40], generator=torch.Generator().manual_seed(0)))
    assert img.shape == (1, 3, 192, 320)
    assert torch.isfinite(img).all()


# See test_unet.py for why these two warnings are expected.
@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")
def test_onnx_export_has_dynamic_batch_and_size(seed3_decoder: AutoencoderDecoder, tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    dims = {0: "n", 2: "h", 3: "w"}
    torch.onnx.export(seed3_decoder, (torch.randn([1, 4, 16, 16]),), tmp_path / "ae.onnx", input_names=["z"],
                      output_names=["image"], dynamic_axes={"z": dims, "image": dims}, dynamo=False)
    session = ort.InferenceSession(str(tmp_path / "ae.onnx"), providers=["CPUExecutionProvider"])
    z = torch.randn([2, 4, 8, 12])
    (img,) = session.run(None, {"z": z.numpy()})
    with torch.no_grad():
        ref = seed3_decoder(z)
    assert rel_error(torch.from_numpy(img), ref) <= 1e-4


@pytest.mark.parametrize("wrap", [False, True])
def test_load_accepts_plain_and_ldm_checkpoints(tmp_path: Path, tiny_state: dict[str, torch.Tensor],
                                                 wrap: bool) -> None:
    torch.save({"state_dict": tiny_state} if wrap else tiny_state, tmp_path / "ae.ckpt")
    decoder = load_decoder(tmp_path / "ae.ckpt", write_yaml(tmp_path / "ae.yaml"))
    assert not decoder.training
    assert torch.equal(decoder.decoder.conv_out.weight, tiny_state["decoder.conv_out.weight"])
    with torch.no_grad():
        assert decoder(torch.randn([1, 4, 8, 12])).shape == (1, 3, 32, 48)


def test_load_names_missing_and_misshaped_tensors(tmp_path: Path, tiny_state: dict[str, torch.Tensor]) -> None:
    yaml_path = write_yaml(tmp_path / "ae.yaml")
    torch.save({k: v for k, v in tiny_state.items() if k != "decoder.mid.attn_1.k.bias"}, tmp_path / "a.ckpt")
    with pytest.raises(UserError, match=r"a\.ckpt.*missing 1 tensor.*decoder\.mid\.attn_1\.k\.bias"):
        load_decoder(tmp_path / "a.ckpt", yaml_path)
    torch.save({**tiny_state, "post_quant_conv.weight": torch.zeros([4, 8, 1, 1])}, tmp_path / "b.ckpt")
    with pytest.raises(UserError, match=r"b\.ckpt.*post_quant_conv\.weight has shape \[4, 8, 1, 1\]"):
        load_decoder(tmp_path / "b.ckpt", yaml_path)


def test_config_is_read(tmp_path: Path) -> None:
    assert load_autoencoder_config(write_yaml(tmp_path / "ae.yaml", 3)) == (3, TINY)


def test_a_utf8_config_is_read_while_the_locale_is_c(tmp_path: Path) -> None:
    """OpenVINO's compile switches the process's locale to "C" for its duration, while the main thread may be
    reading the model files: a config with a non-ASCII comment (a name, a dash) is still read, as UTF-8."""
    path = write_yaml(tmp_path / "ae.yaml", 3)
    path.write_bytes("# Bj\u00f6rn's autoencoder \u2014 f=8\n".encode() + path.read_bytes())
    found = locale.setlocale(locale.LC_CTYPE)
    locale.setlocale(locale.LC_CTYPE, "C")
    try:
        assert load_autoencoder_config(path) == (3, TINY)
    finally:
        locale.setlocale(locale.LC_CTYPE, found)


@pytest.mark.parametrize(("text", "problem"), [
    ("model: [unclosed\n", "not readable YAML"),
    ("- just\n- a list\n", "missing model.params"),
    ("model:\n  params:\n    ddconfig: {}\n", "model.params.embed_dim must be an integer"),
    ("model:\n  params:\n    embed_dim: 4\n", "missing model.params.ddconfig"),
])
def test_malformed_config_names_the_file(tmp_path: Path, text: str, problem: str) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=rf"broken\.yaml: {problem}"):
        load_autoencoder_config(path)


@pytest.mark.parametrize(("change", "problem"), [
    ({"ch_mult": None}, "ddconfig.ch_mult must be a list of integers"),
    ({"num_res_blocks": "2"}, "ddconfig.num_res_blocks must be an integer"),
    ({"attn_type": "linear"}, "ddconfig.attn_type='linear' is not supported"),
    ({"ch": 24}, r"ddconfig ch × ch_mult gives widths \[24, 48, 48\]"),
])
def test_unusable_ddconfig_is_named(tmp_path: Path, change: dict[str, Any], problem: str) -> None:
    path = write_yaml(tmp_path / "ae.yaml", ddconfig={**TINY, **change})
    with pytest.raises(UserError, match=rf"ae\.yaml: model\.params\.{problem}"):
        load_autoencoder_config(path)


def test_missing_config_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"autoencoder config not found: .*absent\.yaml"):
        load_autoencoder_config(tmp_path / "absent.yaml")


@pytest.mark.parametrize(("spec", "config"), [("ae_small", "small"), ("ae_kl_f8", "kl_f8")])
def test_encoder_state_matches_the_published_checkpoint(spec: str, config: str) -> None:
    """The encoder's own keys and shapes are exactly the published kl-f8's encoder.* and quant_conv.* tensors."""
    if not (SPECS / f"{spec}.json").exists():
        pytest.skip(f"reference specs not found at {SPECS}")
    ddconfig = json.loads((SPECS / "ae_configs.json").read_text())[config]
    expected = {k: tuple(v) for k, v in json.loads((SPECS / f"{spec}.json").read_text()).items()
                if k.startswith(("encoder.", "quant_conv."))}
    with torch.device("meta"):
        encoder = AutoencoderEncoder(4, ddconfig)
    own = {k: tuple(v.shape) for k, v in encoder.state_dict().items()}
    assert sorted(own) == sorted(expected)
    assert own == expected
    if config == "kl_f8":
        assert len(own) == 108 and own["encoder.down.2.downsample.conv.weight"] == (512, 512, 3, 3)


def test_encoder_is_loaded_as_strictly_as_the_decoder(tmp_path: Path, tiny_state: dict[str, torch.Tensor]) -> None:
    yaml_path = write_yaml(tmp_path / "ae.yaml")
    torch.save({"state_dict": tiny_state}, tmp_path / "ae.ckpt")
    encoder, decoder = load_autoencoder(tmp_path / "ae.ckpt", yaml_path)
    assert torch.equal(encoder.state_dict()["quant_conv.weight"], tiny_state["quant_conv.weight"])
    assert torch.equal(decoder.state_dict()["post_quant_conv.weight"], tiny_state["post_quant_conv.weight"])
    # a decoder-only file (encoder stripped) is refused, naming what is missing
    torch.save({k: v for k, v in tiny_state.items() if not k.startswith("encoder.")}, tmp_path / "dec.ckpt")
    with pytest.raises(UserError, match=r"dec\.ckpt: missing \d+ tensor\(s\): encoder\.conv_in\.weight"):
        load_autoencoder(tmp_path / "dec.ckpt", yaml_path)
    bad = {**tiny_state, "quant_conv.weight": torch.zeros(8, 8, 3, 3)}
    torch.save(bad, tmp_path / "bad.ckpt")
    with pytest.raises(UserError, match=r"tensor quant_conv\.weight has shape \[8, 8, 3, 3\], the model expects "
                                        r"\[8, 8, 1, 1\]"):
        load_autoencoder(tmp_path / "bad.ckpt", yaml_path)


def test_encoder_gives_the_posterior_mean(tmp_path: Path, tiny_state: dict[str, torch.Tensor]) -> None:
    """images [N, 3, H, W] -> the first embed_dim channels of quant_conv(encoder(x)) at H/4 x W/4 for the
    2-downsampling TINY config (H/8 for kl-f8), non-square and deterministic (no sample is drawn)."""
    torch.save(tiny_state, tmp_path / "ae.ckpt")
    encoder, _ = load_autoencoder(tmp_path / "ae.ckpt", write_yaml(tmp_path / "ae.yaml"))
    x = torch.rand(2, 3, 24, 40, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.inference_mode():
        mean = encoder(x)
        moments = encoder.quant_conv(encoder.encoder(x))
        again = encoder(x)
    assert mean.shape == (2, 4, 6, 10) and moments.shape == (2, 8, 6, 10)
    assert torch.equal(mean, moments[:, :4]) and torch.equal(mean, again)
    # each image on its own gives its own rows (no cross-batch mixing)
    with torch.inference_mode():
        assert rel_error(encoder(x[1:]), mean[1:]) < 1e-6

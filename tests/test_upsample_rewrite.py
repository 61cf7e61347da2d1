"""The decoder's upsampling convolutions in phase form: the same function as nearest 2x + 3x3 conv, at 16/36 of
the multiply-adds, and applied to the exported decoder only."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ccld_trt.benchmarks.flops import count_flops
from ccld_trt.export.autoencoder import AutoencoderDecoder, Upsample
from ccld_trt.export.onnx_export import traced_module
from ccld_trt.export.upsample_rewrite import PhaseUpsampleConv, fold_upsample_convs


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out - ref).norm() / ref.norm())


@pytest.mark.parametrize(("c_in", "c_out", "h", "w"), [(8, 8, 6, 6), (3, 5, 1, 7), (16, 4, 9, 4)])
def test_phase_form_equals_upsample_then_conv(c_in: int, c_out: int, h: int, w: int) -> None:
    gen = torch.Generator().manual_seed(c_in * 100 + h)
    conv = nn.Conv2d(c_in, c_out, 3, padding=1)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen))
        conv.bias.copy_(torch.randn(c_out, generator=gen))
    x = torch.randn(2, c_in, h, w, generator=gen)
    with torch.inference_mode():
        expected = conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        got = PhaseUpsampleConv(conv)(x)
    assert got.shape == (2, c_out, 2 * h, 2 * w)
    assert rel_error(got, expected) < 1e-6
    # edges and corners are where a wrong padding or phase shift shows first
    assert torch.allclose(got[..., [0, -1], :], expected[..., [0, -1], :], rtol=1e-5, atol=1e-5)
    assert torch.allclose(got[..., :, [0, -1]], expected[..., :, [0, -1]], rtol=1e-5, atol=1e-5)


def test_phase_form_does_16_of_36_multiply_adds_per_phase_window() -> None:
    conv = nn.Conv2d(8, 8, 3, padding=1)
    x = torch.zeros(1, 8, 10, 12)
    original = count_flops(Upsample(8).requires_grad_(False), x)
    assert original == 2 * 8 * 8 * 9 * 20 * 24
    # the 2x2 conv also computes one extra row and column of windows, cropped away by the phase shifts
    assert count_flops(PhaseUpsampleConv(conv), x) == 2 * 8 * (4 * 8) * 4 * 11 * 13


@pytest.mark.parametrize("conv", [nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 3, padding=1, stride=2),
                                  nn.Conv2d(4, 4, 1)])
def test_other_convolutions_are_refused(conv: nn.Conv2d) -> None:
    with pytest.raises(ValueError, match="3x3 conv with padding 1"):
        PhaseUpsampleConv(conv)


def test_folded_decoder_matches_and_leaves_the_original_alone(seed3_decoder: AutoencoderDecoder) -> None:
    folded = traced_module("decoder", seed3_decoder)
    n_upsamples = sum(isinstance(m, Upsample) for m in seed3_decoder.modules())
    assert n_upsamples > 0
    assert sum(isinstance(m, PhaseUpsampleConv) for m in folded.modules()) == n_upsamples
    assert not any(isinstance(m, Upsample) for m in folded.modules())
    assert sum(isinstance(m, Upsample) for m in seed3_decoder.modules()) == n_upsamples
    z = torch.randn(2, 4, 5, 7, generator=torch.Generator().manual_seed(0)) * 2.55
    with torch.inference_mode():
        assert rel_error(folded(z), seed3_decoder(z)) < 1e-5
    assert count_flops(folded, z) < count_flops(seed3_decoder, z)


def test_other_graphs_are_traced_unchanged() -> None:
    module = nn.Linear(2, 2)
    assert traced_module("unet", module) is module
    assert fold_upsample_convs(module) is not module

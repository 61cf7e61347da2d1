"""The torch backend's fp32 on CUDA is IEEE fp32: TF32 off around every call, torch's flags restored after."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ccld_trt.backends.torch_backend import TorchBackend, ieee_fp32
from ccld_trt.export.models import ModelFiles, load_networks


def tf32_flags() -> tuple[bool, bool]:
    return torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32


@pytest.mark.parametrize("before", [(True, True), (True, False), (False, False)])
def test_ieee_fp32_turns_tf32_off_inside_and_restores_after(before: tuple[bool, bool]) -> None:
    saved = tf32_flags()
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before
    try:
        with ieee_fp32():
            assert tf32_flags() == (False, False)
        assert tf32_flags() == before
        with pytest.raises(RuntimeError), ieee_fp32():
            raise RuntimeError("a failing call")
        assert tf32_flags() == before
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fp32_decoder_on_cuda_meets_the_component_tolerance(seed3_dir: Path, golden: dict[str, np.ndarray]) -> None:
    torch.backends.cudnn.allow_tf32 = True  # torch's default for convolutions: the backend must override it
    backend = TorchBackend(load_networks(ModelFiles.resolve(seed3_dir)), "cuda", "fp32")
    image = backend.decode(torch.from_numpy(golden["ae_z"])).cpu().numpy()
    ref = golden["ae_img"]
    # IEEE fp32 on a GPU differs from the CPU by float rounding (~1e-6); TF32 convolutions by ~1e-3
    assert np.linalg.norm(image - ref) / np.linalg.norm(ref) <= 2e-5

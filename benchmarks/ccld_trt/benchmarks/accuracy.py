"""Correctness of a backend's end-to-end output against torch fp32 on the same seed: latents error, pixel
PSNR, and the verdict "fast but wrong"."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ccld_trt.benchmarks.stages import EndToEndOutput

# Thresholds of "fast but wrong", against torch fp32 on the same seed
MAX_FP32_LATENTS_REL_ERROR = 1e-3
MIN_REDUCED_PSNR_DB = 35.0


def latents_rel_error(latents: torch.Tensor, reference: torch.Tensor) -> float:
    """||latents - reference|| / ||reference|| (Frobenius norms, float64)."""
    diff = (latents.double() - reference.double()).norm()
    return float(diff / reference.double().norm().clamp_min(1e-30))


def psnr_db(pixels: np.ndarray, reference: np.ndarray) -> float:
    """PSNR of uint8 pixels against reference pixels in dB; inf when identical."""
    mse = float(np.mean((pixels.astype(np.float64) - reference.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * float(np.log10(255.0**2 / mse))


def judge(precision: str, rel_error: float, psnr: float) -> str | None:
    """Why a result is "fast but wrong", or None: fp32 must match torch fp32 latents to 1e-3 relative;
    reduced precisions must keep the pixels above 35 dB PSNR."""
    if precision == "fp32" and not rel_error <= MAX_FP32_LATENTS_REL_ERROR:
        return f"fp32 latents rel error {rel_error:.2e} > {MAX_FP32_LATENTS_REL_ERROR:.0e}"
    if precision != "fp32" and not psnr >= MIN_REDUCED_PSNR_DB:
        return f"{precision} pixels PSNR {psnr:.1f} dB < {MIN_REDUCED_PSNR_DB:.0f} dB"
    return None


def correctness(precision: str, out: EndToEndOutput, reference: EndToEndOutput) -> dict[str, Any]:
    """The correctness fields of an end-to-end Record: ``latents_rel_error``, ``psnr_db`` (None when the
    pixels are identical), ``pixels_max_abs_diff``, ``flag_reason`` (see judge) and ``flagged``."""
    rel_error = latents_rel_error(out.latents, reference.latents)
    psnr = psnr_db(out.pixels, reference.pixels)
    reason = judge(precision, rel_error, psnr)
    return {"latents_rel_error": rel_error, "psnr_db": None if psnr == float("inf") else psnr,
            "pixels_max_abs_diff": int(np.abs(out.pixels.astype(np.int16) - reference.pixels).max()),
            "flag_reason": reason, "flagged": reason is not None}


def thresholds() -> dict[str, float]:
    """The thresholds, as the report's ``run.thresholds`` states them."""
    return {"fp32_latents_rel_error": MAX_FP32_LATENTS_REL_ERROR, "reduced_precision_psnr_db": MIN_REDUCED_PSNR_DB}

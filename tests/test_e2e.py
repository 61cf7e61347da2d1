"""The golden end-to-end cases through the CLI: the original pipeline's latents and pixels, reproduced."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ccld_trt.cli import run

FIXTURES = Path(__file__).resolve().parent / "fixtures"

CASES = ["e2e_plms", "e2e_ddim", "e2e_prk", "e2e_pie", "e2e_plms2", "e2e_ddpm", "e2e_multi"]


def rel_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a.astype(np.float64) - b) / np.linalg.norm(b.astype(np.float64)))


def sample_case(case: dict, models: Path, out: Path, backend: str = "torch",
                *extra: str) -> tuple[np.ndarray, np.ndarray]:
    """Run one e2e case through ``ccld-trt sample`` (``extra``: more flags); returns (latents, pixels [n, H, W, 3])."""
    args = ["sample", *case["prompt_list"], "--models", str(models), "-n", str(case["n"]),
            "--seed", str(case["seed"]), "--steps", str(case["steps_n"]), "--method", case["method"],
            "--output-dir", str(out / "png"), "--save-latents", str(out / "latents.npy"), "--backend", backend, *extra]
    if case["image_prompts"]:
        args += ["--images", *(f"{FIXTURES / name}:{w}" for name, w in case["image_prompts"])]
    assert run(args) == 0
    pngs = sorted((out / "png").glob("out_*.png"))
    assert [p.name for p in pngs] == [f"out_{i:05}.png" for i in range(case["n"])]
    return np.load(out / "latents.npy"), np.stack([np.asarray(Image.open(p)) for p in pngs])


@pytest.mark.parametrize("name", CASES)
def test_golden_case_torch(name, e2e_cases, golden, seed3_dir, tmp_path):
    latents, pixels = sample_case(e2e_cases[name], seed3_dir, tmp_path)
    assert latents.dtype == np.float32 and latents.shape == golden[f"{name}_latents"].shape
    assert rel_error(latents, golden[f"{name}_latents"]) <= 1e-3
    diff = np.abs(pixels.astype(int) - golden[f"{name}_pixels"].astype(int))
    assert diff.max() <= 2

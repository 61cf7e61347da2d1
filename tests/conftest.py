"""Shared fixtures: synthetic checkpoints written by the project's own demo-weights code."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture(scope="session")
def seed3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Small checkpoints of seed 3: the files the golden outputs were computed from."""
    from ccld_trt.export.demo_weights import write_demo_weights

    directory = tmp_path_factory.mktemp("seed3")
    write_demo_weights(directory, "small", seed=3)
    return directory


@pytest.fixture(scope="session")
def seed3_decoder(seed3_dir: Path) -> torch.nn.Module:
    """The autoencoder decoder of ``seed3_dir`` (AutoencoderDecoder)."""
    from ccld_trt.export.autoencoder import load_decoder

    return load_decoder(seed3_dir / "ae_model.ckpt", seed3_dir / "ae_model.yaml")


@pytest.fixture(scope="session")
def golden() -> dict[str, np.ndarray]:
    with np.load(FIXTURES / "golden.npz") as g:
        return {k: g[k] for k in g.files}


@pytest.fixture(scope="session")
def e2e_cases() -> dict[str, dict]:
    return json.loads((FIXTURES / "e2e_cases.json").read_text())

"""Shared fixtures: synthetic checkpoints written by the project's own demo-weights code."""

from __future__ import annotations

import json
import shutil
from collections.abc import Generator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from ccld_trt.export.quiet_imports import quiet_telemetry

quiet_telemetry()  # before any test imports OpenVINO or ONNX Runtime its own way: no test phones home

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


# The suite writes many checkpoints and graph files (over 20 GB in all): a module's directories go when it ends, so
# a run needs a few GB of disk at a time, not all of it (pyproject's retention policy does the same for tmp_path).
_MODULE_DIRS: dict[Any, list[Path]] = {}


@pytest.hookimpl(wrapper=True)
def pytest_fixture_setup(fixturedef: pytest.FixtureDef[Any],
                         request: pytest.FixtureRequest) -> Generator[None, Any, Any]:
    """Records the directories a module-scoped fixture makes with ``tmp_path_factory.mktemp``."""
    if fixturedef.scope != "module":
        return (yield)
    factory = request.config._tmp_path_factory  # type: ignore[attr-defined]  # what the tmp_path_factory fixture returns
    made = _MODULE_DIRS.setdefault(fixturedef, [])
    real = factory.mktemp

    def mktemp(basename: str, numbered: bool = True) -> Path:
        made.append(real(basename, numbered))
        return made[-1]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(factory, "mktemp", mktemp)
        return (yield)


def pytest_fixture_post_finalizer(fixturedef: pytest.FixtureDef[Any], request: pytest.FixtureRequest) -> None:
    """Removes a module-scoped fixture's directories after its teardown, unless a test has failed (kept to look at)."""
    for path in _MODULE_DIRS.pop(fixturedef, []):
        if not request.session.testsfailed:
            shutil.rmtree(path, ignore_errors=True)

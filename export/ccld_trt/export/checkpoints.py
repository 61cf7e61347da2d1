"""Checkpoint files as data: safe loading, hashing and state-dict checks with one-line errors."""

from __future__ import annotations

import hashlib
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ccld_trt.export.errors import UserError


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def require_file(path: Path, what: str) -> Path:
    """The path if it is a readable file, else a UserError naming it."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{what} not found: {path}")
    if not path.is_file():
        raise UserError(f"{what} is not a file: {path}")
    return path


def load_torch_checkpoint(path: Path, what: str) -> dict[str, torch.Tensor]:
    """Load a torch.save'd state dict with weights_only=True (no code runs).

    Accepts a plain ``{name: tensor}`` dict or ldm's ``{'state_dict': {...}}``; returns the flat dict.
    """
    path = require_file(path, what)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{what} {path}: refused to load (not plain tensor data): {first}") from e
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{what} {path}: not a readable torch checkpoint (truncated or corrupt?): {first}") from e
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{what} {path}: expected a state dict of tensors, got {type(obj).__name__}")
    return dict(obj)


def _some(names: list[str], shown: int = 5) -> str:
    """The first ``shown`` names, and how many more there are."""
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def load_state_into(module: nn.Module, state: Mapping[str, torch.Tensor], path: Path, what: str,
                    ignore_prefixes: tuple[str, ...] = ()) -> None:
    """Copy ``state`` into ``module`` strictly: missing tensors and shape mismatches are named.

    Keys starting with one of ``ignore_prefixes`` (e.g. an encoder when only decoding) are skipped.
    """
    expected = module.state_dict()
    state = {k: v for k, v in state.items() if not k.startswith(ignore_prefixes)}
    missing = [k for k in expected if k not in state]
    if missing:
        raise UserError(f"{what} {path}: missing {len(missing)} tensor(s): {_some(missing)}")
    unexpected = [k for k in state if k not in expected]
    if unexpected:
        raise UserError(f"{what} {path}: unexpected tensor(s): {_some(unexpected)}")
    for k, v in expected.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise UserError(f"{what} {path}: tensor {k} has shape {list(state[k].shape)}, "
                            f"the model expects {list(v.shape)}")
    module.load_state_dict({k: state[k].float() for k in expected}, strict=True)

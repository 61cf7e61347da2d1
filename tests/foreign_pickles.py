"""Pickles that name other packages' globals (Lightning, omegaconf, jax, haiku), written without those packages.

``pickle`` stores a class or function as its module path and name, and checks at write time that importing that
path gives the object back. ``under(module, **objects)`` registers throw-away modules in ``sys.modules`` for as
long as the pickle is written, so the bytes are what the real packages would write, yet nothing is installed.
"""

from __future__ import annotations

import contextlib
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch


@contextlib.contextmanager
def under(module: str, **objects: Any) -> Iterator[None]:
    """Make ``module`` (and its parent packages) importable with ``objects`` in it, for the block only."""
    parts = module.split(".")
    names = [".".join(parts[: i + 1]) for i in range(len(parts))]
    saved = {name: sys.modules.get(name) for name in names}
    for name in names:
        sys.modules[name] = types.ModuleType(name)
    for name, obj in objects.items():
        obj.__module__, obj.__qualname__ = module, name
        setattr(sys.modules[module], name, obj)
    try:
        yield
    finally:
        for name, previous in saved.items():
            if previous is None:
                del sys.modules[name]
            else:
                sys.modules[name] = previous


class ModelCheckpoint:
    """Pickled as ``pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint`` (a class used as a dict key)."""


class DictConfig:
    """Pickled as ``omegaconf.dictconfig.DictConfig``: an object whose state is a dict (NEWOBJ + BUILD)."""

    def __init__(self, content: dict[str, Any]) -> None:
        self._content = content
        self._metadata = {"ref_type": Any, "object_type": dict}


class AttributeDict(dict):
    """Pickled as ``pytorch_lightning.utilities.parsing.AttributeDict``: a dict subclass (NEWOBJ + SETITEMS)."""


def write_lightning_checkpoint(path: Path, state_dict: dict[str, torch.Tensor], extra: Any = None) -> Path:
    """``state_dict`` inside a PyTorch Lightning 1.4-style *training* checkpoint, as CompVis's kl-f8 ``model.ckpt``.

    ``extra`` (anything picklable, e.g. a hostile object) goes into the ``callbacks`` entry.
    """
    callback_state = {"monitor": "val/rec_loss", "best_model_score": torch.tensor(0.125),
                      "best_model_path": "/logs/checkpoints/last.ckpt", "current_score": np.float64(0.13),
                      "dirpath": "/logs/checkpoints", "extra": extra}
    checkpoint = {
        "epoch": 7, "global_step": 123456, "pytorch-lightning_version": "1.4.2",
        "callbacks": {ModelCheckpoint: callback_state},
        "optimizer_states": [{"state": {0: {"step": 10, "exp_avg": torch.zeros(3)}},
                              "param_groups": [{"lr": np.float32(4.5e-6), "betas": (0.5, 0.9), "params": [0]}]}],
        "lr_schedulers": [],
        "hparams_name": "kwargs",
        "hyper_parameters": DictConfig({"embed_dim": 4, "lossconfig": {"target": "ldm.modules.losses.X"}}),
        "extra_hparams": AttributeDict(learning_rate=4.5e-6, dtype=np.dtype("float32")),
        "state_dict": state_dict,
    }
    with (under("pytorch_lightning.callbacks.model_checkpoint", ModelCheckpoint=ModelCheckpoint),
          under("pytorch_lightning.utilities.parsing", AttributeDict=AttributeDict),
          under("omegaconf.dictconfig", DictConfig=DictConfig)):
        torch.save(checkpoint, path)
    return path


def _reconstruct_array(rebuild: Any, args: Any, array_state: Any, aval_state: Any) -> Any:
    raise AssertionError("never called: only its module path and name are written")


class JaxArray:
    """Pickles as jax's ``jax._src.array._reconstruct_array`` applied to the numpy array's own reduce tuple."""

    def __init__(self, value: np.ndarray) -> None:
        self.value = value

    def __reduce__(self) -> tuple[Any, ...]:
        rebuild, args, state = self.value.__reduce__()  # type: ignore[str-unpack,misc]
        return (_reconstruct_array, (rebuild, args, state, {"weak_type": False}))


def _flat_mapping(data: Any) -> Any:
    raise AssertionError("never called: only its module path and name are written")


class FlatMapping(dict):
    """Pickles as haiku's ``haiku._src.data_structures.FlatMapping(dict_of_contents)``."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (_flat_mapping, (dict(self),))


def as_jax_haiku(params: dict[str, dict[str, np.ndarray]]) -> FlatMapping:
    """A haiku params dict as a haiku checkpoint saved from jax holds it: FlatMappings of jax arrays."""
    return FlatMapping({m: FlatMapping({k: JaxArray(v) for k, v in p.items()}) for m, p in params.items()})


def dumps_jax_haiku(obj: Any) -> bytes:
    """``pickle.dumps(obj)`` with the jax and haiku globals under their real names."""
    import pickle

    with (under("jax._src.array", _reconstruct_array=_reconstruct_array),
          under("haiku._src.data_structures", FlatMapping=_flat_mapping)):
        return pickle.dumps(obj)

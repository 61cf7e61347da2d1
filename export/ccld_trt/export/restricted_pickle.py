"""A restricted ``pickle_module`` for ``torch.load``: real-world training checkpoints as data, never as code.

Lightning training checkpoints (CompVis ldm, Stable Diffusion 1.x ``.ckpt``) pickle more than tensors: the
``ModelCheckpoint`` class as a dict key, numpy scalars, omegaconf hyper-parameters, optimizer states. This module
resolves every global a pickle names through one gate:

* what ``torch.load(weights_only=True)`` trusts (tensor, storage and dtype rebuilding) resolves to torch's own
  objects, so tensors are rebuilt exactly as ``weights_only`` does;
* classes and functions of packages that only describe training (Lightning, omegaconf, numpy scalars and
  dtypes, typing, plain builtin types) become :class:`Inert` stand-ins that record what they are given and are
  never called on anything;
* every other global (``os.system``, ``builtins.eval``, ``subprocess.Popen``, ...) is refused, wherever it sits.

Why a pickle module rather than ``torch.serialization.safe_globals``: that list is exact names only, and
torch's unpickler fills only plain dicts, so Lightning's ``AttributeDict`` hyper-parameters (a dict subclass) or
a whole package (``pytorch_lightning.*``) cannot be admitted; it is also process-global state, changed under
the web demo's loader thread. The trusted tensor set is still torch's own.
"""

from __future__ import annotations

import _compat_pickle
import pickle
from functools import cache
from typing import IO, Any

from torch import _weights_only_unpickler

# Packages whose globals a training checkpoint names only to describe training, never to build weights.
METADATA_PACKAGES = ("pytorch_lightning", "lightning", "lightning_fabric", "omegaconf", "numpy", "typing")
# Single globals of the same kind: plain types named as values (omegaconf's ref_type=dict, ...).
METADATA_GLOBALS = frozenset({
    "argparse.Namespace", "collections.defaultdict", "pathlib.Path", "pathlib.PosixPath", "pathlib.WindowsPath",
    "builtins.dict", "builtins.list", "builtins.tuple", "builtins.str", "builtins.int", "builtins.float",
    "builtins.bool", "builtins.bytes", "builtins.object", "builtins.frozenset", "builtins.type",
})


class Inert:
    """Stands in for a class or function named by a checkpoint: it keeps what it is given and does nothing.

    Calling the stand-in (pickle's REDUCE/NEWOBJ) makes an instance; the instance accepts pickle's BUILD
    (``__setstate__``), SETITEMS (dict subclasses) and APPENDS (list subclasses) and stores them as plain data.
    """

    pickled_name = "?"
    args: tuple[Any, ...]
    state: Any
    entries: dict[Any, Any]
    elements: list[Any]

    def __new__(cls, *args: Any, **kwargs: Any) -> Inert:
        # pickle's NEWOBJ calls __new__ alone, REDUCE calls the class: set everything up here.
        self = super().__new__(cls)
        self.args = args
        self.state = None
        self.entries = {}
        self.elements = []
        return self

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:
        self.entries[key] = value

    def append(self, value: Any) -> None:
        self.elements.append(value)

    def extend(self, values: list[Any]) -> None:
        self.elements.extend(values)

    def __repr__(self) -> str:
        return f"<inert {self.pickled_name}>"


class RefusedGlobal(pickle.UnpicklingError):
    """A pickle names a global that could run code. ``name`` is its full dotted name."""

    def __init__(self, name: str) -> None:
        super().__init__(f"it references {name}, which is code, not data (only tensors, plain containers, "
                         "numpy scalars and Lightning/omegaconf metadata are accepted)")
        self.name = name


def is_metadata(module: str, name: str) -> bool:
    """Whether ``module.name`` belongs to what training metadata may name (see ``METADATA_PACKAGES``)."""
    return module.split(".", 1)[0] in METADATA_PACKAGES or f"{module}.{name}" in METADATA_GLOBALS


@cache
def stand_in(full_name: str) -> type[Inert]:
    """One :class:`Inert` subclass per pickled name, so a class used as a dict key stays one key."""
    module, _, name = full_name.rpartition(".")
    return type(name, (Inert,), {"pickled_name": full_name, "__module__": f"ccld_trt.inert.{module}"})


class Unpickler(pickle.Unpickler):
    """``pickle.Unpickler`` whose globals are torch's weights-only set, inert stand-ins, or refused."""

    def find_class(self, module: str, name: str) -> Any:
        # Protocol 2 (torch.save's) names Python 2 modules (__builtin__.dict): map them as pickle itself does.
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        full_name = f"{module}.{name}"
        trusted = _weights_only_unpickler._get_allowed_globals()
        if full_name in trusted:
            return trusted[full_name]
        if is_metadata(module, name):
            return stand_in(full_name)
        raise RefusedGlobal(full_name)


def load(file: IO[bytes], **kwargs: Any) -> Any:
    """``pickle.load`` through :class:`Unpickler` (torch's legacy format calls the module-level ``load``)."""
    return Unpickler(file, **kwargs).load()

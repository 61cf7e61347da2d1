"""Reading CLOOB's haiku pickle without running code from it, and mapping its parameters to torch names.

The file is ``pickle.dump({'params': (image_params, text_params), 'epoch': ...})`` where each params dict is
haiku's ``{module_path: {param_name: ndarray}}``. Only what numpy needs to rebuild arrays is admitted, plus
stand-ins for the two jax/haiku types such a pickle may hold instead (jax arrays, haiku ``FlatMapping`` dicts),
which rebuild numpy arrays and plain dicts without importing jax or haiku.
"""

from __future__ import annotations

import codecs
import pickle
import re
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ccld_trt.export.errors import UserError, first_line, require_file
from ccld_trt.export.file_digests import sha256_file

WHAT = "CLOOB checkpoint"

ParamShapes = dict[str, dict[str, tuple[int, ...]]]
HaikuParams = dict[str, dict[str, np.ndarray]]

try:  # numpy >= 1.26 (numpy 2 renamed numpy.core; pickles may name either)
    from numpy._core import multiarray as _multiarray
    from numpy._core import numeric as _numeric
except ImportError:  # pragma: no cover - older numpy
    from numpy.core import multiarray as _multiarray  # type: ignore[no-redef]
    from numpy.core import numeric as _numeric  # type: ignore[no-redef]


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    # Protocols 0-2 store bytes as _codecs.encode(str, 'latin1'); any other codec is not plain data.
    if encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"refused codec {encoding!r}")
    return codecs.encode(text, "latin1")


def _jax_array(rebuild: Any, args: tuple[Any, ...], array_state: tuple[Any, ...], aval_state: Any = None) -> np.ndarray:
    # A pickled jax array is the numpy array's own reduce tuple, wrapped; aval_state (weak_type...) is jax's only.
    if rebuild is not _multiarray._reconstruct:
        raise pickle.UnpicklingError("a jax array that is not a pickled numpy array")
    array = rebuild(*args)
    if not isinstance(array, np.ndarray):
        raise pickle.UnpicklingError("a jax array that is not a pickled numpy array")
    array.__setstate__(array_state)
    return array


def _haiku_mapping(data: Any) -> dict[Any, Any]:
    # Old haiku checkpoints pickle FlatMapping(FlatMap) as the class applied to a plain dict of its contents.
    if not isinstance(data, Mapping):
        raise pickle.UnpicklingError(f"a haiku mapping of a {type(data).__name__}, expected a dict")
    return dict(data)


_ALLOWED: dict[tuple[str, str], Any] = {
    ("jax._src.array", "_reconstruct_array"): _jax_array,
    ("jax._src.device_array", "reconstruct_device_array"): _jax_array,
    ("haiku._src.data_structures", "FlatMapping"): _haiku_mapping,
    ("haiku._src.data_structures", "FlatMap"): _haiku_mapping,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("builtins", "dict"): dict,
    ("builtins", "list"): list,
    ("builtins", "tuple"): tuple,
    ("builtins", "bytearray"): bytearray,
    ("collections", "OrderedDict"): OrderedDict,
    ("_codecs", "encode"): _latin1_encode,
}
for _core in ("numpy.core", "numpy._core"):
    _ALLOWED[(f"{_core}.multiarray", "_reconstruct")] = _multiarray._reconstruct
    _ALLOWED[(f"{_core}.multiarray", "scalar")] = _multiarray.scalar
    _ALLOWED[(f"{_core}.numeric", "_frombuffer")] = _numeric._frombuffer  # type: ignore[attr-defined]  # protocol 5


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that resolves only numpy array/scalar reconstruction and plain containers."""

    def __init__(self, file: Any, path: Path) -> None:
        super().__init__(file)
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise UserError(f"{WHAT} {self._path}: refused to unpickle {module}.{name} "
                            "(only numpy or jax arrays, haiku mappings and plain containers are allowed)") from None

    def persistent_load(self, pid: Any) -> Any:
        raise UserError(f"{WHAT} {self._path}: refused to unpickle a persistent reference")


_HASH_IN_NAME = re.compile(r"-([0-9a-f]{64})\.pkl$")


def verify_name_hash(path: Path) -> None:
    """If the file name ends in ``-<sha256>.pkl`` (as the released checkpoints do), check the contents."""
    match = _HASH_IN_NAME.search(path.name)
    if match is None:
        return
    expected, actual = match.group(1), sha256_file(path)
    if actual != expected:
        raise UserError(f"{WHAT} {path}: SHA-256 mismatch (the file name says {expected[:12]}…, "
                        f"the contents hash to {actual[:12]}…); the file is corrupt or incomplete")


def _describe(missing: list[str]) -> str:
    return ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")


def _check_part(part: Any, expected: ParamShapes, label: str, path: Path) -> HaikuParams:
    """Validate one params dict against its expected shapes; returns it with float32 arrays."""
    if not isinstance(part, Mapping):
        raise UserError(f"{WHAT} {path}: {label} params are a {type(part).__name__}, expected a dict")
    missing_modules = [m for m in expected if m not in part]
    if missing_modules:
        raise UserError(f"{WHAT} {path}: missing {label} module(s) {_describe(missing_modules)} "
                        "(does the CLOOB config match this checkpoint?)")
    unexpected = [str(m) for m in part if m not in expected]
    if unexpected:
        raise UserError(f"{WHAT} {path}: unexpected {label} module(s) {_describe(unexpected)} "
                        "(does the CLOOB config match this checkpoint?)")
    out: HaikuParams = {}
    for module, shapes in expected.items():
        params = part[module]
        if not isinstance(params, Mapping):
            raise UserError(f"{WHAT} {path}: {label} module {module} is a {type(params).__name__}, "
                            "expected a dict of arrays")
        missing = [p for p in shapes if p not in params]
        if missing:
            raise UserError(f"{WHAT} {path}: {label} module {module} lacks parameter(s) {', '.join(missing)}")
        extra = [str(p) for p in params if p not in shapes]
        if extra:
            raise UserError(f"{WHAT} {path}: {label} module {module} has unexpected parameter(s) "
                            f"{', '.join(extra)}")
        out[module] = {}
        for name, shape in shapes.items():
            value = params[name]
            if not isinstance(value, np.ndarray) or value.dtype.kind != "f":
                kind = value.dtype if isinstance(value, np.ndarray) else type(value).__name__
                raise UserError(f"{WHAT} {path}: {module}/{name} is {kind}, expected a float array")
            if value.shape != shape:
                raise UserError(f"{WHAT} {path}: {module}/{name} has shape {list(value.shape)}, "
                                f"the CLOOB config expects {list(shape)}")
            out[module][name] = value.astype(np.float32)
    return out


def read_cloob_params(path: Path, expected: tuple[ParamShapes, ParamShapes]) -> tuple[HaikuParams, HaikuParams]:
    """Safely load a CLOOB pickle and check it against ``expected`` = (image_shapes, text_shapes).

    Returns (image_params, text_params), haiku-style dicts of float32 ndarrays with the expected shapes.
    Raises UserError for a missing/corrupt file, a hash mismatch, a refused global or a structure mismatch.
    """
    path = require_file(Path(path), WHAT)
    verify_name_hash(path)
    try:
        with open(path, "rb") as f:
            obj = _ArrayUnpickler(f, path).load()
    except UserError:
        raise
    # A damaged pickle can fail in the unpickler or inside numpy's array rebuild with almost any error type.
    except Exception as e:
        raise UserError(f"{WHAT} {path}: not a readable pickle (truncated or corrupt?): {first_line(e)}") from e
    params = obj.get("params") if isinstance(obj, Mapping) else None
    if not isinstance(params, (tuple, list)) or len(params) != 2:
        raise UserError(f"{WHAT} {path}: expected a pickled dict {{'params': (image_params, text_params), ...}}")
    return (_check_part(params[0], expected[0], "image", path),
            _check_part(params[1], expected[1], "text", path))


def _linear(params: dict[str, np.ndarray], key: str) -> dict[str, torch.Tensor]:
    # haiku Linear stores w as [in, out]; torch wants [out, in].
    return {f"{key}.weight": torch.from_numpy(params["w"]).T.contiguous(),
            f"{key}.bias": torch.from_numpy(params["b"])}


def _layer_norm(params: dict[str, np.ndarray], key: str) -> dict[str, torch.Tensor]:
    return {f"{key}.weight": torch.from_numpy(params["scale"]),
            f"{key}.bias": torch.from_numpy(params["offset"])}


# Sub-paths inside "<encoder>/layer_<i>/" -> (torch sub-module, converter).
_LAYER_PARTS: dict[str, tuple[str, Callable[[dict[str, np.ndarray], str], dict[str, torch.Tensor]]]] = {
    "self_attention/layer_norm": ("attn.norm", _layer_norm),
    "self_attention/multi_head_attention/query": ("attn.query", _linear),
    "self_attention/multi_head_attention/key": ("attn.key", _linear),
    "self_attention/multi_head_attention/value": ("attn.value", _linear),
    "self_attention/multi_head_attention/linear": ("attn.out", _linear),
    "feed_forward/layer_norm": ("ff.norm", _layer_norm),
    "feed_forward/linear_0": ("ff.linear_0", _linear),
    "feed_forward/linear_1": ("ff.linear_1", _linear),
}


def _convert(params: HaikuParams, base: str) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for module, values in params.items():
        if module == base:  # the ViT's own parameters live at the encoder's root
            state["class_embed"] = torch.from_numpy(values["class_embed"])
            continue
        sub = module[len(base) + 1:]
        if sub == "embed" and "embeddings" in values:
            state["embed.weight"] = torch.from_numpy(values["embeddings"])
        elif sub == "embed":
            # Patch conv: haiku HWIO -> torch OIHW.
            state["embed.weight"] = torch.from_numpy(values["w"]).permute(3, 2, 0, 1).contiguous()
        elif sub == "pos_embed":
            state["pos_embed.weight"] = torch.from_numpy(values["w"])
        elif sub == "proj":
            state.update(_linear(values, "proj"))
        else:
            layer, _, part = sub.partition("/")
            torch_part, convert = _LAYER_PARTS[part]
            state.update(convert(values, f"layers.{int(layer.removeprefix('layer_'))}.{torch_part}"))
    return state


def haiku_to_torch(image_params: HaikuParams,
                   text_params: HaikuParams) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Convert checked haiku params to (image_state, text_state) for CLOOBImageEncoder / CLOOBTextEncoder.

    Same mapping as cloob-training's converter, with the encoders' own module names (no prefix).
    """
    return _convert(image_params, "vi_t_image_encoder"), _convert(text_params, "text_encoder")

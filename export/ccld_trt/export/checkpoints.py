"""Checkpoint files as data: safe loading, hashing and state-dict checks with one-line errors."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ccld_trt.export import restricted_pickle
from ccld_trt.export.atomic import write_atomic
from ccld_trt.export.errors import UserError, first_line, require_file
from ccld_trt.export.file_digests import SAFETENSORS_SUFFIX, safetensors_source, sha256_file


def _read_torch(path: Path, what: str) -> object:
    try:
        return torch.load(path, map_location="cpu", pickle_module=restricted_pickle, weights_only=False)
    except restricted_pickle.RefusedGlobal as e:
        raise UserError(f"{what} {path}: refused to load: {first_line(e)}") from e
    # A damaged file fails in the zip reader, the unpickler or a tensor rebuild, with almost any error type.
    except Exception as e:
        raise UserError(f"{what} {path}: not a readable torch checkpoint (truncated or corrupt?): "
                        f"{first_line(e)}") from e


def read_safetensors(path: Path, what: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(path, device="cpu")
    except Exception as e:  # safetensors raises its own error type, OSError or ValueError for a bad header
        raise UserError(f"{what} {path}: not a readable safetensors file (truncated or corrupt?): "
                        f"{first_line(e)}") from e


def load_checkpoint(path: Path, what: str) -> dict[str, torch.Tensor]:
    """Load a checkpoint's tensors as data: safetensors by extension, else ``torch.save`` output.

    A torch checkpoint may be a plain ``{name: tensor}`` dict, ldm's ``{'state_dict': {...}}``, or a whole
    Lightning training checkpoint: only its state dict is used, and nothing in the file runs
    (``restricted_pickle``). Raises UserError naming the file for anything else.
    """
    path = require_file(path, what)
    obj = read_safetensors(path, what) if path.suffix == SAFETENSORS_SUFFIX else _read_torch(path, what)
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise UserError(f"{what} {path}: expected a state dict of tensors, got {type(obj).__name__}")
    not_tensors = [str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise UserError(f"{what} {path}: expected a state dict of tensors, but {_some(not_tensors)} "
                        "are not tensors")
    return dict(obj)


def convert_to_safetensors(source: Path, what: str, source_sha256: str | None = None) -> Path:
    """Write the tensors of a torch checkpoint beside it as ``<name>.safetensors``; returns that path.

    The copy loads faster and with no pickle at all. Its header metadata keeps the source's file name and
    SHA-256 (``source_sha256`` when the caller has it already), so the copy can always be traced to the file it
    came from. An existing copy is replaced atomically; the source is left untouched.
    """
    from safetensors.torch import save

    source = require_file(source, what)
    if source.suffix == SAFETENSORS_SUFFIX:
        raise UserError(f"{what} {source}: already a safetensors file")
    # safetensors refuses tensors that share memory (tied or sliced weights): give each its own.
    state = {k: v.detach().clone().contiguous() for k, v in load_checkpoint(source, what).items()}
    target = source.with_suffix(SAFETENSORS_SUFFIX)
    digest = source_sha256 or sha256_file(source)
    write_atomic(target, save(state, metadata={"source": source.name, "source_sha256": digest}))
    return target


def safetensors_copy(source: Path, what: str) -> Path:
    """The up-to-date safetensors copy of a torch checkpoint: kept if its recorded source hash still matches,
    else (re)written by ``convert_to_safetensors``."""
    target = Path(source).with_suffix(SAFETENSORS_SUFFIX)
    digest = sha256_file(require_file(source, what))  # once: a checkpoint is hundreds of MiB
    if target.exists() and safetensors_source(target).get("source_sha256") == digest:
        return target
    return convert_to_safetensors(source, what, digest)


def _some(names: list[str], shown: int = 5) -> str:
    """The first ``shown`` names, and how many more there are."""
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def standard_normal(*shape: int) -> torch.Tensor:
    """N(0, 1) values of ``shape`` from torch's default generator, exactly as ``torch.randn(shape)`` draws them;
    on the meta device (a module built only to take a checkpoint's tensors) no values at all: drawing them there
    imports torch._dynamo, ~1 s of every process that loads the networks."""
    tensor = torch.empty(shape)
    return tensor if tensor.is_meta else tensor.normal_()


def load_state_into(module: nn.Module, state: Mapping[str, torch.Tensor], path: Path, what: str,
                    ignore_prefixes: tuple[str, ...] = ()) -> None:
    """Give ``module`` the tensors of ``state`` strictly: missing tensors and shape mismatches are named.

    ``module`` may be built on the meta device (no memory, no random init): every tensor it has must be in its
    state dict, so that none is left on meta. Keys starting with one of ``ignore_prefixes`` (e.g. an encoder when
    only decoding) are skipped.
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
    # assign: the module takes the tensors themselves (a mapped safetensors file's, or a pickle's), not copies
    module.load_state_dict({k: state[k].float() for k in expected}, strict=True, assign=True)
    left = [name for name, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if left:  # a tensor outside the state dict (a non-persistent buffer): the module must set it itself
        raise RuntimeError(f"{what}: {_some(left)} not in the state dict, left without data")

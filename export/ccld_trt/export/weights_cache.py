"""Converted safetensors copies of checkpoints published as pickles (the Lightning ``.ckpt`` files, the CLOOB
haiku pickle): made once, then memory-mapped instead of unpickled at every start.

A copy lives under ``<build>/weights/`` (``$CCLD_TRT_BUILD`` or ./build) as ``<source name>-<sha256[:16]>
.safetensors``, its header recording the source's name and full SHA-256 (as ``ccld-trt convert`` does). It is used
only while its recorded digest is the source's: a changed source (new digest) is converted again, never read
from the old copy. The source's digest is cached by (resolved path, size, mtime_ns) in ``digests.json`` beside
the copies, so an unchanged start hashes nothing; a file rewritten in place keeps neither size nor mtime.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ccld_trt.export.atomic import atomic_path, write_atomic
from ccld_trt.export.build_dir import build_root
from ccld_trt.export.errors import require_file
from ccld_trt.export.file_digests import SAFETENSORS_SUFFIX, cached_sha256, safetensors_source

if TYPE_CHECKING:  # which file to read is decided without torch (ModelFiles.resolve, as `sample` starts)
    import torch

log = logging.getLogger(__name__)

WEIGHTS_DIR = "weights"
DIGESTS = "digests.json"


def weights_dir(build_dir: Path | None = None) -> Path:
    """``<build>/weights`` (build_dir.build_root: ``build_dir``, else $CCLD_TRT_BUILD, else ./build)."""
    return build_root(build_dir) / WEIGHTS_DIR


def _read_digests(directory: Path) -> dict[str, dict[str, Any]]:
    try:
        cache = json.loads((directory / DIGESTS).read_text(encoding="utf-8"))
        return cache if isinstance(cache, dict) else {}
    except (OSError, ValueError):
        return {}


def source_sha256(source: Path, build_dir: Path | None = None) -> str:
    """SHA-256 of ``source``, from the digest cache while its size and mtime are unchanged (else hashed, and the
    cache updated when its directory is writable)."""
    directory = weights_dir(build_dir)
    cache = _read_digests(directory)
    before = json.dumps(cache, sort_keys=True)
    digest = cached_sha256(source, cache)
    if json.dumps(cache, sort_keys=True) != before:
        try:
            directory.mkdir(parents=True, exist_ok=True)
            write_atomic(directory / DIGESTS, json.dumps(cache, indent=1, sort_keys=True))
        except OSError:  # a read-only build directory: hashed again next time, nothing else lost
            pass
    return digest


def copy_path(source: Path, digest: str, build_dir: Path | None = None) -> Path:
    """Where the converted copy of ``source`` with SHA-256 ``digest`` lives."""
    return weights_dir(build_dir) / f"{Path(source).name}-{digest[:16]}{SAFETENSORS_SUFFIX}"


def matches(copy: Path, digest: str) -> bool:
    """Whether ``copy`` exists and records ``digest`` as its source's SHA-256."""
    try:
        return copy.is_file() and safetensors_source(copy).get("source_sha256") == digest
    except Exception:  # a damaged copy is not a match: it is converted again
        return False


def converted(source: Path, what: str, convert: Callable[[], Mapping[str, torch.Tensor]],
              build_dir: Path | None = None) -> dict[str, torch.Tensor]:
    """The tensors of ``source`` (a pickle): from its current converted copy, memory-mapped; else ``convert()``
    (which reads the source itself, with its own one-line errors) and a copy written for the next start (when the
    build directory is writable). ``what`` names the file in messages."""
    source = require_file(source, what)
    known = _read_digests(weights_dir(build_dir)).get(str(source.resolve()), {}).get("sha256")
    digest = source_sha256(source, build_dir)
    copy = copy_path(source, digest, build_dir)
    if matches(copy, digest):
        from ccld_trt.export.checkpoints import read_safetensors

        return read_safetensors(copy, f"{what} (converted copy of {source})")
    state = {k: v.detach().contiguous() for k, v in convert().items()}
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        # safetensors refuses tensors that share memory (tied or sliced weights): give those their own
        unique = _unshared(state)
        with atomic_path(copy) as tmp:  # written straight to the file: no second copy of the weights in memory
            save_file(unique, tmp, metadata={"source": source.name, "source_sha256": digest})
        message = f"converted {source} to {copy} (safetensors, read by mapping from now on)"
        if known and known != digest:  # said, not only logged: a model file changed under this build directory
            print(f"{what} {source} changed since it was last converted: {message}", file=sys.stderr)
        else:
            log.info(message)
    except (OSError, SafetensorError):  # a read-only build directory, a full disk: converted again next time
        pass
    return state


def _unshared(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    seen: set[int] = set()
    out = {}
    for k, v in state.items():
        ptr = v.untyped_storage().data_ptr()
        out[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    return out


def load_weights(path: Path, what: str, build_dir: Path | None = None) -> dict[str, torch.Tensor]:
    """A checkpoint's state dict the fast way: a safetensors file mapped as it is; a torch pickle through its
    converted copy (``converted``; made from ``load_checkpoint``'s reading, so its errors are the same)."""
    from ccld_trt.export.checkpoints import load_checkpoint

    path = Path(path)
    if path.suffix == SAFETENSORS_SUFFIX:
        return load_checkpoint(path, what)
    return converted(path, what, lambda: load_checkpoint(path, what), build_dir)

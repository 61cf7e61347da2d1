"""TensorRT-RTX's runtime cache of one engine, kept in ``<engine>.runtime-cache``: the kernels it specialised just
in time, so that the next start skips compiling them.

Saved when its bytes changed, never on every shape change: after a launch at a new shape it is looked at most
every CACHE_SAVE_INTERVAL_S (kernels compiled lazily after a shape's first launch are caught by a later look),
written on a writer thread off the inference path, and saved once more at close. A cache that cannot be written
(a read-only engine directory) is one warning, never a failure.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ccld_trt.export.atomic import write_atomic

log = logging.getLogger(__name__)

CACHE_SAVE_INTERVAL_S = 30.0  # how often a launch may look whether the cache grew


def runtime_cache_file(engine_path: Path) -> Path:
    """TensorRT-RTX's runtime cache of an engine: ``<engine>.runtime-cache``."""
    return engine_path.with_name(engine_path.name + ".runtime-cache")


class RuntimeCacheFile:
    """Owns the saving of ``cache`` (an IRuntimeCache, or anything with ``serialize() -> bytes``) to ``path``,
    and the writer thread that does it."""

    def __init__(self, path: Path, cache: Any) -> None:
        self.path = path
        self.cache = cache
        self._digest = ""  # SHA-256 of the bytes last saved (or read)
        self._dirty = False  # a new shape ran since the cache last proved unchanged
        self._checked = time.monotonic()
        self._broken = False  # could not be written: warned once, not tried again
        self._lock = threading.Lock()
        self._writer: ThreadPoolExecutor | None = None
        self.pending: Future[None] | None = None  # the last background write

    def load(self) -> None:
        """Fill the cache from the file when there is one; a file this GPU or version cannot use is a warning
        (the cache starts empty and is replaced at the next save)."""
        if not self.path.is_file():
            return
        data = self.path.read_bytes()
        if self.cache.deserialize(data):
            self._digest = hashlib.sha256(data).hexdigest()
        else:
            log.warning("runtime cache %s does not fit this GPU or TensorRT-RTX: starting a new one", self.path)
            self.cache.reset()

    def new_shape(self) -> None:
        """The engine ran (or will run) a shape it may not have kernels for."""
        self._dirty = True

    def after_launch(self) -> None:
        """Cheap unless a new shape ran and CACHE_SAVE_INTERVAL_S has passed since the last look: then the
        cache is serialized and, if its bytes changed, handed to the writer thread."""
        if not self._dirty or time.monotonic() - self._checked < CACHE_SAVE_INTERVAL_S:
            return
        self._checked = time.monotonic()
        self._save_if_changed(background=True)

    def save(self) -> None:
        """Write the cache now if it changed (after any background write)."""
        self._save_if_changed(background=False)

    def close(self) -> None:
        """save(), then stop the writer thread."""
        self.save()
        if self._writer is not None:
            self._writer.shutdown(wait=True)
            self._writer = None

    def _save_if_changed(self, background: bool) -> None:
        if self._broken:
            self._dirty = False
            return
        data = bytes(memoryview(self.cache.serialize()))
        digest = hashlib.sha256(data).hexdigest()
        if digest == self._digest:
            self._dirty = False  # nothing new since the last save: stop looking until the next new shape
            return
        self._digest = digest
        if background:
            if self._writer is None:
                self._writer = ThreadPoolExecutor(1, thread_name_prefix="ccld-trt-runtime-cache")
            self.pending = self._writer.submit(self._write, data)
            return
        if self.pending is not None:
            self.pending.result()
        self._write(data)

    def _write(self, data: bytes) -> None:
        with self._lock:
            if self._broken:
                return
            try:
                write_atomic(self.path, memoryview(data))
            except OSError as e:
                self._broken = True
                log.warning("cannot save the TensorRT-RTX runtime cache %s (%s): inference goes on, but the next "
                            "start compiles its kernels again", self.path, e)

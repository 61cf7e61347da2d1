"""The page's models: opened once, in a background thread, while the page is already served; and the guard
around a running job that lets a stopping server cancel it at its next U-Net evaluation (serve.py)."""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator

from ccld_trt.export.errors import UserError
from ccld_trt.runner import Session

logger = logging.getLogger("ccld_trt.serve")  # the server's log, as before this class moved here


class ModelLoader:
    """Opens the backend once, in a background thread, so that the page is served while the models load."""

    def __init__(self, load: Callable[[], Session], description: str) -> None:
        self._load = load
        self.description = description
        self._done = threading.Event()
        self._session: Session | None = None
        self._error = ""
        self._seconds = 0.0
        self._stopping = threading.Event()
        self._running = threading.Lock()  # held while a job runs (the queue runs one at a time)

    def start(self) -> None:
        # Not a daemon: the interpreter exiting while torch is still loading would abort the process.
        threading.Thread(target=self._run, name="ccld-trt-load-models").start()

    def _run(self) -> None:
        start = time.perf_counter()
        try:
            self._session = self._load()
        except UserError as e:
            self._error = str(e)
        except Exception as e:  # a failure must reach the page and the log, not die silently with the thread
            logger.exception("loading the models failed")
            self._error = f"{type(e).__name__}: {e}"
        self._seconds = time.perf_counter() - start
        if self._session is None:
            print(f"ccld-trt serve: error: the models failed to load: {self._error}", file=sys.stderr)
        else:
            print(f"ccld-trt serve: models ready ({self.description}, {self._seconds:.1f} s)", file=sys.stderr)
        self._done.set()

    @property
    def finished(self) -> bool:
        """Whether loading is over, successfully or not."""
        return self._done.is_set()

    def session(self) -> Session:
        """The loaded models, or UserError saying why there are none."""
        if not self._done.is_set():
            raise UserError(f"the models are still loading ({self.description}) — try again in a few seconds")
        if self._session is None:
            raise UserError(f"the models failed to load, so nothing can be generated: {self._error}")
        return self._session

    @contextlib.contextmanager
    def job(self) -> Iterator[None]:
        """Held around a running job, so that ``stop`` can wait for it; UserError once stopping."""
        with self._running:
            self.check_running()
            yield

    def check_running(self) -> None:
        """UserError once the server is stopping: a job calls it at each U-Net evaluation and stage."""
        if self._stopping.is_set():
            raise UserError("the server is stopping: this job was cancelled")

    def cancel(self) -> None:
        """Cancel the running job at its next U-Net evaluation or stage, and refuse new ones."""
        self._stopping.set()

    def stop(self, timeout: float) -> bool:
        """Cancel the running job at its next U-Net evaluation and refuse new ones; wait up to ``timeout`` s
        for it to end. Whether it did (else the process's exit ends it)."""
        self.cancel()
        if not self._running.acquire(timeout=timeout):
            return False
        self._running.release()
        return True

    def status_markdown(self) -> str:
        if not self._done.is_set():
            return f"Loading the models ({self.description})…"
        if self._session is None:
            return f"**The models failed to load:** {self._error}  \nFix that and restart `ccld-trt serve`."
        return f"Models ready: {self.description} (loaded in {self._seconds:.1f} s)."

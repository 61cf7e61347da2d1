"""One process per backend: the parent's BackendProcess and the worker loop it talks to over a pipe.

Each backend gets a process of its own because backends in one process slow each other down: with ONNX
Runtime's sessions merely open, torch's decoder took 3.8 s instead of 3.0 on the 2-core CPU (memory allocator
state); in separate processes neither changes the other. Processes are spawned, not forked (CUDA cannot be
used in a forked child).
"""

from __future__ import annotations

import contextlib
import multiprocessing
from functools import partial
from multiprocessing.connection import Connection
from typing import Any

import torch

from ccld_trt.benchmarks.plan import BenchConfig, Variant
from ccld_trt.benchmarks.sessions import Opener, failure_reason
from ccld_trt.benchmarks.stages import Context, Costs, Progress, end_to_end, measure_stages, op_profiles
from ccld_trt.benchmarks.timing import measure
from ccld_trt.export.models import ModelFiles


class BackendFailed(Exception):
    """A backend could not open, or failed while measuring; ``reason`` is one line."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _PipeProgress:
    """A worker's progress bar: forwards to the parent's."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def set_postfix_str(self, s: str) -> None:
        self.conn.send(("postfix", s))

    def update(self, n: int = 1) -> None:
        self.conn.send(("update", n))


def _serve_backend(conn: Connection, variant: Variant, config: BenchConfig, files: ModelFiles, costs: Costs,
                   opener: Opener) -> None:
    """A worker process: open ``variant``, then answer the parent's commands ("stages": every stage and the op
    profile; "end_to_end", request: one timed job) until "close". Each reply is ("done", result) or
    ("failed", reason), after which the worker ends."""
    try:
        session = opener(variant, config.device, files)
    except Exception as e:  # whatever a backend raises while opening, the run goes on without it
        conn.send(("failed", failure_reason(e)))
        return
    conn.send(("done", None))
    ctx = Context(config, torch.device(config.device), costs, {}, _PipeProgress(conn))
    while True:
        command, *args = conn.recv()
        if command == "close":
            return
        try:
            if command == "stages":
                records = measure_stages(ctx, variant, session)
                ctx.bar.set_postfix_str(f"{variant.label} op profile")
                result: Any = (records, op_profiles(variant, session))
            else:
                (request,) = args
                result = measure(partial(end_to_end, session.backend, request), ctx.device, 0, 1)
        except Exception as e:  # a backend that breaks mid-run keeps its finished rows
            conn.send(("failed", failure_reason(e)))
            return
        conn.send(("done", result))


class BackendProcess:
    """One backend open in its own process (see the module's docstring), measured on command; its progress
    reports move ``bar`` (``updates`` counts them). Raises BackendFailed if the backend cannot open."""

    def __init__(self, variant: Variant, config: BenchConfig, files: ModelFiles, costs: Costs, opener: Opener,
                 bar: Progress) -> None:
        context = multiprocessing.get_context("spawn")
        self.conn, child = context.Pipe()
        self.bar = bar
        self.updates = 0
        self.process = context.Process(target=_serve_backend, args=(child, variant, config, files, costs, opener),
                                       name=f"bench {variant.label}", daemon=True)
        self.process.start()
        child.close()
        try:
            self._reply()
        except BackendFailed:
            self.close()
            raise

    def call(self, command: str, *args: Any) -> Any:
        """Send a command (see _serve_backend) and wait for its result; BackendFailed if it failed."""
        self.conn.send((command, *args))
        return self._reply()

    def _reply(self) -> Any:
        while True:
            try:
                kind, value = self.conn.recv()
            except EOFError:
                self.process.join(timeout=10)
                raise BackendFailed(f"its process ended (exit code {self.process.exitcode})") from None
            if kind == "update":
                self.bar.update(value)
                self.updates += value
            elif kind == "postfix":
                self.bar.set_postfix_str(value)
            elif kind == "failed":
                raise BackendFailed(value)
            else:
                return value

    def close(self) -> None:
        with contextlib.suppress(OSError):  # the worker may be gone already
            self.conn.send(("close",))
        self.process.join(timeout=30)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join()
        self.conn.close()

"""One cluster replica without Ray: the models loaded once, the step batcher, and the HTTP routes' work.

Every request runs the pipeline (``pipeline.generate``) on its own thread against a Backend whose ``unet``
queues the evaluation in the replica's StepBatcher; the encoders and the decoder run directly, one call at a
time with the batcher's U-Net calls (SerialBackend). So a request's images are those of a solo run, except that
its U-Net rows may have shared a call with other requests' rows.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ccld_trt.cluster.api import BadRequest, Job, latents_json, parse_generate, png_base64
from ccld_trt.cluster.batcher import StepBatcher
from ccld_trt.cluster.rows import SerialBackend, UNetCall
from ccld_trt.export.errors import UserError
from ccld_trt.export.onnx_manifest import graphs_current
from ccld_trt.jobs import run
from ccld_trt.runner import BackendOptions, ModelSource, open_session

logger = logging.getLogger(__name__)

GPU_PLACEHOLDER = "{gpu}"


@dataclass(frozen=True)
class ReplicaSettings:
    """How a replica batches: ``max_batch`` U-Net rows per merged call, a call starts after ``window_s`` at most
    (sooner once every sampling request has its evaluation waiting); ``batching`` False: one evaluation per call.
    ``max_ongoing``: requests a replica runs at once (each on its own thread)."""

    max_batch: int = 32
    window_s: float = 0.005
    batching: bool = True
    max_ongoing: int = 8

    def validate(self) -> ReplicaSettings:
        if self.max_batch < 1:
            raise UserError(f"max_batch must be >= 1, got {self.max_batch}")
        if self.max_ongoing < 1:
            raise UserError(f"max_ongoing must be >= 1, got {self.max_ongoing}")
        if self.window_s < 0:
            raise UserError(f"window_s must be >= 0, got {self.window_s}")
        return self


class DeadlineExceeded(Exception):
    """A request ran past its timeout_s (HTTP 504); it stops at its next U-Net evaluation."""


def gpu_slug(device: torch.device) -> str:
    """The device's GPU model as a path part, e.g. "nvidia-h200" (engines are built per GPU type)."""
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def replica_options(options: BackendOptions) -> BackendOptions:
    """The backend options as a replica uses them: on CUDA the GPU Ray gave it (Ray sets CUDA_VISIBLE_DEVICES,
    so that GPU is cuda:0 whatever --device said), and a ``{gpu}`` in the engine directory replaced by its
    GPU model, so one cluster of mixed GPUs finds each type's engines."""
    if not options.device.startswith("cuda"):
        return options
    engine_dir = str(options.engine_dir)
    if GPU_PLACEHOLDER in engine_dir:
        engine_dir = engine_dir.replace(GPU_PLACEHOLDER, gpu_slug(torch.device("cuda", 0)))
    return dataclasses.replace(options, device="cuda:0", engine_dir=Path(engine_dir))


class _BatchedBackend:
    """What one request's pipeline runs on: the replica's serial encoders/decoder, and a ``unet`` that waits
    for its share of a merged call (raising DeadlineExceeded once past ``deadline``, time.monotonic)."""

    def __init__(self, serial: SerialBackend, batcher: StepBatcher[UNetCall, torch.Tensor], deadline: float) -> None:
        self.name, self.device = serial.name, serial.device
        self.encode_text, self.encode_image, self.decode = serial.encode_text, serial.encode_image, serial.decode
        self.encode_latents = serial.encode_latents
        self._batcher = batcher
        self._deadline = deadline

    def unet(self, x: torch.Tensor, t: torch.Tensor, conds: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if time.monotonic() > self._deadline:
            raise DeadlineExceeded
        return self._batcher.evaluate(UNetCall(x, t, conds, weights))


class Replica:
    """The models of ``options`` / ``models``, loaded once, serving /v1/generate, /v1/health and /v1/stats."""

    def __init__(self, options: BackendOptions, models: ModelSource, settings: ReplicaSettings) -> None:
        self.settings = settings.validate()
        self.options = replica_options(options.resolved())
        start = time.perf_counter()
        self.session = open_session(self.options, models)
        backend = self.session.backend
        onnx_dir = getattr(backend, "onnx_dir", None)
        fp16 = getattr(backend, "precision", "") == "fp16"
        if onnx_dir is not None and not graphs_current(models.files, onnx_dir, ("unet",), fp16=fp16):
            # the plain per-row U-Net graph, next to the graphs open_session exported (the exporter, and the
            # torch networks it reads, only when it is missing or stale: a replica's start-up)
            from ccld_trt.export.onnx_export import export_all

            export_all(models.files, onnx_dir, ("unet",), fp16=fp16, progress=False)
        self.serial = SerialBackend(backend)
        self.batcher: StepBatcher[UNetCall, torch.Tensor] = StepBatcher(
            self.serial.merged, lambda call: call.rows, settings.max_batch, settings.window_s, settings.batching)
        self.load_seconds = time.perf_counter() - start
        self.precision = getattr(backend, "precision", self.options.precision or "")
        self._lock = threading.Lock()
        self._counts = {"requests_in_flight": 0, "requests_done": 0, "requests_failed": 0}
        # Ready now; the warm-up runs behind the backend's lock, so a request that comes first waits at most one
        # U-Net call (a replaced replica takes traffic ~0.4 s sooner on a 2-core CPU than with it run here).
        self._warming = threading.Thread(target=self._warm_up, name="ccld-trt-warm-up", daemon=True)
        self._warming.start()

    def _warm_up(self) -> None:
        """One merged call of two evaluations: opens what the backend creates on first use (the per-row U-Net
        graph, kernels for these shapes) before the first request needs it. A failure is logged; the request that
        meets it again says so."""
        device = self.serial.device
        call = UNetCall(torch.zeros(1, 4, 32, 32, device=device), torch.ones(1, device=device),
                        torch.zeros(1, 512, device=device), torch.ones(1, device=device))
        try:
            self.serial.merged([call, call])
        except Exception:
            logger.exception("the replica's warm-up call failed")

    def configure(self, batching: bool | None = None, max_batch: int | None = None) -> None:
        """Switch merging on or off, or change the row limit, for the calls to come (Serve's user_config)."""
        self.batcher.configure(max_rows=max_batch, merge=batching)

    @contextmanager
    def _in_flight(self) -> Iterator[None]:
        with self._lock:
            self._counts["requests_in_flight"] += 1
        ok = False
        try:
            yield
            ok = True
        finally:
            with self._lock:
                self._counts["requests_in_flight"] -= 1
                self._counts["requests_done" if ok else "requests_failed"] += 1

    def generate(self, job: Job) -> dict[str, Any]:
        """Run ``job`` with its U-Net evaluations merged with other requests'; the response body of
        /v1/generate. Raises DeadlineExceeded past the job's timeout."""
        deadline = time.monotonic() + job.timeout_s
        backend = _BatchedBackend(self.serial, self.batcher, deadline)
        sampling = self.batcher.sampling()
        entered = False

        def on_stage(stage: str) -> None:
            nonlocal entered
            if stage == "sampling":
                sampling.__enter__()
                entered = True
            elif entered:
                sampling.__exit__(None, None, None)
                entered = False

        with self._in_flight():
            try:
                result = run(backend, job, on_stage=on_stage)
            finally:
                if entered:
                    sampling.__exit__(None, None, None)
        response = {"images": png_base64(result.pixels), "seed": job.request.seed, "seconds": result.seconds,
                    "backend": self.session.backend.name, "precision": self.precision, "replica": os.getpid(),
                    "demo_weights": self.session.demo}
        if job.return_latents:
            response["latents"] = latents_json(result.latents)
        return response

    def handle(self, method: str, path: str, body: bytes) -> tuple[int, dict[str, Any]]:
        """One HTTP request -> (status, JSON body). Errors are {"error": one line}: 400 bad input, 404/405 wrong
        route, 504 past the deadline, 500 anything else (its traceback goes to the log)."""
        routes = {"/v1/generate": "POST", "/v1/health": "GET", "/v1/stats": "GET"}
        path = "/" + path.strip("/")
        if path not in routes:
            return 404, {"error": f"no route {path}; the routes are {', '.join(routes)}"}
        if method != routes[path]:
            return 405, {"error": f"{path} takes {routes[path]}, not {method}"}
        if path == "/v1/health":
            return 200, self.health()
        if path == "/v1/stats":
            return 200, self.stats()
        try:
            return 200, self.generate(parse_generate(body, self.session.image_size))
        except BadRequest as e:
            return 400, {"error": str(e)}
        except DeadlineExceeded:
            return 504, {"error": "the request ran past its timeout_s and was stopped"}
        except UserError as e:
            return 400, {"error": str(e)}
        except Exception as e:
            logger.exception("generation failed")
            return 500, {"error": f"internal error: {type(e).__name__}: {e}".splitlines()[0]}

    def health(self) -> dict[str, Any]:
        return {"status": "ok", "backend": self.options.describe(), "load_seconds": round(self.load_seconds, 3),
                "replica": os.getpid()}

    def stats(self) -> dict[str, Any]:
        """U-Net calls, rows and requests per call, merged calls, requests in flight (this replica)."""
        with self._lock:
            counts = dict(self._counts)
        batcher = self.batcher
        return {**batcher.stats(), **counts, "queue_depth": counts["requests_in_flight"], "replica": os.getpid(),
                "batching": batcher.merge, "max_batch": batcher.max_rows}

    def healthy(self) -> bool:
        return self.batcher.alive

    def close(self) -> None:
        self._warming.join()  # one U-Net call at most: it must not run on a backend being let go
        self.batcher.close()


def combine_stats(replicas: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Replicas' ``stats()`` -> the cluster's: sums of counts, max of maxima, means over all calls."""
    rows = [s for s in replicas.values() if "unet_calls" in s]
    calls = sum(s["unet_calls"] for s in rows)
    total: dict[str, Any] = {k: sum(s[k] for s in rows) for k in (
        "unet_calls", "evaluations", "merged_calls", "rows", "waiting", "sampling", "requests_in_flight",
        "requests_done", "requests_failed", "queue_depth")}
    total["rows_per_call_max"] = max((s["rows_per_call_max"] for s in rows), default=0)
    total["requests_per_call_max"] = max((s["requests_per_call_max"] for s in rows), default=0)
    total["rows_per_call_mean"] = total["rows"] / calls if calls else 0.0
    total["requests_per_call_mean"] = total["evaluations"] / calls if calls else 0.0
    return {"total": total, "replicas": dict(replicas)}

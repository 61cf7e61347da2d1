"""Merged U-Net rows on OpenVINO, for real on the CPU: concurrent requests through the cluster's StepBatcher (no
Ray) each equal their solo runs, the merged calls running the exported plain ``unet`` graph (unet_rows)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from ccld_trt.cluster.batcher import StepBatcher
from ccld_trt.cluster.rows import RowBackend, SerialBackend, UNetCall
from ccld_trt.pipeline import DEFAULT_AUTOENCODER_SCALE, Request, generate

pytest.importorskip("openvino")

# Different prompts, seeds, images, samplers and steps: eight requests that step in and out of each other's calls.
REQUESTS = [Request([(f"a painting of a {thing}", 3.0)], n=1 + k % 2, seed=10 + k, steps=3 + k % 3,
                    method=("plms", "ddim", "ddpm")[k % 3], eta=0.0 if k % 3 != 2 else 1.0)
            for k, thing in enumerate(("fox", "boat", "tree", "city", "cat", "mountain", "river", "lamp"))]


class BatchedUNet:
    """What a request's pipeline runs on in a replica: the serial backend, with ``unet`` through the batcher."""

    def __init__(self, serial: SerialBackend, batcher: StepBatcher[UNetCall, torch.Tensor]) -> None:
        self.name, self.device = serial.name, serial.device
        self.encode_text, self.encode_image, self.decode = serial.encode_text, serial.encode_image, serial.decode
        self.encode_latents = serial.inner.encode_latents  # type: ignore[attr-defined]
        self.batcher = batcher

    def unet(self, x: torch.Tensor, t: torch.Tensor, conds: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return self.batcher.evaluate(UNetCall(x, t, conds, weights))


@pytest.fixture(scope="module")
def openvino_backend(seed3_dir: Path, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    from ccld_trt.backends.openvino_backend import OpenVinoBackend
    from test_onnx import export_seed3  # the fp32 graphs, the plain unet included

    return OpenVinoBackend(export_seed3(seed3_dir, tmp_path_factory)[1], precision="fp32", threads=1)


def test_concurrent_requests_through_the_batcher_equal_their_solo_runs(openvino_backend) -> None:  # type: ignore[no-untyped-def]
    backend = openvino_backend
    as_object: object = backend
    assert isinstance(as_object, RowBackend)  # run_merged merges on it
    solo = [generate(backend, r, [], DEFAULT_AUTOENCODER_SCALE).latents for r in REQUESTS]

    serial = SerialBackend(backend)
    batcher: StepBatcher[UNetCall, torch.Tensor] = StepBatcher(serial.merged, lambda call: call.rows, max_rows=64,
                                                               window_s=0.05)
    merged: list[torch.Tensor | None] = [None] * len(REQUESTS)
    errors: list[BaseException] = []

    def work(k: int) -> None:
        try:
            with batcher.sampling():
                merged[k] = generate(BatchedUNet(serial, batcher), REQUESTS[k], [],  # type: ignore[arg-type]
                                     DEFAULT_AUTOENCODER_SCALE).latents
        except BaseException as e:  # reported below, with the thread's own traceback
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(len(REQUESTS))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    batcher.close()
    assert not errors, errors
    stats = batcher.stats()
    assert stats["merged_calls"] >= 1 and stats["requests_per_call_max"] >= 2, stats
    for got, expected in zip(merged, solo, strict=True):
        assert got is not None
        rel = float((got - expected).norm() / expected.norm())
        assert rel < 1e-4, rel

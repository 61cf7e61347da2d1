"""The step batcher and the merged U-Net call, without Ray: deterministic merges, per-request results, errors,
and a merged call's guided velocities against each request's own fused call."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from ccld_trt.cluster.batcher import BatcherClosed, StepBatcher
from ccld_trt.cluster.rows import UNetCall, run_merged


class Recorder:
    """An executor that records each call's inputs and returns input * 10 (each caller can check its own)."""

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.calls: list[list[int]] = []
        self.gate = gate

    def __call__(self, items: Sequence[int]) -> list[int]:
        if self.gate is not None:
            self.gate.wait(10)
        self.calls.append(list(items))
        return [i * 10 for i in items]


def _run_threads(batcher: StepBatcher[int, int], values: list[int], inside_sampling: bool = True) -> list[int]:
    results = [0] * len(values)
    entered = threading.Barrier(len(values))

    def work(k: int) -> None:
        if inside_sampling:
            with batcher.sampling():
                entered.wait()  # all are sampling before any evaluates
                results[k] = batcher.evaluate(values[k])
        else:
            results[k] = batcher.evaluate(values[k])

    threads = [threading.Thread(target=work, args=(k,)) for k in range(len(values))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    return results


def test_waits_for_every_sampling_request_then_merges_them_all() -> None:
    # a long window: the call may only start because all three sampling requests are waiting
    rec = Recorder()
    batcher = StepBatcher(rec, rows_of=lambda v: 2, max_rows=64, window_s=30.0)
    entered = threading.Barrier(3)
    results = [0, 0, 0]

    def work(k: int) -> None:
        with batcher.sampling():
            entered.wait()
            results[k] = batcher.evaluate(k + 1)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(3)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert time.monotonic() - start < 5
    assert results == [10, 20, 30]
    assert len(rec.calls) == 1 and sorted(rec.calls[0]) == [1, 2, 3]
    stats = batcher.stats()
    assert stats["unet_calls"] == 1 and stats["merged_calls"] == 1
    assert stats["rows_per_call_max"] == 6 and stats["requests_per_call_max"] == 3
    batcher.close()


def test_row_limit_splits_oldest_first() -> None:
    # the executor is held until all five wait, so the split depends only on the row limit and the FIFO order
    gate = threading.Event()
    rec = Recorder(gate)
    batcher = StepBatcher(rec, rows_of=lambda v: v, max_rows=5, window_s=0.0)
    first = threading.Thread(target=batcher.evaluate, args=(1,))
    first.start()
    time.sleep(0.2)
    assert batcher.stats()["waiting"] == 0  # the worker took 1 and is blocked on the gate
    others = []
    for v in (2, 3, 4, 1):
        t = threading.Thread(target=batcher.evaluate, args=(v,))
        t.start()
        others.append(t)
        while batcher.stats()["waiting"] < len(others):
            time.sleep(0.005)
    gate.set()
    first.join(10)
    for t in others:
        t.join(10)
    # 1 alone (already running); then 2+3 (5 rows; 4 would overflow); then 4+1
    assert rec.calls == [[1], [2, 3], [4, 1]]
    assert batcher.stats()["rows_per_call_max"] == 5
    batcher.close()


def test_without_merging_every_evaluation_runs_alone() -> None:
    rec = Recorder()
    batcher = StepBatcher(rec, rows_of=lambda v: 1, max_rows=64, window_s=30.0, merge=False)
    assert sorted(_run_threads(batcher, [1, 2, 3, 4])) == [10, 20, 30, 40]
    assert sorted(map(len, rec.calls)) == [1, 1, 1, 1]
    assert batcher.stats()["merged_calls"] == 0
    batcher.configure(merge=True)
    assert sorted(_run_threads(batcher, [5, 6, 7])) == [50, 60, 70]
    assert [sorted(c) for c in rec.calls[4:]] == [[5, 6, 7]]
    batcher.close()


def test_window_lets_a_lone_request_go_when_another_is_busy() -> None:
    rec = Recorder()
    batcher = StepBatcher(rec, rows_of=lambda v: 1, max_rows=64, window_s=0.05)
    with batcher.sampling():  # a second request sampling but not evaluating (e.g. between steps)
        assert _run_threads(batcher, [7]) == [70]
    assert rec.calls == [[7]]
    batcher.close()


def test_an_executor_error_reaches_its_callers_and_the_worker_serves_on() -> None:
    def execute(items: Sequence[int]) -> list[int]:
        if 13 in items:
            raise ValueError("unlucky")
        return list(items)

    batcher = StepBatcher(execute, rows_of=lambda v: 1, max_rows=64, window_s=0.0)
    with pytest.raises(ValueError, match="unlucky"):
        batcher.evaluate(13)
    assert batcher.evaluate(4) == 4
    batcher.close()
    with pytest.raises(BatcherClosed):
        batcher.evaluate(5)


def _calls(generator: torch.Generator) -> list[UNetCall]:
    """Three evaluations unlike each other: images 1, 2, 1; conditions 2, 3, 1; own timesteps and weights."""
    out = []
    for n, c in ((1, 2), (2, 3), (1, 1)):
        out.append(UNetCall(torch.randn(n, 4, 32, 32, generator=generator), torch.rand(n, generator=generator),
                            torch.randn(c, 512, generator=generator), torch.randn(c, generator=generator)))
    return out


def test_merged_call_equals_each_fused_call(seed3_dir: Path) -> None:
    # torch here; onnxruntime's merged calls are checked end to end in test_cluster.py
    from ccld_trt.export.models import ModelFiles
    from ccld_trt.runner import BackendOptions, ModelSource, open_session

    backend = open_session(BackendOptions("torch"), ModelSource(ModelFiles.resolve(seed3_dir))).backend
    calls = _calls(torch.Generator().manual_seed(0))
    merged = run_merged(backend, calls)
    for call, v in zip(calls, merged, strict=True):
        solo = backend.unet(call.x, call.t, call.conds, call.weights)
        assert v.shape == call.x.shape
        rel = ((v - solo).norm() / solo.norm()).item()
        assert rel < 1e-5, rel
    # one call alone takes the backend's fused path: bit-identical to it
    (alone,) = run_merged(backend, calls[:1])
    assert torch.equal(alone, backend.unet(calls[0].x, calls[0].t, calls[0].conds, calls[0].weights))


def test_requests_stepping_together_keep_merging() -> None:
    # Without a window counted from the end of the last call, two requests would take turns: the one that just
    # got its result is still computing its next step when the other's evaluation is already "late".
    def slow(items: Sequence[int]) -> list[int]:
        time.sleep(0.02)
        return list(items)

    batcher = StepBatcher(slow, rows_of=lambda v: 1, max_rows=64, window_s=0.05)
    entered = threading.Barrier(2)

    def request(k: int) -> None:
        with batcher.sampling():
            entered.wait()
            for step in range(10):
                assert batcher.evaluate(100 * k + step) == 100 * k + step

    threads = [threading.Thread(target=request, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    stats = batcher.stats()
    assert stats["evaluations"] == 20
    assert stats["unet_calls"] <= 12 and stats["merged_calls"] >= 8, stats
    batcher.close()


class GatedBackend:
    """A row backend whose U-Net calls wait for ``gate``; it records the rows of each call."""

    name = "fake"
    device = torch.device("cpu")

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.rows: list[int] = []

    def unet_rows(self, x: torch.Tensor, t: torch.Tensor, embed: torch.Tensor) -> torch.Tensor:
        assert self.gate.wait(10)
        self.rows.append(int(x.shape[0]))
        return torch.zeros_like(x)


def test_replica_is_ready_before_its_warm_up_which_still_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    from ccld_trt.cluster import replica as replica_module
    from ccld_trt.runner import BackendOptions, Session

    backend = GatedBackend()
    monkeypatch.setattr(replica_module, "open_session",
                        lambda options, models: Session(backend, 224, 1.0, demo=True))  # type: ignore[arg-type]
    replica = replica_module.Replica(BackendOptions("torch"), None,  # type: ignore[arg-type]
                                     replica_module.ReplicaSettings())
    assert backend.rows == []  # init returned with the warm-up call still waiting
    backend.gate.set()
    replica.close()  # waits for the warm-up
    assert backend.rows == [2]  # one merged call of two evaluations, one row each

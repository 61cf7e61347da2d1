"""The benchmark suite on small demo weights: its JSON schema, reports, correctness flags, compare and FLOPs."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from ccld_trt.benchmarks.compare import compare
from ccld_trt.benchmarks.flops import count_cost, count_flops, stage_costs
from ccld_trt.benchmarks.op_profile import op_type_times
from ccld_trt.benchmarks.plan import rotated
from ccld_trt.benchmarks.records import Skip
from ccld_trt.benchmarks.report import REQUIRED_KEYS, SCHEMA_VERSION, STAGES, load_results, to_markdown
from ccld_trt.benchmarks.suite import (
    REFERENCE,
    BenchConfig,
    Variant,
    cpu_skips,
    judge,
    open_variant,
    plms_step_intervals_ms,
    run_bench,
)
from ccld_trt.benchmarks.timing import Measurement, merged
from ccld_trt.export.autoencoder import Upsample
from ccld_trt.export.demo_weights import write_demo_weights
from ccld_trt.export.models import ModelFiles, load_networks
from ccld_trt.runner import Session
from cpu_fakes import SAPPHIRE_RAPIDS, ZEN3, fake_cpu

WRONG = Variant("perturbed", "fp32")


class PerturbedBackend:
    """Torch with every U-Net velocity scaled by 1.01: runs as fast as torch, samples something else."""

    name = "perturbed"
    precision = "fp32"

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.device = inner.device

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.inner.encode_text(tokens)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.inner.encode_image(pixels)

    def unet(self, x: torch.Tensor, t: torch.Tensor, conds: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return self.inner.unet(x, t, conds, weights) * 1.01

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.inner.decode(latents)


def opener(variant: Variant, device: str, files: ModelFiles) -> Session:
    if variant == WRONG:
        session = open_variant(REFERENCE, device, files)
        return replace(session, backend=PerturbedBackend(session.backend))
    return open_variant(variant, device, files)


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Any]:
    """One tiny run: torch fp32, the perturbed torch, TensorRT (which cannot run on the CPU) and torch bf16, on
    a faked Zen 3 (no bf16 or VNNI dot products: the bf16 and int8 GEMM peaks and torch bf16 are skipped)."""
    root = tmp_path_factory.mktemp("bench")
    write_demo_weights(root / "weights", "small", seed=0)
    # 5 PLMS steps: 3 warm-up steps, then two PLMS steps, whose interval is the sampler-step row
    config = BenchConfig.preset(True, models=root / "weights", output=root / "results", repeats=1, warmup=0,
                                end_to_end=((5, 1),), gemm_seconds=0.05,
                                variants=(REFERENCE, WRONG, Variant("tensorrt", "fp16"), Variant("torch", "bf16")))
    with one_thread(), pytest.MonkeyPatch.context() as mp:
        fake_cpu(mp, ZEN3)  # the workers inherit it
        return run_bench(config, opener)


@contextmanager
def one_thread() -> Iterator[None]:
    """One torch thread here and in the backends' worker processes (they read OMP_NUM_THREADS): on a shared
    CPU, thread barriers in many small ops make timings crawl."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("OMP_NUM_THREADS", "1")
            yield
    finally:
        torch.set_num_threads(threads)


def test_json_schema_and_positive_numbers(bench):
    _, paths = bench
    doc = load_results(paths.json)
    assert doc["schema_version"] == SCHEMA_VERSION
    for key in ("cpu_model", "cores", "ram_gb", "gpu", "torch", "onnxruntime", "date"):
        assert key in doc["machine"]
    assert doc["run"]["gemm_peak_gflops"]["fp32"] > 0
    assert set(doc["run"]["gemm_peak_gflops"]) == set(doc["run"]["gemm_kernel_gflops"]) == {"fp32"}  # Zen 3
    assert {r["stage"] for r in doc["results"]} == set(STAGES)
    assert {(r["backend"], r["precision"]) for r in doc["results"]} == {("torch", "fp32"), ("perturbed", "fp32")}
    for r in doc["results"]:
        assert all(k in r for k in REQUIRED_KEYS)
        for key in ("median_ms", "p90_ms", "min_ms", "flops", "achieved_gflops", "peak_fraction", "peak_rss_mb"):
            assert isinstance(r[key], int | float) and math.isfinite(r[key]) and r[key] > 0, (key, r)
        assert r["min_ms"] <= r["median_ms"] <= r["p90_ms"]
    e2e = [r for r in doc["results"] if r["stage"] == "end-to-end"]
    assert all(r["steps"] == 5 and r["n"] == 1 and r["images_per_s"] > 0 for r in e2e)
    unet = next(r for r in doc["results"] if r["stage"] == "unet")
    assert unet["rows"] == 2 * unet["batch"]


def test_reports_are_written(bench):
    _, paths = bench
    assert paths.json.parent == paths.markdown.parent == paths.plot.parent
    assert paths.plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = paths.markdown.read_text()
    for needle in ("GEMM peak", "## Stages", "## End to end", "FLAGGED", "tensorrt", paths.plot.name):
        assert needle in markdown


def test_torch_fp32_matches_itself_exactly(bench):
    doc, _ = bench
    (r,) = [r for r in doc["results"] if r["stage"] == "end-to-end" and r["backend"] == "torch"]
    assert r["latents_rel_error"] == 0.0
    assert r["pixels_max_abs_diff"] == 0 and r["psnr_db"] is None  # identical: infinite PSNR
    assert not r["flagged"]


def test_a_wrong_backend_is_flagged(bench):
    doc, _ = bench
    (r,) = [r for r in doc["results"] if r["stage"] == "end-to-end" and r["backend"] == "perturbed"]
    assert r["flagged"] and "rel error" in r["flag_reason"]
    assert r["latents_rel_error"] > 1e-3


def test_a_backend_that_cannot_open_is_skipped_with_the_reason(bench):
    doc, _ = bench
    (skip,) = [s for s in doc["skipped"] if s["backend"] == "tensorrt"]
    assert skip["precision"] == "fp16" and "GPU" in skip["reason"]


def test_what_the_cpu_lacks_is_skipped_in_one_line_each(bench):
    doc, paths = bench
    skipped = {(s["backend"], s["precision"]): s["reason"] for s in doc["skipped"] if s["backend"] != "tensorrt"}
    assert skipped == {
        ("GEMM peak", "bf16"): "the bf16 GEMM peak needs a CPU with avx512_bf16 or amx_bf16 instructions, and "
                               "this one has none",
        ("GEMM peak", "int8"): "the int8 GEMM peak needs a CPU with avx512_vnni or avx_vnni or amx_int8 "
                               "instructions, and this one has none",
        ("torch", "bf16"): "torch bf16 needs a CPU with avx512_bf16 or amx_bf16 instructions, and this one has none"}
    assert "bf16" not in {r["precision"] for r in doc["results"]}
    markdown = paths.markdown.read_text()
    assert "| GEMM peak | int8 | the int8 GEMM peak needs a CPU with avx512_vnni" in markdown
    assert "| torch | bf16 | torch bf16 needs a CPU with avx512_bf16" in markdown


def test_skip_serializes_to_the_keys_the_report_reads():
    skip = Skip.failed_while_measuring(Variant("onnxruntime", "fp16"), "RuntimeError: device lost")
    assert asdict(skip) == {"backend": "onnxruntime", "precision": "fp16",
                            "reason": "failed while measuring: RuntimeError: device lost"}


def test_committed_results_still_load():
    """Result files written by earlier versions of the suite load and render (the JSON stays compatible)."""
    paths = sorted((Path(__file__).parents[1] / "benchmarks" / "results").rglob("bench-*.json"))  # not gpu-check-*
    assert paths
    for path in paths:
        doc = load_results(path)
        assert doc["results"] and "## End to end" in to_markdown(doc)


def test_rotated_starts_each_round_one_later():
    assert [rotated("abc", r) for r in range(4)] == [list("abc"), list("bca"), list("cab"), list("abc")]
    assert rotated([], 3) == []


def test_merged_measurements_keep_every_sample_and_the_highest_peaks():
    a = Measurement([1.0, 2.0], 100.0, "measurement", 5.0, "first")
    b = Measurement([3.0], 90.0, "measurement", 7.0, "last")
    assert merged([a, b]) == Measurement([1.0, 2.0, 3.0], 100.0, "measurement", 7.0, "last")
    assert merged([replace(a, device_peak_mb=None)]).device_peak_mb is None  # CPU: no device memory


def test_planned_variants_on_the_cpu(monkeypatch):
    fake_cpu(monkeypatch, SAPPHIRE_RAPIDS)
    config = BenchConfig(backends=("torch", "onnxruntime"))
    assert config.planned_variants() == (Variant("torch", "fp32"), Variant("torch", "bf16"),
                                         Variant("onnxruntime", "fp32"), Variant("onnxruntime", "fp16"))
    assert config.cpu_skips() == []


def test_a_cpu_without_bf16_or_vnni_plans_no_bf16_or_int8(monkeypatch):
    fake_cpu(monkeypatch, ZEN3)
    config = BenchConfig()
    assert {v.precision for v in config.planned_variants()} == {"fp32", "fp16"}
    assert [v.label for v, _ in config.cpu_skips()] == ["torch bf16", "openvino bf16", "openvino int8"]
    lines: list[str] = []
    skips = cpu_skips(config, lines.append)
    assert [(s.backend, s.precision) for s in skips] == [("GEMM peak", "bf16"), ("GEMM peak", "int8"),
                                                         ("torch", "bf16"), ("openvino", "bf16"),
                                                         ("openvino", "int8")]
    assert lines == [f"skipped: {s.reason}" for s in skips] and all("\n" not in line for line in lines)
    assert lines[-1] == ("skipped: openvino int8 needs a CPU with avx512_vnni or avx_vnni or amx_int8 "
                         "instructions, and this one has none")
    assert BenchConfig(device="cuda").cpu_skips() == []  # GPU rows do not depend on the CPU


@pytest.mark.parametrize(("precision", "rel_error", "psnr", "flagged"), [
    ("fp32", 5e-4, 20.0, False),   # fp32 is judged by its latents
    ("fp32", 2e-3, 60.0, True),
    ("fp16", 0.5, 36.0, False),    # reduced precision is judged by its pixels
    ("bf16", 1e-4, 30.0, True),
    ("fp32", float("nan"), 60.0, True),
])
def test_judge(precision, rel_error, psnr, flagged):
    assert (judge(precision, rel_error, psnr) is not None) == flagged


def test_plms_step_intervals_start_after_the_warm_up():
    marks = [float(i * i) for i in range(15)]  # 15 evaluations: 12 of PRK warm-up, then 3 PLMS steps
    assert plms_step_intervals_ms(marks) == [(13**2 - 12**2) * 1e3, (14**2 - 13**2) * 1e3]


def _doc(date: str, rows: list[tuple[str, str, str, int, int | None, int | None, float]]) -> dict[str, Any]:
    results = [{"backend": b, "precision": p, "stage": s, "batch": batch, "steps": steps, "n": n, "median_ms": ms}
               for b, p, s, batch, steps, n, ms in rows]
    for r in results:
        r.update({k: None for k in REQUIRED_KEYS if k not in r})
    return {"schema_version": SCHEMA_VERSION, "results": results,
            "machine": {"cpu_model": "Test CPU", "cores": 4, "gpu": None, "date": date}}


def test_compare_ratios(tmp_path: Path):
    a = _doc("2024-01-01", [("torch", "fp32", "unet", 1, None, None, 10.0),
                            ("torch", "fp32", "end-to-end", 1, 15, 1, 3000.0),
                            ("torch", "fp32", "end-to-end", 1, 50, 1, 9000.0),
                            ("torch", "bf16", "decoder", 1, None, None, 7.0)])
    b = _doc("2024-02-01", [("torch", "fp32", "unet", 1, None, None, 5.0),
                            ("torch", "fp32", "end-to-end", 1, 50, 1, 2000.0),
                            ("torch", "fp32", "end-to-end", 1, 15, 1, 4000.0),
                            ("onnxruntime", "fp32", "unet", 1, None, None, 4.0)])
    (tmp_path / "a.json").write_text(json.dumps(a))
    (tmp_path / "b.json").write_text(json.dumps(b))
    table = compare(tmp_path / "a.json", tmp_path / "b.json")
    rows = {tuple(cell.strip() for cell in line.strip("|").split("|")) for line in table.splitlines()
            if line.startswith("| ") and "median" not in line}
    assert ("torch", "fp32", "unet", "1", "—", "—", "10.00", "5.00", "2.00×") in rows
    assert ("torch", "fp32", "end-to-end", "1", "15", "1", "3,000.00", "4,000.00", "0.75×") in rows
    assert ("torch", "fp32", "end-to-end", "1", "50", "1", "9,000.00", "2,000.00", "4.50×") in rows
    assert ("torch", "bf16", "decoder", "1", "—", "—", "7.00", "—", "—") in rows
    assert ("onnxruntime", "fp32", "unet", "1", "—", "—", "—", "4.00", "—") in rows


def test_compare_refuses_another_schema(tmp_path: Path):
    from ccld_trt.export.errors import UserError

    (tmp_path / "old.json").write_text(json.dumps({**_doc("2024-01-01", []), "schema_version": 0}))
    with pytest.raises(UserError, match="schema_version"):
        compare(tmp_path / "old.json", tmp_path / "old.json")


def test_flop_counter_knows_simple_layers():
    batch, n_in, n_out = 3, 8, 16
    linear = count_cost(nn.Linear(n_in, n_out), torch.zeros(batch, n_in))
    assert linear.flops == 2 * n_in * n_out * batch
    assert linear.weight_bytes == (n_in * n_out + n_out) * 4
    assert linear.activation_bytes == batch * n_out * 4
    conv = nn.Conv2d(3, 8, 3, padding=1)
    assert count_flops(conv, torch.zeros(2, 3, 10, 10)) == 2 * (2 * 8 * 10 * 10) * (3 * 3 * 3)
    assert conv.weight.device.type == "cpu"  # counted on meta copies, the module is untouched


def test_graph_backends_are_charged_for_the_phase_form_decoder(seed3_dir: Path):
    networks = load_networks(ModelFiles.resolve(seed3_dir))
    eager = stage_costs(networks, [2])
    graph = stage_costs(networks, [2], exported=True)
    assert any(isinstance(m, Upsample) for m in networks.decoder.modules())
    assert {k: v for k, v in graph.items() if k[0] != "decoder"} == {k: v for k, v in eager.items()
                                                                      if k[0] != "decoder"}
    assert 0 < graph["decoder", 2].flops < eager["decoder", 2].flops


def test_op_profile_counts_each_node_of_the_measured_runs(tmp_path: Path):
    from ccld_trt.backends.onnxruntime_sessions import session_options

    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 1), nn.Softmax(dim=1)).eval()
    path = tmp_path / "tiny.onnx"
    torch.onnx.export(model, (torch.zeros(1, 3, 16, 16),), path, dynamo=False, input_names=["x"])
    ops = op_type_times(path, {"x": np.ones((1, 3, 16, 16), np.float32)}, session_options(1),
                        ["CPUExecutionProvider"], runs=3)
    by_type = {o["op"]: o for o in ops}
    assert by_type["Conv"]["nodes"] == 2  # conv + relu fused into one, and the 1x1 conv; per run, not per 3
    assert by_type["Softmax"]["nodes"] == 1
    assert math.isclose(sum(o["share"] for o in ops), 1.0)
    assert all(o["ms"] > 0 for o in ops)
    assert [o["ms"] for o in ops] == sorted((o["ms"] for o in ops), reverse=True)
    assert not list(tmp_path.glob("*.json")) and not list(Path.cwd().glob("ort_*.json"))  # profile files removed


def test_report_shows_where_the_time_goes(bench):
    doc, _ = bench
    ops = [{"op": f"Op{i}", "ms": 10.0 - i, "share": (10.0 - i) / 45, "nodes": i + 1} for i in range(9)]
    profiled = {**doc, "op_profiles": [{"backend": "onnxruntime", "precision": "fp32", "graph": "decoder",
                                        "batch": 1, "ops": ops}]}
    markdown = to_markdown(profiled)
    assert "## Where ONNX Runtime's time goes" in markdown
    assert "| Op0 | 1 | 10.0 | 22.2 |" in markdown
    assert "| 3 other op types | 24 | 9.0 | 20.0 |" in markdown  # 4 + 3 + 2 ms, 7 + 8 + 9 nodes
    assert "Where ONNX Runtime" not in to_markdown(doc)  # runs without op profiles (CPU torch only, older files)


class Recording(PerturbedBackend):
    """Torch, appending its label to the file $CCLD_TRT_TEST_LOG at each text encoding (the start of every
    end-to-end job); with ``fail_after``, the U-Net raises from that call on (a backend that breaks mid-run)."""

    def __init__(self, inner: Any, label: str, fail_after: int | None = None) -> None:
        super().__init__(inner)
        self.label, self.fail_after, self.unet_calls = label, fail_after, 0

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        with open(os.environ["CCLD_TRT_TEST_LOG"], "a", encoding="utf-8") as log:
            log.write(self.label + "\n")
        return self.inner.encode_text(tokens)

    def unet(self, x: torch.Tensor, t: torch.Tensor, conds: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        self.unet_calls += 1
        if self.fail_after is not None and self.unet_calls > self.fail_after:
            raise RuntimeError("device lost")
        return self.inner.unet(x, t, conds, weights)


def recording_opener(variant: Variant, device: str, files: ModelFiles) -> Session:
    """Torch fp32 under the variant's name (module level: worker processes import it by name); "broken" passes
    its two stage U-Net calls (repeats 2, no warm-up), then fails in its first end-to-end job."""
    session = open_variant(REFERENCE, device, files)
    fail_after = 2 if variant.backend == "broken" else None
    return replace(session, backend=Recording(session.backend, variant.backend, fail_after))


def test_end_to_end_repeats_interleave_the_backends(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    write_demo_weights(tmp_path / "weights", "small", seed=0)
    log = tmp_path / "calls.log"
    monkeypatch.setenv("CCLD_TRT_TEST_LOG", str(log))
    second, broken = Variant("second", "fp32"), Variant("broken", "fp32")
    config = BenchConfig.preset(True, models=tmp_path / "weights", output=tmp_path / "results", repeats=2,
                                e2e_repeats=2, warmup=0, end_to_end=((3, 1),), gemm_seconds=0.05,
                                variants=(REFERENCE, second, broken))
    with one_thread():
        doc, _ = run_bench(config, recording_opener)
    # stages backend by backend (3 text encodings each: the U-Net stage's conditions, then 2 timed), then the
    # end-to-end jobs: round 1 runs every backend, round 2 the survivors in rotated order
    stages = ["torch"] * 3 + ["second"] * 3 + ["broken"] * 3
    assert log.read_text().split() == [*stages, "torch", "second", "broken", "second", "torch"]
    (skip,) = doc["skipped"]
    assert (skip["backend"], skip["reason"]) == ("broken", "failed while measuring: RuntimeError: device lost")
    e2e = {r["backend"]: r for r in doc["results"] if r["stage"] == "end-to-end"}
    assert set(e2e) == {"torch", "second"}
    assert e2e["second"]["repeats"] == 2 and e2e["second"]["latents_rel_error"] == 0.0
    assert {r["stage"] for r in doc["results"] if r["backend"] == "broken"} == {"text-encoder", "image-encoder",
                                                                                 "unet", "decoder"}


def test_engine_build_rows_time_and_size_each_engine(seed3_dir, tmp_path, monkeypatch):
    """One row per backend graph with its build time and the engine's size (a fake builder writes known sizes)."""
    from ccld_trt.benchmarks import engine_builds
    from ccld_trt.engines import build, flavor
    from ccld_trt.export import onnx_export
    from ccld_trt.export.graph_specs import BACKEND_GRAPHS
    from ccld_trt.export.models import ModelFiles

    sizes = {g: (i + 1) * 2**20 for i, g in enumerate(BACKEND_GRAPHS)}
    onnx_dir = tmp_path / "onnx"
    onnx_dir.mkdir()
    for g in BACKEND_GRAPHS:
        onnx_export.onnx_path(onnx_dir, g, "fp16").write_bytes(b"x" * 2**19)

    def fake_build(sources, engine_dir, params, options, rebuild=False):
        [(graph, _)] = sources.items()
        path = engine_dir / f"{graph}.fp16.engine"
        path.write_bytes(b"e" * sizes[graph])
        return [path]

    monkeypatch.setattr(flavor, "resolve_flavor", lambda choice, cap: "tensorrt-rtx")
    monkeypatch.setattr(flavor, "require_flavor", lambda f: "1.7.1")
    monkeypatch.setattr(build, "build_engines", fake_build)
    monkeypatch.setattr(onnx_export, "default_onnx_dir", lambda files: onnx_dir)
    monkeypatch.setattr(onnx_export, "export_all", lambda *a, **k: {})
    rows, skip = engine_builds.measure_engine_builds(ModelFiles.resolve(seed3_dir), log=lambda m: None)
    assert skip is None
    assert [r["graph"] for r in rows] == list(BACKEND_GRAPHS)
    assert [r["engine_mib"] for r in rows] == [sizes[g] / 2**20 for g in BACKEND_GRAPHS]
    assert all(r["onnx_mib"] == 0.5 and r["build_s"] >= 0 and r["targets"] == ["8.6", "8.9", "12.0"]
               for r in rows)
    text = "\n".join(engine_builds.markdown(rows))
    assert "## Engine builds" in text and "tensorrt-rtx 1.7.1 for 8.6, 8.9, 12.0" in text
    assert f"| {BACKEND_GRAPHS[0]} |" in text


def test_engine_build_rows_skip_in_one_line_without_tensorrt(seed3_dir, monkeypatch):
    from ccld_trt.benchmarks import engine_builds
    from ccld_trt.engines import flavor
    from ccld_trt.export.errors import UserError
    from ccld_trt.export.models import ModelFiles

    def missing(choice, cap):
        raise UserError("TensorRT-RTX is not installed")

    monkeypatch.setattr(flavor, "resolve_flavor", missing)
    rows, skip = engine_builds.measure_engine_builds(ModelFiles.resolve(seed3_dir), log=lambda m: None)
    assert rows == [] and skip is not None and skip.reason == "engine builds: TensorRT-RTX is not installed"
    assert engine_builds.markdown([]) == []

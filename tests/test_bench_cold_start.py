"""bench --cold-start (issue 30 item 1): whole processes' stages, the report's figures, the servers' timing."""

from __future__ import annotations

import http.server
import json
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from ccld_trt import stage_clock
from ccld_trt.benchmarks.cold_start import (
    STAGE_NAMES,
    ColdConfig,
    ColdResults,
    ColdVariant,
    measure,
    read_marks,
    stage_seconds,
)
from ccld_trt.benchmarks.cold_start_report import document, markdown, rows, write_results
from ccld_trt.benchmarks.cold_start_servers import (
    ColdRunFailed,
    free_port,
    replica_restart_seconds,
    started_server,
)

TORCH = ColdVariant("torch", "fp32")
TENSORRT = ColdVariant("tensorrt", "fp16")  # never runs on a machine without a GPU: it must be reported as skipped
INFO = {"cpu_model": "Test CPU", "cores": 2, "date": "2026-12-06T17:00:00+00:00"}


def test_stage_seconds_are_the_gaps_between_marks() -> None:
    marks = [("imports", 101.5), ("cli", 100.25), ("written", 104.0), ("image", 103.0)]  # out of order on purpose
    assert stage_seconds(100.0, marks) == [("cli", 0.25), ("imports", 1.25), ("image", 1.5), ("written", 1.0)]
    assert stage_seconds(100.0, []) == []


def test_stage_clock_appends_marks_only_when_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "stages.tsv"
    monkeypatch.delenv(stage_clock.ENV, raising=False)
    stage_clock.mark("cli")
    assert not path.exists()
    monkeypatch.setenv(stage_clock.ENV, str(path))
    before = time.time()
    stage_clock.mark("backend ready")
    stage_clock.mark("image")
    marks = read_marks(path)
    assert [name for name, _ in marks] == ["backend ready", "image"]
    assert before <= marks[0][1] <= marks[1][1] <= time.time()


@pytest.fixture(scope="module")
def measured(tmp_path_factory: pytest.TempPathFactory, seed3_dir: Path) -> tuple[ColdResults, ColdConfig]:
    """One ``sample --fast`` process from nothing on torch fp32 (small demo weights), and tensorrt."""
    config = ColdConfig(variants=(TORCH, TENSORRT), modes=("fast",), repeats=1, parts=("first-run",),
                        server_variants=(), timeout_s=600)
    return measure(config, seed3_dir, tmp_path_factory.mktemp("cold"), log=lambda _: None), config


def test_a_sample_process_marks_every_stage_within_its_wall_time(measured: tuple[ColdResults, ColdConfig]) -> None:
    results, _ = measured
    run = results.first_run[TORCH.label]
    names = [name for name, _ in run["stages"]]
    # torch reads the networks before the backend is ready; every stage of cmd_sample is marked, in order
    assert names == ["python", "cli", "imports", "model files read", "backend ready", "image", "written"]
    assert set(names) == set(STAGE_NAMES)
    seconds = [s for _, s in run["stages"]]
    assert all(s >= 0 for s in seconds)
    assert sum(seconds) == pytest.approx(run["to_png_s"])  # the stages partition exec -> PNG written
    assert 0 < run["to_png_s"] <= run["wall_s"]


def test_every_backend_has_a_row_or_a_one_line_reason(measured: tuple[ColdResults, ColdConfig]) -> None:
    results, config = measured
    table = {r["variant"]: r for r in rows(results, config)}
    assert set(table) == {TORCH.label, TENSORRT.label}
    assert table[TORCH.label]["first_run"]["wall_s"] == results.first_run[TORCH.label]["wall_s"]
    assert table[TORCH.label]["fast"] is None  # no sample rounds were asked for
    assert table[TENSORRT.label]["first_run"] is None
    (skip,) = results.skipped
    assert skip["variant"] == TENSORRT.label and skip["part"] == "all"
    assert skip["reason"] and "\n" not in skip["reason"]
    text = markdown(document(results, config, INFO, {"demo": True, "size": "small"}, (1, 1, 1), (1, 1, 1), 60.0))
    assert f"- {TENSORRT.label} (all): {skip['reason']}" in text


def test_a_spent_time_budget_starts_nothing_and_says_so(tmp_path: Path) -> None:
    config = ColdConfig(variants=(TORCH,), modes=("fast",), repeats=1, parts=("first-run", "sample", "load"),
                        server_variants=(), budget_s=0.0)
    results = measure(config, tmp_path / "no-models-needed", tmp_path, log=lambda _: None)
    assert not results.sample and not results.first_run and not results.load
    assert [(s["part"], s["reason"]) for s in results.skipped] == [
        (part, "not run: the time budget (0 min) was spent") for part in ("first run", "sample fast", "load")]


def test_without_a_first_run_an_untimed_run_makes_the_artefacts_first(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Pipeline.load and the servers must not time an export: the artefacts are made before them."""
    from ccld_trt.benchmarks import cold_start

    calls: list[str] = []

    def run_sample(variant: object, mode: str, *_: object) -> dict[str, object]:
        calls.append(f"sample {mode}")
        return {"wall_s": 1.0, "to_png_s": 0.9, "stages": []}

    def run_load_probe(*_: object) -> dict[str, float]:
        calls.append("load")
        return {"import_s": 1.0, "load_s": 0.5, "first_image_s": 1.0, "warm_image_s": 1.0}

    monkeypatch.setattr(cold_start, "run_sample", run_sample)
    monkeypatch.setattr(cold_start, "run_load_probe", run_load_probe)
    config = ColdConfig(variants=(TORCH,), modes=("fast",), repeats=2, parts=("load",), server_variants=())
    results = measure(config, tmp_path, tmp_path, log=lambda _: None)
    assert calls == ["sample fast", "load", "load"]
    assert not results.first_run and not results.sample  # the untimed run is reported nowhere
    # the servers alone: only their variants are made (the others are not timed at all)
    calls.clear()
    monkeypatch.setattr(cold_start, "_measure_servers", lambda *_: calls.append("servers"))
    onnxruntime = ColdVariant("onnxruntime", "fp32")
    config = ColdConfig(variants=(onnxruntime, TORCH), modes=("fast",), repeats=1, parts=("serve",),
                        server_variants=(TORCH,))
    measure(config, tmp_path, tmp_path, log=lambda _: None)
    assert calls == ["sample fast", "servers"]  # torch's alone


def test_each_rounds_load_probe_runs_beside_its_fast_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The cold / warm ratio divides a round's --fast process by a warm image taken right beside it, not minutes
    later (a shared machine's speed drifts between parts: seen, 2.0 s against 1.8 s an hour apart)."""
    from ccld_trt.benchmarks import cold_start

    calls: list[str] = []

    def run_sample(variant: ColdVariant, mode: str, *_: object) -> dict[str, object]:
        calls.append(f"sample {mode} {variant.backend}")
        return {"wall_s": 1.0, "to_png_s": 0.9, "stages": []}

    def run_load_probe(variant: ColdVariant, *_: object) -> dict[str, float]:
        calls.append(f"load {variant.backend}")
        return {"import_s": 1.0, "load_s": 0.5, "first_image_s": 1.0, "warm_image_s": 1.0}

    monkeypatch.setattr(cold_start, "run_sample", run_sample)
    monkeypatch.setattr(cold_start, "run_load_probe", run_load_probe)
    onnxruntime = ColdVariant("onnxruntime", "fp32")
    config = ColdConfig(variants=(TORCH, onnxruntime), modes=("fast", "default"), repeats=2,
                        parts=("sample", "load"), server_variants=())
    results = measure(config, tmp_path, tmp_path, log=lambda _: None)
    assert calls == ["sample fast torch", "sample fast onnxruntime",  # the untimed runs that make the artefacts
                     "sample fast torch", "load torch", "sample fast onnxruntime", "load onnxruntime",
                     "sample fast onnxruntime", "load onnxruntime", "sample fast torch", "load torch",
                     "sample default torch", "sample default onnxruntime",  # the default's warm-ups, no probes
                     "sample default torch", "sample default onnxruntime",
                     "sample default onnxruntime", "sample default torch"]
    assert [len(results.load[v.label]) for v in config.variants] == [2, 2]


def _results() -> tuple[ColdResults, ColdConfig]:
    """Hand-made runs whose medians are known: fast walls 3, 1, 2 (median 2); the warm image 0.5 s."""
    def run(wall: float) -> dict[str, object]:
        return {"wall_s": wall, "to_png_s": wall - 0.1, "load_avg_1m": 2.5,
                "stages": [["cli", 0.2], ["imports", wall - 1.0], ["written", 0.7]]}

    results = ColdResults(sample={TORCH.label: {"fast": [run(3.0), run(1.0), run(2.0)], "default": [run(9.0)]}},
                          first_run={TORCH.label: run(7.0)},
                          load={TORCH.label: [{"import_s": 1.0, "load_s": 2.0, "first_image_s": 0.9,
                                               "warm_image_s": 0.5}]},
                          servers=[{"command": "serve", "variant": TORCH.label, "url_path": "/", "seconds": 4.25,
                                    "load_avg_1m": 2.0}])
    return results, ColdConfig(variants=(TORCH,), repeats=3)


def test_report_figures_are_medians_and_ratios_of_the_runs(tmp_path: Path) -> None:
    results, config = _results()
    (row,) = rows(results, config)
    assert row["fast"]["wall_s"] == 2.0 and row["fast"]["to_png_s"] == pytest.approx(1.9)
    assert row["fast"]["stages"] == {"cli": 0.2, "imports": 1.0, "written": 0.7}
    assert row["default"]["wall_s"] == 9.0
    assert row["overhead_s"] == pytest.approx(1.5) and row["cold_over_warm"] == pytest.approx(4.0)
    assert row["first_run"]["wall_s"] == 7.0
    doc = document(results, config, INFO, {"demo": True, "size": "full"}, (3.0, 2.0, 1.0), (2.0, 2.0, 1.0), 120.0)
    assert doc["load_avg"]["runs_1m"] == {"min": 2.0, "median": 2.5, "max": 2.5}  # the server's start included
    text = markdown(doc)
    assert "is one --fast run, which is also the --fast cells' warm-up" in text
    servers_only = markdown(document(ColdResults(servers=results.servers), ColdConfig(parts=("serve",)), INFO,
                                     {"demo": True}, (1.0,), (1.0,), 60.0))
    assert "an untimed --fast run per variant made them" in servers_only and "load average during the runs 2.0" \
        in servers_only
    assert "| torch fp32 | 2.00 | 9.00 | 0.50 | 4.0x | 1.50 | 7.00 |" in text
    assert "| `ccld-trt serve` until its page answers | torch fp32 | 4.25 |" in text
    assert "load average during the runs 2.5" in text and "busy-machine" in text
    first = write_results(doc, tmp_path)
    second = write_results(doc, tmp_path)  # the same date: a new name, nothing overwritten
    assert first != second and all(p.exists() for p in [*first, *second])
    assert json.loads(first[0].read_text())["rows"][0]["fast"]["wall_s"] == 2.0


def test_started_server_waits_for_the_answer_and_stops_the_server(tmp_path: Path) -> None:
    port = free_port()
    # a server that answers only after 1 s: the time measured must include that second
    script = ("import http.server, time; time.sleep(1.0); "
              f"http.server.ThreadingHTTPServer(('127.0.0.1', {port}), http.server.SimpleHTTPRequestHandler)"
              ".serve_forever()")
    with started_server([sys.executable, "-c", script], f"http://127.0.0.1:{port}/", {"PATH": ""}, 60) as seconds:
        assert 1.0 <= seconds < 60
        assert urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10).status == 200  # still serving
    with pytest.raises(urllib.error.URLError):  # stopped on leaving
        urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10)
    with pytest.raises(ColdRunFailed, match="exited 3 before answering"), \
            started_server([sys.executable, "-c", "raise SystemExit(3)"], f"http://127.0.0.1:{free_port()}/", {}, 60):
        pass


class FakeCluster:
    """A /v1/stats that lists one replica process (and a replica that died earlier, as Serve's stats still do for
    a while), and after it dies a new one (pid 4242) once ``delay`` passed."""

    def __init__(self, delay: float) -> None:
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        self.replica = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        self.delay, self.died_at = delay, None
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                pids = [dead.pid, fake.replica.pid] if fake.replica.poll() is None else []
                if not pids:
                    fake.died_at = fake.died_at or time.time()
                    if time.time() - fake.died_at >= fake.delay:
                        pids = [4242]
                body = json.dumps({"replicas": {f"r{p}": {"replica": p} for p in pids}}).encode()
                self.send_response(200 if pids else 503)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.replica.kill()
        self.replica.wait()


def test_replica_restart_is_timed_from_the_kill_to_a_new_replica_in_the_stats() -> None:
    cluster = FakeCluster(delay=1.0)
    try:
        seconds = replica_restart_seconds(cluster.url, 60)
        assert cluster.replica.wait(10) == -signal.SIGKILL  # the live replica listed was killed
        assert 1.0 <= seconds < 30
    finally:
        cluster.close()
    with pytest.raises(ColdRunFailed, match="lists no live model replica"):
        replica_restart_seconds(f"http://127.0.0.1:{free_port()}", 5)


def test_cli_parses_the_cold_start_flags() -> None:
    from ccld_trt.cli import build_parser

    args = build_parser().parse_args(["bench", "--cold-start", "--cold-parts", "sample,serve", "--repeats", "2"])
    assert args.cold_start and args.cold_parts == ("sample", "serve") and args.repeats == 2
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "--cold-start", "--cold-parts", "sample,bogus"])


def test_a_models_directory_that_does_not_exist_is_refused_not_replaced(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A mistyped --models (or $CCLD_TRT_MODELS) is one line, not minutes of benching random weights; a directory
    that exists but lacks weights, or the default ./models, still gets the demo weights (said once)."""
    from ccld_trt.benchmarks.plan import BenchConfig
    from ccld_trt.benchmarks.sessions import bench_model_files
    from ccld_trt.export.errors import UserError

    cache = tmp_path / "cache"
    monkeypatch.delenv("CCLD_TRT_MODELS", raising=False)
    with pytest.raises(UserError, match=r"models directory .*typo does not exist"):
        bench_model_files(BenchConfig(models=tmp_path / "typo", weights_cache=cache), print)
    monkeypatch.setenv("CCLD_TRT_MODELS", str(tmp_path / "typo-too"))
    with pytest.raises(UserError, match="typo-too does not exist"):
        bench_model_files(BenchConfig(weights_cache=cache), print)
    assert not cache.exists()  # nothing written
    monkeypatch.delenv("CCLD_TRT_MODELS")
    (tmp_path / "empty").mkdir()
    said: list[str] = []
    files, weights = bench_model_files(BenchConfig(models=tmp_path / "empty", demo_size="small", weights_cache=cache),
                                       said.append)
    assert weights == {"dir": str(cache / "small-seed0"), "demo": True, "size": "small"} and len(said) == 1
    files.check_present()
    monkeypatch.chdir(tmp_path)  # no ./models here: the default falls back alike, without writing again
    assert bench_model_files(BenchConfig(demo_size="small", weights_cache=cache), said.append)[1] == weights
    assert len(said) == 1

"""``ccld-trt bench --cold-start``: how long a user waits for the first image (issue 30).

Whole ``ccld-trt sample`` processes, from exec to the PNG written, per backend and for ``--fast`` and the default
sampler: the median of ``repeats`` runs after one warm-up, the (backend, mode) cells interleaved round by round
(a shared machine drifts), with the artefacts (ONNX graphs, OpenVINO's compile cache, Inductor's cache) already
made; and once per backend from nothing (an empty build directory and Inductor cache: export and compile included;
that --fast run is also the --fast cells' warm-up).
Each run's stages are taken inside the process: ``$CCLD_TRT_STAGES`` names a file that ``ccld_trt.stage_clock``
appends "<stage>\\t<epoch seconds>" lines to; a stage's seconds run from the previous mark (the first from the
moment this process called exec). Also ``Pipeline.load`` and the warm image after it (per backend, in a fresh
process each round, beside that round's ``--fast`` process), ``ccld-trt serve`` until its page answers and
``ccld-trt cluster`` until ``/v1/health`` is 200. The operating system's file cache stays warm throughout (the
model files were read moments before; it is shared with other work and not ours to drop), so "cold" here means a
new process, not a cold disk.

The report (``cold_start_report``) goes under benchmarks/results/<machine>/cold-start-<UTC time>.{json,md}.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ccld_trt.benchmarks.cold_start_servers import (
    ColdRunFailed,
    free_port,
    last_line,
    replica_restart_seconds,
    started_server,
)
from ccld_trt.benchmarks.plan import rotated
from ccld_trt.stage_clock import ENV as STAGES_ENV

PROMPT = "a lighthouse at dusk, oil on canvas"
MODES: dict[str, tuple[str, ...]] = {"fast": ("--fast",), "default": ()}  # sample's flags per mode
# Stage marks written by cli_sample.cmd_sample / runner (ccld_trt.stage_clock) and the names the report gives them
STAGE_NAMES = {"python": "interpreter", "cli": "CLI parser + its imports", "imports": "sample's imports",
               "model files read": "model files read",
               "backend ready": "backend ready", "image": "first image", "written": "write"}
PARTS = ("first-run", "sample", "load", "serve", "cluster")
REPLICA_SETTLE_S = 2.0  # before each replica kill: the previous replacement's warm-up and Serve's bookkeeping end


@dataclass(frozen=True)
class ColdVariant:
    """One backend as ``sample`` runs it: ``ccld-trt sample --backend B --precision P [--compile]``."""

    backend: str
    precision: str
    compiled: bool = False

    @property
    def label(self) -> str:
        return f"{self.backend} {self.precision}" + (" compiled" if self.compiled else "")

    @property
    def slug(self) -> str:
        return self.label.replace(" ", "-")

    def flags(self) -> list[str]:
        return ["--backend", self.backend, "--precision", self.precision] + (["--compile"] if self.compiled else [])


# Every backend that runs on a CPU; those that cannot run here are reported as skipped with the reason.
VARIANTS = (ColdVariant("torch", "fp32"), ColdVariant("onnxruntime", "fp32"), ColdVariant("openvino", "bf16"),
            ColdVariant("openvino", "fp32"), ColdVariant("torch", "fp32", compiled=True))
SERVER_VARIANTS = (ColdVariant("torch", "fp32"), ColdVariant("openvino", "bf16"))  # serve's start; the cluster: 1st


@dataclass(frozen=True)
class ColdConfig:
    """What to run. ``repeats``: timed runs per cell (after one warm-up each); ``timeout_s``: per process."""

    variants: tuple[ColdVariant, ...] = VARIANTS
    modes: tuple[str, ...] = tuple(MODES)
    repeats: int = 3
    parts: tuple[str, ...] = PARTS
    server_variants: tuple[ColdVariant, ...] = SERVER_VARIANTS
    timeout_s: float = 900.0
    server_timeout_s: float = 300.0
    budget_s: float | None = None  # once spent, what has not started is reported as not run (a busy machine)


def stage_seconds(exec_time: float, marks: Sequence[tuple[str, float]]) -> list[tuple[str, float]]:
    """The stages of one run: (mark name, seconds since the previous mark), in time order, the first counted from
    ``exec_time`` (epoch seconds). Their sum is the last mark's time after exec, at most the process's wall time."""
    stages, previous = [], exec_time
    for name, at in sorted(marks, key=lambda m: m[1]):
        stages.append((name, at - previous))
        previous = at
    return stages


def read_marks(path: Path) -> list[tuple[str, float]]:
    """The (stage, epoch seconds) lines ``stage_clock.mark`` wrote to ``path`` (none when it does not exist)."""
    if not path.exists():
        return []
    marks = []
    for line in path.read_text(encoding="utf-8").splitlines():
        name, _, at = line.rpartition("\t")
        marks.append((name, float(at)))
    return marks


def median_stages(runs: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Per stage name, the median of its seconds over ``runs`` (each {"stages": [[name, seconds], ...]}), over
    the runs that have it. (The medians of the stages need not add up to the median total.)"""
    seconds: dict[str, list[float]] = {}
    for run in runs:
        for name, s in run["stages"]:
            seconds.setdefault(name, []).append(s)
    return {name: statistics.median(values) for name, values in seconds.items()}


def ccld_trt_command() -> list[str]:
    """How a user starts ``ccld-trt`` in this environment: the console script beside this interpreter, else
    ``python -m ccld_trt``."""
    script = Path(sys.executable).parent / "ccld-trt"
    return [str(script)] if script.exists() else [sys.executable, "-m", "ccld_trt"]


def run_sample(variant: ColdVariant, mode: str, models: Path, env: Mapping[str, str], work: Path,
               timeout_s: float) -> dict[str, Any]:
    """One whole ``ccld-trt sample`` process in ``work`` (its output directory emptied first): wall seconds from
    exec to exit, seconds to the PNG written, and its stages. ColdRunFailed when it fails or times out."""
    out_dir, stages_file = work / "out", work / "stages.tsv"
    shutil.rmtree(out_dir, ignore_errors=True)
    stages_file.unlink(missing_ok=True)
    command = [*ccld_trt_command(), "sample", PROMPT, *MODES[mode], *variant.flags(), "--models", str(models),
               "--output-dir", str(out_dir)]
    load = os.getloadavg()[0]
    start = time.time()
    try:
        proc = subprocess.run(command, env={**env, STAGES_ENV: str(stages_file)}, capture_output=True, text=True,
                              timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        raise ColdRunFailed(f"sample {mode} did not finish within {timeout_s:.0f} s") from None
    wall = time.time() - start
    if proc.returncode != 0:
        raise ColdRunFailed(f"sample {mode} exited {proc.returncode}: {last_line(proc.stderr)}")
    if not list(out_dir.glob("*.png")):
        raise ColdRunFailed(f"sample {mode} wrote no PNG")
    marks = read_marks(stages_file)
    written = dict(marks).get("written")
    return {"wall_s": wall, "to_png_s": None if written is None else written - start,
            "stages": [list(s) for s in stage_seconds(start, marks)], "load_avg_1m": load}


# Run in a fresh interpreter: import, Pipeline.load, a first and a second (warm) --fast image. argv: models,
# backend, precision, prompt. Prints one JSON line.
_LOAD_PROBE = """
import json, sys, time
t0 = time.perf_counter()
from ccld_trt import Pipeline
import ccld_trt.api
t1 = time.perf_counter()
pipe = Pipeline.load(sys.argv[1], backend=sys.argv[2], precision=sys.argv[3])
t2 = time.perf_counter()
first = pipe([sys.argv[4]], fast=True, progress=False)
t3 = time.perf_counter()
warm = pipe([sys.argv[4]], fast=True, progress=False)
t4 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "first_image_s": t3 - t2, "warm_image_s": t4 - t3,
                  "warm_stages": warm.seconds}))
"""


def run_load_probe(variant: ColdVariant, models: Path, env: Mapping[str, str], timeout_s: float) -> dict[str, Any]:
    """``import ccld_trt`` + ``Pipeline``, ``Pipeline.load`` and a first and a warm ``fast=True`` image, timed in
    a fresh process (seconds). ColdRunFailed when it fails."""
    if variant.compiled:
        raise ColdRunFailed("Pipeline.load has no compile option")
    try:
        proc = subprocess.run([sys.executable, "-c", _LOAD_PROBE, str(models), variant.backend, variant.precision,
                               PROMPT],
                              env=dict(env), capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        raise ColdRunFailed(f"Pipeline.load did not finish within {timeout_s:.0f} s") from None
    if proc.returncode != 0:
        raise ColdRunFailed(f"Pipeline.load exited {proc.returncode}: {last_line(proc.stderr)}")
    try:
        result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        raise ColdRunFailed(f"Pipeline.load printed no result: {last_line(proc.stdout)}") from None
    return result


@dataclass
class ColdResults:
    """What ``measure`` found, per variant label: sample runs per mode, the first run from nothing, the load
    probes, the servers' seconds, and one-line reasons for what did not run."""

    sample: dict[str, dict[str, list[dict[str, Any]]]] = field(default_factory=dict)  # label -> mode -> runs
    first_run: dict[str, dict[str, Any]] = field(default_factory=dict)
    load: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    servers: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)  # {"variant", "part", "reason"}

    def skip(self, variant: str, part: str, reason: str) -> None:
        self.skipped.append({"variant": variant, "part": part, "reason": reason})


def runnable(variant: ColdVariant) -> str | None:
    """None when ``variant`` can run here, else the one-line reason (said before anything loads)."""
    from ccld_trt.benchmarks.sessions import failure_reason
    from ccld_trt.runner import BackendOptions

    try:
        BackendOptions(variant.backend, "cpu", variant.precision, compiled=variant.compiled).resolved()
    except Exception as e:  # the report says why, whatever it is
        return failure_reason(e)
    return None


def variant_env(variant: ColdVariant, root: Path) -> dict[str, str]:
    """The environment of ``variant``'s processes: its own build directory (ONNX graphs, OpenVINO's cache) and
    Inductor cache under ``root``, so that its first run starts from nothing and no other work shares them."""
    home = root / variant.slug
    return {**os.environ, "CCLD_TRT_BUILD": str(home / "build"), "TORCHINDUCTOR_CACHE_DIR": str(home / "inductor")}


def measure(config: ColdConfig, models: Path, root: Path, log: Callable[[str], None] = print) -> ColdResults:
    """Run ``config``'s parts on the model directory ``models``, with every variant's artefacts under ``root``
    (which should start empty). Failures are reported per variant and part, never raised; Ctrl-C stops the
    bench with what was measured so far (the report says it was interrupted)."""
    results = ColdResults()
    try:
        _measure(config, models, root, log, results)
    except KeyboardInterrupt:
        results.skip("all", "all", "interrupted (Ctrl-C): what had not finished was not measured")
        log("interrupted: writing what was measured")
    return results


def _measure(config: ColdConfig, models: Path, root: Path, log: Callable[[str], None], results: ColdResults) -> None:
    live = []
    for variant in config.variants:
        reason = runnable(variant)
        if reason:
            results.skip(variant.label, "all", reason)
            log(f"{variant.label}: skipped: {reason}")
        else:
            live.append(variant)
    work = root / "runs"
    work.mkdir(parents=True, exist_ok=True)
    deadline = time.time() + config.budget_s if config.budget_s is not None else None

    def out_of_time(variant: ColdVariant, part: str) -> bool:
        if deadline is None or time.time() < deadline:
            return False
        if not any(s["variant"] == variant.label and s["part"] == part for s in results.skipped):
            minutes = (config.budget_s or 0) / 60
            results.skip(variant.label, part, f"not run: the time budget ({minutes:.0f} min) was spent")
        return True

    def sample(variant: ColdVariant, mode: str, what: str) -> dict[str, Any] | None:
        part = what if what == "first run" else f"sample {mode}"
        if out_of_time(variant, part):
            return None
        try:
            run = run_sample(variant, mode, models, variant_env(variant, root), work, config.timeout_s)
        except ColdRunFailed as e:
            results.skip(variant.label, part, f"{what}: {e}")
            log(f"{variant.label} {what}: failed: {e}")
            if variant in live:
                live.remove(variant)
            return None
        log(f"{variant.label} {what}: {run['wall_s']:.2f} s")
        return run

    # From nothing first: it makes the artefacts every later part finds (an empty build dir and Inductor cache);
    # without it, an untimed --fast run makes them (else Pipeline.load and the servers would time an export)
    processes = {"first-run", "sample", "load"} & set(config.parts)
    for variant in [v for v in live if processes or v in config.server_variants]:
        run = sample(variant, "fast", "first run" if "first-run" in config.parts else "fast warm-up")
        if run is not None and "first-run" in config.parts:
            results.first_run[variant.label] = run

    def load(variant: ColdVariant) -> None:
        if any(s["variant"] == variant.label and s["part"] == "load" for s in results.skipped) or \
                out_of_time(variant, "load"):
            return
        try:
            probe = run_load_probe(variant, models, variant_env(variant, root), config.timeout_s)
        except ColdRunFailed as e:
            results.skip(variant.label, "load", str(e))
            return
        log(f"{variant.label} Pipeline.load: {probe['load_s']:.2f} s, warm image {probe['warm_image_s']:.2f} s")
        results.load.setdefault(variant.label, []).append(probe)

    def sample_rounds(mode: str, with_load: bool) -> None:
        for variant in list(live):
            if mode != "fast":  # the run above was --fast's warm-up
                sample(variant, mode, f"{mode} warm-up")
        for r in range(config.repeats):
            for variant in rotated(list(live), r):
                if variant in live and (run := sample(variant, mode, f"{mode} round {r + 1}")) is not None:
                    results.sample.setdefault(variant.label, {}).setdefault(mode, []).append(run)
                if with_load and variant in live:
                    load(variant)

    # The first mode (--fast) first, each round's Pipeline.load probes (whose warm image is the cold / warm ratio's
    # divisor) right beside its processes, so that a machine whose speed drifts moves both alike; the other modes,
    # the slowest runs, last, so that a time budget cuts them first
    modes = list(config.modes) if "sample" in config.parts else []
    if modes:
        sample_rounds(modes[0], with_load="load" in config.parts)
    elif "load" in config.parts:
        for r in range(config.repeats):
            for variant in rotated(live, r):
                load(variant)
    _measure_servers(config, models, root, live, results, log, out_of_time)
    for mode in modes[1:]:
        sample_rounds(mode, with_load=False)


def _measure_servers(config: ColdConfig, models: Path, root: Path, live: Sequence[ColdVariant],
                     results: ColdResults, log: Callable[[str], None],
                     out_of_time: Callable[[ColdVariant, str], bool]) -> None:
    """``serve`` until its page answers (each server variant, ``repeats`` starts interleaved), ``cluster`` until
    /v1/health is 200 (the first variant, one start) and then ``repeats`` kills of one of its model replicas."""
    servers = [v for v in config.server_variants if v in live]
    for variant in [v for v in config.server_variants if v not in live]:
        results.skip(variant.label, "servers", "cannot run here (see above)")
    if "serve" in config.parts:
        _measure_serve(config, models, root, servers, results, log, out_of_time)
    if "cluster" in config.parts and servers and not out_of_time(servers[0], "cluster"):
        import importlib.util

        if importlib.util.find_spec("ray") is None:
            results.skip(servers[0].label, "cluster", "Ray is not installed (pip install 'ccld-trt[cluster]')")
        else:
            _measure_cluster(config, models, root, servers[0], results, log)


def _server(command: str, variant: ColdVariant, models: Path) -> tuple[list[str], str, dict[str, Any]]:
    """(argv, the URL that answers once it is up, the report row's fields) of a ``command`` server on a free port."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/" + ("v1/health" if command == "cluster" else "")
    argv = [*ccld_trt_command(), command, *variant.flags(), "--models", str(models), "--port", str(port)]
    return argv, url, {"command": command, "variant": variant.label, "url_path": url.split(str(port))[1]}


def _measure_serve(config: ColdConfig, models: Path, root: Path, servers: Sequence[ColdVariant],
                   results: ColdResults, log: Callable[[str], None],
                   out_of_time: Callable[[ColdVariant, str], bool]) -> None:
    runs: dict[ColdVariant, list[float]] = {v: [] for v in servers}
    rows: dict[ColdVariant, dict[str, Any]] = {}
    failed: dict[ColdVariant, str] = {}
    for _ in range(config.repeats):
        for variant in [v for v in servers if v not in failed and not out_of_time(v, "serve")]:
            argv, url, rows[variant] = _server("serve", variant, models)
            try:
                with started_server(argv, url, variant_env(variant, root), config.server_timeout_s) as seconds:
                    runs[variant].append(seconds)
                    log(f"{variant.label} serve: answering after {seconds:.2f} s")
            except Exception as e:  # whatever it was, the report says so and the bench goes on
                failed[variant] = str(e)
                log(f"{variant.label} serve: failed: {e}")
    for variant, times in runs.items():
        if times:
            results.servers.append({**rows[variant], "seconds": statistics.median(times), "runs": times,
                                    "load_avg_1m": os.getloadavg()[0]})
        if variant in failed:
            results.skip(variant.label, "serve", failed[variant])


def _measure_cluster(config: ColdConfig, models: Path, root: Path, variant: ColdVariant, results: ColdResults,
                     log: Callable[[str], None]) -> None:
    argv, url, row = _server("cluster", variant, models)
    try:
        with started_server(argv, url, variant_env(variant, root), config.server_timeout_s) as seconds:
            log(f"{variant.label} cluster: answering after {seconds:.2f} s")
            results.servers.append({**row, "seconds": seconds, "load_avg_1m": os.getloadavg()[0]})
            restarts = []
            for _ in range(config.repeats):
                time.sleep(REPLICA_SETTLE_S)
                restarts.append(replica_restart_seconds(url.removesuffix("/v1/health"), config.server_timeout_s))
                log(f"{variant.label} cluster: a killed model replica replaced after {restarts[-1]:.2f} s")
            results.servers.append({**row, "command": "replica", "url_path": "/v1/stats",
                                    "seconds": statistics.median(restarts), "runs": restarts,
                                    "load_avg_1m": os.getloadavg()[0]})
    except Exception as e:  # whatever it was, the report says so and the bench goes on
        results.skip(variant.label, "cluster", str(e))
        log(f"{variant.label} cluster: failed: {e}")

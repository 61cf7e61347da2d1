"""The cold-start report (``bench --cold-start``): one JSON document and its Markdown, written as
cold-start-<UTC time>.{json,md} under benchmarks/results/<machine>/ (never overwritten); ``run_cold_start``
measures (``cold_start.measure``) and writes it.

JSON layout::

    {"kind": "cold-start", "machine": "<CPU>, <n> cores", "date", "machine_info": machine.machine_info(),
     "load_avg": {"before": [1, 5, 15 min], "after": [...], "runs_1m": {"min", "median", "max"}},
     "setup": {"weights", "prompt", "repeats", "modes", "parts", "seconds"},
     "rows": [{"variant", "<mode>": {"wall_s", "to_png_s", "runs", "stages": {name: s}} | null, ...,
               "first_run": {"wall_s", "to_png_s", "stages"} | null,
               "load": {"import_s", "load_s", "first_image_s", "warm_image_s", "runs"} | null,
               "overhead_s": fast wall - warm image | null, "cold_over_warm": fast wall / warm image | null}],
     "servers": [{"command", "variant", "url_path", "seconds", "load_avg_1m", "runs" (serve, replica)}],
     "skipped": [{"variant", "part", "reason"}],
     "raw": {"sample", "first_run", "load"}}
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ccld_trt.benchmarks.cold_start import STAGE_NAMES, ColdConfig, ColdResults, measure, median_stages
from ccld_trt.export.atomic import write_atomic


def _median(runs: Sequence[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


def summary(runs: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """Medians of sample runs: wall and to-PNG seconds, and each stage's (None without runs)."""
    if not runs:
        return None
    return {"wall_s": _median(runs, "wall_s"), "to_png_s": _median(runs, "to_png_s"), "runs": len(runs),
            "stages": median_stages(runs)}


def _load_summary(probes: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    if not probes:
        return None
    keys = ("import_s", "load_s", "first_image_s", "warm_image_s")
    return {**{k: _median(probes, k) for k in keys}, "runs": len(probes)}


def rows(results: ColdResults, config: ColdConfig) -> list[dict[str, Any]]:
    """One row per configured variant (those that did not run have None cells; ``skipped`` says why)."""
    out = []
    for variant in config.variants:
        label = variant.label
        modes = results.sample.get(label, {})
        row: dict[str, Any] = {"variant": label, **{m: summary(modes.get(m, [])) for m in config.modes}}
        first = results.first_run.get(label)
        row["first_run"] = None if first is None else {k: first[k] for k in ("wall_s", "to_png_s")} | {
            "stages": dict((name, s) for name, s in first["stages"])}
        row["load"] = _load_summary(results.load.get(label, []))
        fast, warm = row.get("fast"), (row["load"] or {}).get("warm_image_s")
        row["overhead_s"] = fast["wall_s"] - warm if fast and warm else None
        row["cold_over_warm"] = fast["wall_s"] / warm if fast and warm else None
        out.append(row)
    return out


def document(results: ColdResults, config: ColdConfig, info: dict[str, Any], weights: dict[str, Any],
             load_before: Sequence[float], load_after: Sequence[float], seconds: float) -> dict[str, Any]:
    """The JSON document of a run (see the module's docstring)."""
    from ccld_trt.benchmarks.cold_start import PROMPT

    loads = [r["load_avg_1m"] for modes in results.sample.values() for runs in modes.values() for r in runs]
    loads += [r["load_avg_1m"] for r in [*results.first_run.values(), *results.servers]]
    weights_text = (f"{weights.get('size') or ''} random demo weights".strip() if weights.get("demo")
                    else f"weights from {weights.get('dir')}")
    return {
        "kind": "cold-start", "machine": f"{info['cpu_model']}, {info['cores']} cores", "date": info["date"],
        "machine_info": info,
        "load_avg": {"before": list(load_before), "after": list(load_after),
                     "runs_1m": {"min": min(loads), "median": statistics.median(loads), "max": max(loads)}
                     if loads else None},
        "setup": {"weights": weights_text, "weights_dir": weights.get("dir"), "prompt": PROMPT,
                  "repeats": config.repeats, "modes": list(config.modes), "parts": list(config.parts),
                  "variants": [v.label for v in config.variants], "seconds": seconds},
        "rows": rows(results, config), "servers": results.servers, "skipped": results.skipped,
        "raw": {"sample": results.sample, "first_run": results.first_run, "load": results.load},
    }


def _s(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _table(header: Sequence[str], body: Sequence[Sequence[str]], right_from: int = 1) -> list[str]:
    align = ["---" if i < right_from else "---:" for i in range(len(header))]
    return ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |",
            *("| " + " | ".join(cells) + " |" for cells in body)]


def markdown(doc: dict[str, Any]) -> str:
    """The report: setup and load, whole-process seconds cold beside warm, the stage breakdown, Pipeline.load,
    the servers, and what was skipped."""
    setup, load = doc["setup"], doc["load_avg"]
    runs_load = load.get("runs_1m")
    busy = (f"1-minute load average during the runs {runs_load['median']:.1f} (from {runs_load['min']:.1f} to "
            f"{runs_load['max']:.1f}) on {doc['machine_info']['cores']} cores"
            if runs_load else "no runs to take the load average of")
    shared = " — other work shared the cores, so these are busy-machine figures" if runs_load and \
        runs_load["median"] > 0.5 * doc["machine_info"]["cores"] else ""
    made = ("the first run from nothing (an empty build directory and Inductor cache: export and compile "
            "included) is one --fast run, which is also the --fast cells' warm-up"
            if "first-run" in setup.get("parts", ["first-run"]) else
            "without a first run from nothing, an untimed --fast run per variant made them")
    lines = [f"## Cold start — {doc['machine']}, {doc['date']}", "",
             f"{setup['weights']}, one 256x256 image of {setup['prompt']!r}. Whole `ccld-trt sample` processes, "
             f"exec to exit: the median of {setup['repeats']} run(s) per cell after one warm-up, the cells "
             "interleaved round by round, with the artefacts (ONNX graphs, OpenVINO's cache, Inductor's cache) "
             f"already made; {made}. The file cache was warm (a new process, not a cold disk). "
             f"Machine: {busy}{shared}. The whole bench took {setup['seconds'] / 60:.1f} min.", ""]
    rows = doc["rows"]
    modes = setup["modes"]
    lines += ["### Time to first image (seconds)", ""]
    header = ["backend", *(f"sample{' --fast' if m == 'fast' else ''}" for m in modes),
              "warm --fast image (in a loaded process)", "cold / warm", "start-up overhead", "first run from nothing"]
    body = [[r["variant"], *(_s((r.get(m) or {}).get("wall_s")) for m in modes),
             _s((r["load"] or {}).get("warm_image_s")), _s(r["cold_over_warm"], 1) + ("x" if r["cold_over_warm"]
                                                                                       else ""),
             _s(r["overhead_s"]), _s((r["first_run"] or {}).get("wall_s"))] for r in rows]
    lines += _table(header, body)
    lines += ["", "Warm image: the second --fast image of a `Pipeline.load` process, run in the same rounds as the "
                  "--fast processes, each beside its backend's; start-up overhead: the --fast process minus the warm "
                  "image's own seconds.", "",
              "### Where the seconds go (median per stage, taken inside the process)", ""]
    names = list(STAGE_NAMES)
    body = []
    for r in rows:
        for mode in [*modes, "first_run"]:
            cell = r.get(mode)
            if not cell:
                continue
            stages = cell["stages"]
            what = "first run from nothing (--fast)" if mode == "first_run" else \
                ("--fast" if mode == "fast" else mode)
            exit_s = cell["wall_s"] - cell["to_png_s"] if cell.get("to_png_s") is not None else None
            body.append([r["variant"], what, *(_s(stages.get(n)) for n in names), _s(exit_s),
                         _s(cell["wall_s"])])
    lines += _table(["backend", "run", *STAGE_NAMES.values(), "exit", "whole process"], body, right_from=2)
    lines += ["", "Stages: interpreter is exec to `ccld_trt.cli.run`; CLI parser + its imports runs to `sample`'s "
                  "code; sample's imports are the rest of its imports and the job's checks (torch's import, except "
                  "for a text job on a graph backend that runs without torch); model files read is the torch "
                  "networks' loading, or only the graphs' manifest where they are current; backend ready is the "
                  "rest of opening the backend (export, graphs read, compile, or the wait for the graphs a thread "
                  "opened meanwhile); first image is conditioning, sampling and decoding; write is the PNG; exit is "
                  "the interpreter's shutdown. A stage the run did not mark is '—' and its seconds fall in the next "
                  "one.", ""]
    with_load = [r for r in rows if r["load"]]
    if with_load:
        lines += ["### `Pipeline.load` (a fresh process each, median)", ""]
        lines += _table(["backend", "import ccld_trt + Pipeline", "Pipeline.load", "first image", "warm image"],
                        [[r["variant"], _s(r["load"]["import_s"]), _s(r["load"]["load_s"]),
                          _s(r["load"]["first_image_s"]), _s(r["load"]["warm_image_s"])] for r in with_load])
        lines.append("")
    if doc["servers"]:
        lines += ["### Servers (`serve`: the median of its starts, interleaved; `cluster`: one start; a replica: the "
                  "median of its kills)", ""]
        what = {"serve": "`ccld-trt serve` until its page answers",
                "cluster": "`ccld-trt cluster` until `/v1/health` is 200",
                "replica": "a cluster's model replica, killed, until a new one reports ready"}
        lines += _table(["what", "backend", "seconds"],
                        [[what[s["command"]], s["variant"], _s(s["seconds"])] for s in doc["servers"]], right_from=2)
        lines.append("")
    if doc["skipped"]:
        lines += ["### Not measured", ""]
        lines += [f"- {s['variant']} ({s['part']}): {s['reason']}" for s in doc["skipped"]]
        lines.append("")
    return "\n".join(lines)


def write_results(doc: dict[str, Any], out_dir: Path) -> list[Path]:
    """JSON and Markdown under ``out_dir`` as cold-start-<UTC time>.* (never overwritten)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = doc["date"].replace(":", "").replace("-", "").split("+")[0]
    stem = out_dir / f"cold-start-{stamp}"
    n = 1
    while stem.with_suffix(".json").exists():  # two runs within a second
        stem, n = out_dir / f"cold-start-{stamp}-{n}", n + 1
    write_atomic(stem.with_suffix(".json"), json.dumps(doc, indent=2, default=_jsonable) + "\n")
    write_atomic(stem.with_suffix(".md"), markdown(doc))
    return [stem.with_suffix(".json"), stem.with_suffix(".md")]


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def run_cold_start(config: ColdConfig, models: Path, output: Path, weights: dict[str, Any],
                   log: Callable[[str], None] = print, root: Path | None = None) -> tuple[dict[str, Any],
                                                                                        list[Path]]:
    """Measure (artefacts in ``root``, default a temporary directory removed afterwards), then write the report
    under ``output``/<machine>/; returns the document and the paths written."""
    from ccld_trt.benchmarks.machine import machine_info, machine_slug

    load_before = os.getloadavg()
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="ccld-trt-cold-") as tmp:
        results = measure(config, models, root or Path(tmp), log)
    info = machine_info("cpu")
    doc = document(results, config, info, weights, load_before, os.getloadavg(), time.time() - started)
    return doc, write_results(doc, output / machine_slug(info))

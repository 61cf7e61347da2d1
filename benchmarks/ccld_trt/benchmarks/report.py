"""Benchmark results on disk: the versioned JSON document, a Markdown report and a plot (headless).

JSON layout (``schema_version`` 1)::

    {"schema_version": 1,
     "machine": {"cpu_model", "cpu": {"vendor", "family", "model", "stepping", "isa": [...]}, "cores",
                 "torch_threads", "ram_gb", "gpu": null | {"name", "memory_gb", ...}, "device", "os", "python",
                 "torch", "onnxruntime", "openvino", "tensorrt", "date"},
     "run": {"device", "quick", "repeats", "warmup", "e2e_repeats", "e2e_warmup_steps", "seed", "method",
             "prompt", "weights",
             "gemm_peak_gflops": {"fp32": ..., "bf16": ..., "int8": ...},
             "gemm_kernel_gflops": {precision: {kernel: ...}}, "reference", "thresholds", ...},
     "results": [one object per records.Record],
     "op_profiles": [{"backend", "precision", "graph", "batch", "ops": [{"op", "ms", "share", "nodes"}]}],
     "skipped": [one object per records.Skip: {"backend", "precision", "reason"}]}

``op_profiles`` (ONNX Runtime's kernel time per op type) may be absent: runs before it was added lack it, as
they lack ``machine.cpu``, ``machine.openvino``, ``run.gemm_kernel_gflops`` and the records' ``peak_error``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ccld_trt.benchmarks.engine_builds import markdown as engine_builds_markdown
from ccld_trt.benchmarks.machine import machine_slug
from ccld_trt.export.errors import UserError

SCHEMA_VERSION = 1
STAGES = ("text-encoder", "image-encoder", "unet", "sampler-step", "decoder", "end-to-end")
# What every record has; compare() matches records on KEY_FIELDS
REQUIRED_KEYS = ("backend", "precision", "stage", "batch", "median_ms", "p90_ms", "min_ms", "repeats", "flops",
                 "achieved_gflops", "peak_fraction", "peak_rss_mb", "steps", "n", "images_per_s",
                 "latents_rel_error", "psnr_db", "flagged")
KEY_FIELDS = ("backend", "precision", "stage", "batch", "steps", "n")


@dataclass(frozen=True)
class ReportPaths:
    json: Path
    markdown: Path
    plot: Path


def load_results(path: Path | str) -> dict[str, Any]:
    """A results JSON, checked for this schema version and the record keys (UserError otherwise)."""
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read benchmark results {path}: {e}") from e
    if not isinstance(doc, dict) or doc.get("schema_version") != SCHEMA_VERSION:
        found = doc.get("schema_version") if isinstance(doc, dict) else None
        raise UserError(f"{path}: benchmark schema_version {found!r}, this version reads {SCHEMA_VERSION}")
    for i, record in enumerate(doc.get("results", [])):
        missing = [k for k in REQUIRED_KEYS if k not in record]
        if missing:
            raise UserError(f"{path}: results[{i}] lacks {', '.join(missing)}")
    return doc


def _num(value: float | None, digits: int = 1) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def _giga(value: int | None) -> str:
    return "—" if value is None else f"{value / 1e9:.3g}"


def _intensity(r: dict[str, Any]) -> str:
    traffic = (r.get("weight_bytes") or 0) + 2 * (r.get("activation_bytes") or 0)
    return "—" if not r.get("flops") or not traffic else f"{r['flops'] / traffic:,.1f}"


def _table(header: Iterable[str], rows: Iterable[Iterable[str]]) -> list[str]:
    header = list(header)
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(row) + " |" for row in rows)]


def record_order(records: list[dict[str, Any]]) -> Callable[[dict[str, Any]], tuple[Any, ...]]:
    """Sort key: backend/precision in the order they were measured (the reference first), then the stage in
    pipeline order, batch, steps."""
    rank = {v: i for i, v in enumerate(dict.fromkeys((r["backend"], r["precision"]) for r in records))}

    def key(r: dict[str, Any]) -> tuple[Any, ...]:
        return (rank[r["backend"], r["precision"]], STAGES.index(r["stage"]), r["batch"], r.get("steps") or 0)

    return key


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _peak_text(run: dict[str, Any], precision: str) -> str:
    """e.g. "fp32 412 GFLOP/s (onnxruntime; torch 200, openvino 390)"."""
    best = run["gemm_peak_gflops"][precision]
    kernels = run.get("gemm_kernel_gflops", {}).get(precision, {})
    if not kernels:
        return f"{precision} {best:,.0f} GFLOP/s"
    top = max(kernels, key=kernels.get)
    others = ", ".join(f"{k} {v:,.0f}" for k, v in kernels.items() if k != top)
    return f"{precision} {best:,.0f} GFLOP/s ({top}" + (f"; {others})" if others else ")")


def _cpu_identity(m: dict[str, Any]) -> str:
    """" (family 25 model 17; avx512f avx512_bf16 ...)" from the machine's ``cpu`` entry, "" without one."""
    cpu = m.get("cpu") or {}
    if cpu.get("family") is None:
        return ""
    isa = " ".join(cpu.get("isa") or []) or "no listed ISA extensions"
    return f" (family {cpu['family']} model {cpu['model']}; {isa})"


def _peak_cell(r: dict[str, Any]) -> str:
    """The "% peak" cell: the share of the precision's peak, or a flag where it exceeded 100 %."""
    if r.get("peak_error"):
        return "**>100 %: measurement error**"
    return _num(None if r["peak_fraction"] is None else 100 * r["peak_fraction"])


def flagged(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The end-to-end records judged fast but wrong."""
    return [r for r in doc["results"] if r.get("flagged")]


def to_markdown(doc: dict[str, Any], plot_name: str | None = None) -> str:
    """The human-readable report: machine, flagged and skipped backends, stage table, end-to-end table."""
    m, run = doc["machine"], doc["run"]
    peaks = "; ".join(_peak_text(run, p) for p in run["gemm_peak_gflops"])
    gpu = f"{m['gpu']['name']} ({m['gpu']['memory_gb']} GB)" if m.get("gpu") else "none"
    weights = run["weights"]
    e2e_warmup = (f"a {run['e2e_warmup_steps']}-step warm-up run at the same n" if run["e2e_warmup_steps"]
                  else "no warm-up")
    demo_note = ""
    if weights["demo"]:
        size = f", size {weights['size']}" if weights["size"] else ""
        demo_note = f" (RANDOM demo weights{size}: correctness compares backends with each other, not image quality)"
    lines = [
        f"# ccld-trt benchmark — {machine_slug(m)}", "",
        f"- date: {m['date']}; device: {run['device']}; {'quick run' if run['quick'] else 'full run'}",
        f"- CPU: {m['cpu_model']}{_cpu_identity(m)}, {m['cores']} cores ({m['torch_threads']} torch threads), "
        f"RAM {m['ram_gb']} GB; GPU: {gpu}",
        f"- torch {m['torch']}, onnxruntime {m['onnxruntime'] or '—'}, openvino {m.get('openvino') or '—'}, "
        f"tensorrt {m['tensorrt'] or '—'}, Python {m['python']}",
        f"- measured GEMM peaks (square matmul, the best kernel per precision, each the better of a measurement "
        f"before and one after the backends; int8 in integer GOP/s): {peaks}; `% peak` is against the peak of "
        f"the row's precision (fp16 on the CPU: fp32), and a row above 100 % is a measurement error, not shown",
        f"- weights: {weights['dir']}{demo_note}",
        f"- timings: median/p90/min of {_plural(run['repeats'], 'repeat')} after {run['warmup']} warm-up "
        f"(end-to-end: {_plural(run['e2e_repeats'], 'repeat')} after {e2e_warmup}, the backends' repeats "
        f"interleaved: round r runs each backend once); {run['method']}, "
        f"seed {run['seed']}, prompt {run['prompt']!r}",
        f"- correctness: end-to-end vs {run['reference']['backend']} {run['reference']['precision']} on the same "
        f"seed; flagged when fp32 latents rel error > {run['thresholds']['fp32_latents_rel_error']:g} or a "
        f"reduced precision's PSNR < {run['thresholds']['reduced_precision_psnr_db']:g} dB", "",
    ]
    bad = flagged(doc)
    if bad:
        lines += ["## FLAGGED: fast but wrong", ""]
        lines += [f"- **{r['backend']} {r['precision']}** (steps {r['steps']}, n {r['n']}): {r['flag_reason']}"
                  for r in bad]
        lines.append("")
    if doc["skipped"]:
        lines += ["## Skipped", "", *_table(["backend", "precision", "reason"],
                                            ([s["backend"], s["precision"], s["reason"]] for s in doc["skipped"])),
                  ""]
    lines += engine_builds_markdown(doc.get("engine_builds", []))
    records = sorted(doc["results"], key=record_order(doc["results"]))
    stages = [r for r in records if r["stage"] != "end-to-end"]
    if stages:
        lines += ["## Stages", "", "U-Net and sampler-step batches are images; the U-Net runs batch × 2 rows "
                  "(zero and text condition). FLOPs count matmuls and convolutions, as each backend computes them: "
                  "onnxruntime and tensorrt run the exported decoder, whose upsampling convolutions do 2.25x fewer "
                  "multiply-adds than the torch module's. FLOP/byte divides them by an unfused fp32 traffic "
                  "estimate (weights + 2 × activations written).", ""]
        lines += _table(
            ["backend", "precision", "stage", "batch", "median ms", "p90 ms", "min ms", "GFLOP", "GFLOP/s",
             "% peak", "FLOP/byte", "peak RSS MiB", "device MiB"],
            ([r["backend"], r["precision"], r["stage"], str(r["batch"]), _num(r["median_ms"], 2),
              _num(r["p90_ms"], 2), _num(r["min_ms"], 2), _giga(r["flops"]), _num(r["achieved_gflops"]),
              _peak_cell(r), _intensity(r),
              _num(r["peak_rss_mb"], 0), _num(r.get("device_peak_mb"), 0)] for r in stages))
        lines.append("")
    e2e = [r for r in records if r["stage"] == "end-to-end"]
    if e2e:
        lines += ["## End to end", "", "One text prompt to n decoded images in one batch.", ""]
        lines += _table(
            ["backend", "precision", "steps", "n", "median s", "min s", "images/s", "TFLOP", "% peak",
             "latents rel err", "PSNR dB", "max |Δpixel|", "verdict"],
            ([r["backend"], r["precision"], str(r["steps"]), str(r["n"]), _num(r["median_ms"] / 1e3, 2),
              _num(r["min_ms"] / 1e3, 2), _num(r["images_per_s"], 3),
              "—" if r["flops"] is None else f"{r['flops'] / 1e12:,.2f}",
              _peak_cell(r),
              "—" if r["latents_rel_error"] is None else f"{r['latents_rel_error']:.2e}",
              ("∞" if r["pixels_max_abs_diff"] == 0 else "—") if r["psnr_db"] is None else _num(r["psnr_db"]),
              "—" if r.get("pixels_max_abs_diff") is None else str(r["pixels_max_abs_diff"]),
              "**FLAGGED: fast but wrong**" if r["flagged"] else ("ok" if r["latents_rel_error"] is not None
                                                                 else "no reference")] for r in e2e))
        lines.append("")
    lines += _op_profile_lines(doc.get("op_profiles", []))
    if plot_name:
        lines += [f"![latency and throughput]({plot_name})", ""]
    return "\n".join(lines) + "\n"


def _op_profile_lines(profiles: list[dict[str, Any]], top: int = 6) -> list[str]:
    """"Where the time goes": the ``top`` op types of each profiled graph by kernel time, the rest summed."""
    if not profiles:
        return []
    lines = ["## Where ONNX Runtime's time goes", "",
             "Kernel time per op type at batch 1 (ONNX Runtime's profiler; op types after its graph "
             "optimisations).", ""]
    for p in profiles:
        ops = p["ops"]
        shown, rest = ops[:top], ops[top:]
        rows = [[o["op"], str(o["nodes"]), _num(o["ms"], 1), _num(100 * o["share"])] for o in shown]
        if rest:
            rows.append([f"{len(rest)} other op types", str(sum(o["nodes"] for o in rest)),
                         _num(sum(o["ms"] for o in rest), 1), _num(100 * sum(o["share"] for o in rest))])
        lines += [f"**{p['backend']} {p['precision']} · {p['graph']}** "
                  f"(kernels {_num(sum(o['ms'] for o in ops), 1)} ms per run)", ""]
        lines += _table(["op type", "nodes", "ms per run", "% of kernel time"], rows)
        lines.append("")
    return lines


def plot(doc: dict[str, Any], path: Path) -> None:
    """PNG: latency per stage at the smallest batch (one bar per backend/precision, log scale), U-Net
    throughput vs batch, and end-to-end images/s vs n."""
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on benchmark machines
    import matplotlib.pyplot as plt

    records = doc["results"]
    variants = sorted({(r["backend"], r["precision"]) for r in records})
    fig, axes = plt.subplots(1, 3, figsize=(18, 6))
    ax = axes[0]
    smallest: dict[tuple[str, str, str], dict[str, Any]] = {}
    for r in records:
        label = r["stage"] if r["stage"] != "end-to-end" else f"end-to-end {r['steps']} steps"
        key = (label, r["backend"], r["precision"])
        if key not in smallest or r["batch"] < smallest[key]["batch"]:
            smallest[key] = r
    labels = sorted({k[0] for k in smallest}, key=lambda s: (STAGES.index(s.split(" ")[0]), s))
    height = 0.8 / max(len(variants), 1)
    for i, (backend, precision) in enumerate(variants):
        ys = [j + i * height for j, label in enumerate(labels) if (label, backend, precision) in smallest]
        xs = [smallest[label, backend, precision]["median_ms"] for label in labels
              if (label, backend, precision) in smallest]
        ax.barh(ys, xs, height=height, label=f"{backend} {precision}")
    ax.set_yticks([j + 0.4 - height / 2 for j in range(len(labels))], labels)
    ax.set_xscale("log")
    ax.set_xlabel("median latency, ms (log), smallest batch")
    ax.set_title("latency per stage")
    ax.legend(fontsize="small")
    for ax, stage, ylabel in ((axes[1], "unet", "images x evaluations / s"), (axes[2], "end-to-end", "images / s")):
        for backend, precision in variants:
            series: dict[int | None, list[tuple[int, float]]] = {}
            for r in records:
                if r["stage"] == stage and (r["backend"], r["precision"]) == (backend, precision):
                    series.setdefault(r.get("steps"), []).append((r["batch"], r["batch"] / (r["median_ms"] / 1e3)))
            for steps, points in sorted(series.items(), key=lambda kv: kv[0] or 0):
                points.sort()
                suffix = f", {steps} steps" if steps else ""
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o",
                        label=f"{backend} {precision}{suffix}")
        ax.set_xscale("log", base=2)
        batches = sorted({x for line in ax.lines for x in line.get_xdata()})
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.minorticks_off()
        ax.set_xlabel("batch (images)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{stage} throughput vs batch")
        if ax.lines:
            ax.legend(fontsize="small")
    fig.suptitle(f"ccld-trt bench — {machine_slug(doc['machine'])}, {doc['machine']['date']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _finite(value: Any) -> Any:
    """NaN/inf as null, so the file is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def write_reports(doc: dict[str, Any], root: Path) -> ReportPaths:
    """``root/<machine>/bench[-quick]-<UTC date-time>.{json,md,png}``; returns their paths."""
    directory = Path(root) / machine_slug(doc["machine"])
    directory.mkdir(parents=True, exist_ok=True)
    stamp = doc["machine"]["date"].replace(":", "").replace("-", "").split("+")[0]
    stem = f"bench{'-quick' if doc['run']['quick'] else ''}-{stamp}"
    paths = ReportPaths(directory / f"{stem}.json", directory / f"{stem}.md", directory / f"{stem}.png")
    paths.json.write_text(json.dumps(_finite(doc), indent=1, allow_nan=False) + "\n", encoding="utf-8")
    plot(doc, paths.plot)
    paths.markdown.write_text(to_markdown(doc, paths.plot.name), encoding="utf-8")
    return paths

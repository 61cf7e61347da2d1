"""``ccld-trt bench``: latency, throughput, memory, FLOP/s and correctness of every backend and precision that
runs on this machine, per stage and end to end, in one run.

Stages (all at the full-size architectures unless told otherwise):

* ``text-encoder``: one prompt, tokens [1, 77]; ``image-encoder``: one image prompt, pixels [1, 3, S, S];
* ``unet``: one U-Net/CFG evaluation at batch B, x [B, 4, 32, 32] with 2 conditions (zero + one text prompt),
  so B * 2 U-Net rows;
* ``sampler-step``: one PLMS step after its Runge-Kutta warm-up (one evaluation plus the sampler arithmetic),
  timed between consecutive evaluations inside the end-to-end runs, so it costs no extra model calls;
* ``decoder``: latents [B, 4, 32, 32] -> images [B, 3, 256, 256];
* ``end-to-end``: text prompt -> n decoded uint8 images, PLMS, all n in one batch.

Each backend runs in a process of its own (workers.BackendProcess): the stages of one backend after another,
then the end-to-end runs with the backends' repeats interleaved (interleaved.py), so that a shared machine's
slow spells do not land on one backend only. Each backend's end-to-end latents and pixels are compared with
torch fp32 on the same seed (accuracy.py); a backend that is fast but wrong is flagged.

This module runs those steps in order (measure_all) and writes the reports; the names other code imports from
here (the config, variants, the default opener) are re-exported from the modules that define them.
"""

from __future__ import annotations

import gc
import sys
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import torch
from tqdm import tqdm

from ccld_trt.benchmarks.accuracy import judge, thresholds
from ccld_trt.benchmarks.engine_builds import measure_engine_builds
from ccld_trt.benchmarks.flops import stage_costs
from ccld_trt.benchmarks.interleaved import measure_end_to_end
from ccld_trt.benchmarks.machine import machine_info
from ccld_trt.benchmarks.peaks import best_peaks, measure_peaks, peak_fraction, skipped_peaks
from ccld_trt.benchmarks.plan import (
    BACKENDS,
    E2E_WARMUP_STEPS,
    LATENT_SIZE,
    METHOD,
    PROMPT,
    REFERENCE,
    BenchConfig,
    Variant,
    bench_request,
)
from ccld_trt.benchmarks.records import Record, Skip
from ccld_trt.benchmarks.report import SCHEMA_VERSION, ReportPaths, write_reports
from ccld_trt.benchmarks.sessions import Opener, bench_model_files, failure_reason, open_variant
from ccld_trt.benchmarks.stages import Context, Costs, EndToEndOutput, end_to_end, plms_step_intervals_ms
from ccld_trt.benchmarks.workers import BackendFailed, BackendProcess
from ccld_trt.export.models import ModelFiles, load_networks

__all__ = ["BACKENDS", "REFERENCE", "BenchConfig", "Opener", "Variant", "judge", "measure_all", "open_variant",
           "plms_step_intervals_ms", "run_bench"]

Log = Callable[[str], None]
References = dict[tuple[int, int], EndToEndOutput]


def _release() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def count_costs(config: BenchConfig, files: ModelFiles, log: Log) -> Costs:
    """FLOPs and bytes of every stage at every batch the run measures, for the torch modules and the exported
    graphs, counted on the meta device."""
    log("counting FLOPs on the meta device")
    networks = load_networks(files)
    batches = sorted({*config.batches, *(n for _, n in config.end_to_end)})
    costs = {exported: stage_costs(networks, batches, LATENT_SIZE, exported=exported) for exported in (False, True)}
    del networks
    _release()
    return costs


def cpu_skips(config: BenchConfig, log: Log) -> list[Skip]:
    """What this CPU has no instructions for (cpu_features: bf16 dot products, VNNI): the GEMM peaks and the
    variants of those precisions, each skipped with one line in the log and one row of the report's skipped
    table, instead of measuring an emulation (minutes per bf16 matmul on an AVX2-only CPU)."""
    skips = [Skip("GEMM peak", p, why) for p, why in skipped_peaks(config.device).items()]
    skips += [Skip.of(variant, why) for variant, why in config.cpu_skips()]
    for skip in skips:
        log(f"skipped: {skip.reason}")
    return skips


def gemm_peaks(config: BenchConfig, log: Log,
               before: dict[str, dict[str, float]] | None = None) -> dict[str, dict[str, float]]:
    """Measured GEMM rates {precision: {kernel: GFLOP/s}} (peaks.measure_peaks: every kernel that runs the
    precision here); with ``before``, per kernel the better of it and this measurement (on a shared machine
    either may fall in a slow spell)."""
    log("measuring the GEMM peaks" if before is None else "measuring the GEMM peaks again")
    rates = measure_peaks(config.device, config.gemm_seconds)
    if before is None:
        return rates
    return {p: {k: max(v, before.get(p, {}).get(k, 0.0)) for k, v in kernels.items()} for p, kernels in rates.items()}


def reference_outputs(config: BenchConfig, files: ModelFiles, opener: Opener, variants: list[Variant], log: Log,
                      skipped: list[Skip]) -> References:
    """torch fp32 end-to-end outputs (untimed) when the run's variants do not include it (else nothing: the
    timed reference runs provide them); a Skip in ``skipped`` if they cannot be made."""
    if REFERENCE in variants:
        return {}
    log("computing torch fp32 reference outputs for the correctness column")
    references: References = {}
    try:
        session = opener(REFERENCE, config.device, files)
        references = {(steps, n): end_to_end(session.backend, bench_request(steps, n, config.seed))
                      for steps, n in config.end_to_end}
    except Exception as e:  # correctness is then unknown, but the timings still stand
        skipped.append(Skip.of(REFERENCE, f"reference for correctness unavailable: {failure_reason(e)}"))
    _release()
    return references


def measure_stages_in_turn(ctx: Context, variants: list[Variant], files: ModelFiles, opener: Opener,
                           workers: dict[Variant, BackendProcess], skipped: list[Skip],
                           log: Log) -> tuple[list[Record], list[dict[str, Any]]]:
    """Open each variant in its worker process and measure its stages, one backend after another (the others
    idle). Each that succeeds stays open in ``workers`` for the end-to-end runs; the others go to ``skipped``,
    their share of the progress bar counted as done. Returns the stage records and the op profiles."""
    per_variant = ctx.config.measurements_per_variant
    records: list[Record] = []
    profiles: list[dict[str, Any]] = []
    for variant in variants:
        ctx.bar.set_postfix_str(f"opening {variant.label}")
        try:
            worker = BackendProcess(variant, ctx.config, files, ctx.costs, opener, ctx.bar)
        except BackendFailed as e:
            skipped.append(Skip.of(variant, e.reason))
            log(f"skipped {variant.label}: {e.reason}")
            ctx.bar.update(per_variant)
            continue
        try:
            stage_records, stage_profiles = worker.call("stages")
        except BackendFailed as e:  # a backend that breaks mid-run keeps its finished rows
            skipped.append(Skip.failed_while_measuring(variant, e.reason))
            log(f"{variant.label} failed while measuring: {e.reason}")
            worker.close()
            ctx.bar.update(per_variant - worker.updates)  # what the failure left unmeasured
            continue
        records += stage_records
        profiles += stage_profiles
        workers[variant] = worker
    return records, profiles


def measure_all(config: BenchConfig, opener: Opener = open_variant,
                log: Log = lambda msg: tqdm.write(msg, file=sys.stderr)) -> dict[str, Any]:
    """Run the whole benchmark; the JSON document (see ``report.SCHEMA_VERSION``)."""
    # 1. The request is valid, and the weights are there (demo weights written when the models lack them).
    config.validate()
    files, weights = bench_model_files(config, log)
    # 2. What each stage costs, and what the machine can do.
    costs = count_costs(config, files, log)
    info = machine_info(config.device)
    skipped = cpu_skips(config, log)
    rates = gemm_peaks(config, log)
    # 3. The reference first; its outputs computed separately when it is not among the variants.
    variants = config.run_order()
    references = reference_outputs(config, files, opener, variants, log, skipped)
    total = config.measurements_per_variant * len(variants)
    with tqdm(total=total, desc="bench", unit="measurement", disable=None, file=sys.stderr) as bar:
        ctx = Context(config, torch.device(config.device), costs, references, bar)
        workers: dict[Variant, BackendProcess] = {}
        try:
            # 4. Stages, one backend after another; 5. end-to-end runs, the open backends interleaved.
            records, profiles = measure_stages_in_turn(ctx, variants, files, opener, workers, skipped, log)
            records += measure_end_to_end(ctx, workers, skipped)
        finally:
            for worker in workers.values():
                worker.close()
        bar.update(total - bar.n)  # end-to-end runs of backends that failed on the way
    # 6. The GEMM peak again (the better one counts), and each record's share of it.
    rates = gemm_peaks(config, log, before=rates)
    peaks = best_peaks(rates)
    for r in records:
        r.peak_fraction, r.peak_error = peak_fraction(r.achieved_gflops, r.precision, peaks,
                                                      torch.device(config.device).type)
    # 7. What the TensorRT engines cost to build, when asked (they are built ahead of time, not timed per call).
    builds, why_not = measure_engine_builds(files, log) if config.engine_builds else ([], None)
    skipped += [why_not] if why_not else []
    # 8. The document.
    doc = document(config, info, weights, rates, records, profiles, skipped)
    return {**doc, "engine_builds": builds} if builds else doc


def document(config: BenchConfig, machine: dict[str, Any], weights: dict[str, Any], rates: dict[str, dict[str, float]],
             records: list[Record], profiles: list[dict[str, Any]], skipped: list[Skip]) -> dict[str, Any]:
    """The JSON document of a run (layout in ``report``'s docstring)."""
    return {
        "schema_version": SCHEMA_VERSION,
        "machine": machine,
        "run": {
            "device": str(torch.device(config.device)), "quick": config.quick, "repeats": config.repeats,
            "warmup": config.warmup, "e2e_repeats": config.e2e_runs,
            "e2e_warmup_steps": E2E_WARMUP_STEPS if config.warmup else 0, "seed": config.seed, "method": METHOD,
            "prompt": PROMPT[0], "prompt_weight": PROMPT[1], "latent_size": list(LATENT_SIZE),
            "weights": weights, "gemm_peak_gflops": best_peaks(rates), "gemm_kernel_gflops": rates,
            "reference": {"backend": REFERENCE.backend, "precision": REFERENCE.precision},
            "thresholds": thresholds(),
        },
        "results": [asdict(r) for r in records],
        "op_profiles": profiles,
        "skipped": [asdict(s) for s in skipped],
    }


def run_bench(config: BenchConfig, opener: Opener = open_variant) -> tuple[dict[str, Any], ReportPaths]:
    """Measure everything ``config`` asks for and write JSON, Markdown and PNG under
    ``config.output/<machine>/``; returns the JSON document and the paths written."""
    doc = measure_all(config, opener)
    return doc, write_reports(doc, config.output)

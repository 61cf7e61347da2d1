"""The end-to-end runs, measured in the parent process across the open backends' workers: the backends'
repeats interleaved, each backend's output compared with torch fp32's, and the PLMS step rows taken from
the same runs."""

from __future__ import annotations

import sys
from dataclasses import replace

import numpy as np
from tqdm import tqdm

from ccld_trt.benchmarks.accuracy import correctness
from ccld_trt.benchmarks.flops import end_to_end_cost
from ccld_trt.benchmarks.plan import E2E_WARMUP_STEPS, METHOD, REFERENCE, Variant, bench_request, rotated
from ccld_trt.benchmarks.records import Record, Skip, make_record
from ccld_trt.benchmarks.stages import Context, EndToEndOutput
from ccld_trt.benchmarks.timing import Measurement, merged
from ccld_trt.benchmarks.workers import BackendFailed, BackendProcess
from ccld_trt.pipeline import Request
from ccld_trt.samplers import evaluations


def measure_end_to_end(ctx: Context, workers: dict[Variant, BackendProcess], skipped: list[Skip]) -> list[Record]:
    """Every end-to-end case on every backend, the backends' repeats interleaved: round r runs each once, in an
    order rotated per round, so that a shared machine's slow and fast spells fall on all of them alike (the
    ratios between backends are what these runs are for). A backend that fails is dropped from later rounds
    and cases, closed, and reported in ``skipped``; rows of its finished cases stay. Reference outputs found
    on the way are added to ``ctx.references``."""
    config = ctx.config
    records: list[Record] = []
    step_rows: dict[tuple[Variant, int], Measurement] = {}  # PLMS step intervals timed inside the runs, per n
    live = dict(workers)

    def run(variant: Variant, request: Request, note: str = "") -> Measurement | None:
        ctx.bar.set_postfix_str(f"{variant.label} end-to-end {request.steps} steps n{request.n}{note}")
        try:
            m: Measurement = live[variant].call("end_to_end", request)
            return m
        except BackendFailed as e:
            skipped.append(Skip.failed_while_measuring(variant, e.reason))
            tqdm.write(f"{variant.label} failed while measuring: {e.reason}", file=sys.stderr)
            live.pop(variant).close()
            return None

    for steps, n in config.end_to_end:
        request = bench_request(steps, n, config.seed)
        if config.warmup:
            for variant in list(live):
                run(variant, bench_request(min(steps, E2E_WARMUP_STEPS), n, config.seed), " warm-up")
        done: dict[Variant, list[Measurement]] = {v: [] for v in live}
        for r in range(config.e2e_runs):
            for variant in rotated(list(live), r):
                m = run(variant, request)
                if m is not None:
                    done[variant].append(m)
                ctx.bar.update()
        complete = {v: merged(ms) for v, ms in done.items() if v in live and ms}
        if REFERENCE in complete:
            ctx.references[steps, n] = complete[REFERENCE].output
        for variant, m in complete.items():
            records.append(_end_to_end_record(ctx, variant, steps, n, m))
            step_ms = [t for one in done[variant] for t in one.output.step_ms]
            step_rows[variant, n] = replace(m, samples_ms=step_ms)
    for (variant, n), m in step_rows.items():
        if m.samples_ms:
            costs = ctx.costs_of(variant)
            records.append(make_record(str(ctx.device), variant, "sampler-step", n, m, costs["unet", n], 0,
                                       rows=n * 2))
    return records


def _end_to_end_record(ctx: Context, variant: Variant, steps: int, n: int, m: Measurement) -> Record:
    """The row of one end-to-end case: its time, images/s and FLOPs, and its correctness when the reference
    output of the same case is known."""
    out: EndToEndOutput = m.output
    reference = ctx.references.get((steps, n))
    checks = {} if reference is None else correctness(variant.precision, out, reference)
    cost = end_to_end_cost(ctx.costs_of(variant), evaluations(METHOD, steps), n)
    return make_record(str(ctx.device), variant, "end-to-end", n, m, cost, 1 if ctx.config.warmup else 0,
                       steps=steps, n=n, rows=n * 2, images_per_s=n / (float(np.median(m.samples_ms)) / 1e3),
                       **checks)

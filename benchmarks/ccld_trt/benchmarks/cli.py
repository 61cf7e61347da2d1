"""The ``ccld-trt bench`` commands. The main CLI finds them through the ``ccld_trt.commands`` entry point
(pyproject.toml), so the runtime layer never imports the benchmarks; importing this module stays cheap, because
every ``ccld-trt`` run does."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ccld_trt.cli_args import add_backend_args, backend_options


def cmd_bench(args: argparse.Namespace) -> None:
    if args.cold_start:
        _cmd_cold_start(args)
        return
    if args.solver_oracle or args.steps_to_quality:
        _cmd_solvers(args)
        return
    from ccld_trt.benchmarks.suite import BenchConfig, run_bench

    config = BenchConfig.preset(
        args.quick, backends=args.backends, device=backend_options(args).device,
        models=Path(args.models) if args.models else None, demo_size=args.demo_size, output=Path(args.output),
        repeats=args.repeats, warmup=args.warmup, e2e_repeats=args.e2e_repeats, batches=args.batches,
        end_to_end=args.end_to_end, engine_builds=args.engine_builds or None)
    _, paths = run_bench(config)
    print(paths.markdown.read_text(encoding="utf-8"))
    for path in (paths.json, paths.markdown, paths.plot):
        print(path)


def _cmd_solvers(args: argparse.Namespace) -> None:
    """--solver-oracle (the mixture-of-Gaussians table of docs/solvers.md) and/or --steps-to-quality."""
    if args.solver_oracle:
        from ccld_trt.benchmarks.solver_oracle import oracle_rows, oracle_table, spacing_table

        print(oracle_table(oracle_rows()))
        print(spacing_table())
    if args.steps_to_quality:
        from ccld_trt.benchmarks.steps_to_quality import QualityConfig, run_steps_to_quality

        defaults = QualityConfig()
        config = QualityConfig(methods=args.methods or defaults.methods, step_counts=args.step_counts or
                               defaults.step_counts, reference_steps=args.reference_steps or defaults.reference_steps,
                               repeats=args.e2e_repeats or defaults.repeats)
        _, paths = run_steps_to_quality((args.backends or ("torch",))[0], args.device,
                                        Path(args.models) if args.models else None, args.demo_size,
                                        Path(args.output), config)
        print(paths[1].read_text(encoding="utf-8"))
        for path in paths:
            print(path)


def _cmd_cold_start(args: argparse.Namespace) -> None:
    """--cold-start: whole processes' time to the first image per backend, and the servers' start-up."""
    from ccld_trt.benchmarks.cold_start import ColdConfig
    from ccld_trt.benchmarks.cold_start_report import run_cold_start
    from ccld_trt.benchmarks.plan import BenchConfig
    from ccld_trt.benchmarks.sessions import bench_model_files

    defaults = ColdConfig()
    chosen = args.cold_variants or tuple(v.slug for v in defaults.variants)
    config = ColdConfig(variants=tuple(v for v in defaults.variants if v.slug in chosen),
                        modes=args.cold_modes or defaults.modes, repeats=args.repeats or defaults.repeats,
                        parts=args.cold_parts or defaults.parts,
                        server_variants=tuple(v for v in defaults.server_variants if v.slug in chosen),
                        budget_s=args.cold_budget_min * 60 if args.cold_budget_min else None)
    _, weights = bench_model_files(BenchConfig(models=Path(args.models) if args.models else None,
                                                   demo_size=args.demo_size), print)
    _, paths = run_cold_start(config, Path(weights["dir"]), Path(args.output), weights)
    print(paths[1].read_text(encoding="utf-8"))
    for path in paths:
        print(path)


def _choices(value: str, allowed: tuple[str, ...]) -> tuple[str, ...]:
    names = tuple(v.strip() for v in value.split(",") if v.strip())
    if not names or any(n not in allowed for n in names):
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of {','.join(allowed)}, got {value!r}")
    return names


def _parts(value: str) -> tuple[str, ...]:
    from ccld_trt.benchmarks.cold_start import PARTS

    return _choices(value, PARTS)


def _cold_modes(value: str) -> tuple[str, ...]:
    from ccld_trt.benchmarks.cold_start import MODES

    return _choices(value, tuple(MODES))


def _cold_variants(value: str) -> tuple[str, ...]:
    from ccld_trt.benchmarks.cold_start import VARIANTS

    return _choices(value, tuple(v.slug for v in VARIANTS))


def cmd_bench_compare(args: argparse.Namespace) -> None:
    from ccld_trt.benchmarks.compare import compare

    print(compare(args.a, args.b), end="")


def _int_list(value: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in value.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {value!r}") from None


def _runs(value: str) -> tuple[tuple[int, int], ...]:
    """'15x1,50x4' -> ((15, 1), (50, 4)): end-to-end runs as STEPSxN."""
    try:
        return tuple((int(s), int(n)) for s, n in (run.split("x") for run in value.split(",")))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected STEPSxN[,STEPSxN...], e.g. 15x1,50x4, got {value!r}") from None


def _backend_list(value: str) -> tuple[str, ...]:
    from ccld_trt.benchmarks.backend_names import BACKENDS

    names = tuple(v.strip().lower() for v in value.split(",") if v.strip())
    unknown = [n for n in names if n not in BACKENDS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of {', '.join(BACKENDS)}, got {value!r}")
    return names


def add_commands(sub: argparse._SubParsersAction[Any]) -> None:
    """Add ``bench`` and ``bench compare`` to the main CLI's subcommands ``sub`` (the entry point's target)."""
    from ccld_trt.benchmarks.backend_names import BACKENDS

    p = sub.add_parser("bench", help="benchmark every backend and precision that runs here: latency, FLOP/s, "
                                     "memory, correctness against torch fp32")
    p.add_argument("--backends", type=_backend_list, metavar="LIST",
                   help=f"comma-separated, from {','.join(BACKENDS)} (default: all; those that cannot run here "
                        "are reported as skipped)")
    add_backend_args(p, variants=True)
    p.add_argument("--output", default="benchmarks/results",
                   help="results root; files go to OUTPUT/<machine>/ (default benchmarks/results)")
    p.add_argument("--quick", action="store_true",
                   help="batch 1 and one end-to-end run (15 steps, 1 image) per backend: a few minutes on a CPU")
    p.add_argument("--repeats", type=int, help="timed repeats per measurement (default 5, quick 3)")
    p.add_argument("--warmup", type=int, help="untimed calls before each measurement (default 2, quick 1)")
    p.add_argument("--e2e-repeats", type=int, help="at most this many end-to-end repeats (default 3, quick 1)")
    p.add_argument("--batches", type=_int_list, metavar="B,...",
                   help="batches of the per-stage rows (default 1,4,16; quick 1)")
    p.add_argument("--end-to-end", type=_runs, metavar="STEPSxN,...",
                   help="end-to-end runs, PLMS (default 15x1,15x4,15x16,50x1,50x4,50x16; quick 15x1)")
    p.add_argument("--models", help="models directory (default $CCLD_TRT_MODELS or ./models; one named must "
                                    "exist); without weights there, random demo weights are written once to "
                                    "build/bench-weights/")
    p.add_argument("--demo-size", choices=["small", "full"], default="full",
                   help="size of those demo weights (default full: the real networks' FLOPs)")
    p.add_argument("--engine-builds", action="store_true",
                   help="also build the four fp16 TensorRT engines (TensorRT-RTX on a machine without a GPU) "
                        "and report their build time and size")
    s = p.add_argument_group("samplers (issue 24)")
    s.add_argument("--steps-to-quality", action="store_true",
                   help="instead of the suite: per sampler and step count, U-Net evaluations, end-to-end seconds on "
                        "the first of --backends (default torch) and PSNR against a converged reference")
    s.add_argument("--methods", type=lambda v: tuple(m for m in v.split(",") if m), metavar="LIST",
                   help="--steps-to-quality samplers (default plms,iplms,dpmpp-2m,dpmpp-3m,unipc)")
    s.add_argument("--step-counts", type=_int_list, metavar="K,...",
                   help="--steps-to-quality step counts (default 5,7,8,10,15,20,25,50)")
    s.add_argument("--reference-steps", type=int, metavar="N",
                   help="--steps-to-quality: steps of the converged reference (default 400)")
    s.add_argument("--solver-oracle", action="store_true",
                   help="instead of the suite: the samplers on a mixture-of-Gaussians oracle (seconds, no network)")
    c = p.add_argument_group("cold start (issue 30)")
    c.add_argument("--cold-start", action="store_true",
                   help="instead of the suite: whole `ccld-trt sample` processes per backend (--fast and the default, "
                        "exec to PNG, median of --repeats (default 3) after a warm-up, and once from nothing), their "
                        "stages, Pipeline.load, serve and cluster start-up (minutes)")
    c.add_argument("--cold-parts", type=_parts, metavar="LIST",
                   help="--cold-start: which of first-run,sample,load,serve,cluster (default all)")
    c.add_argument("--cold-modes", type=_cold_modes, metavar="LIST",
                   help="--cold-start: sample's modes, fast (--fast) and/or default (default both)")
    c.add_argument("--cold-variants", type=_cold_variants, metavar="LIST",
                   help="--cold-start: from torch-fp32,onnxruntime-fp32,openvino-bf16,openvino-fp32,"
                        "torch-fp32-compiled (default all; those that cannot run here are reported as skipped)")
    c.add_argument("--cold-budget-min", type=float, metavar="MIN",
                   help="--cold-start: start nothing new after MIN minutes; what did not run is reported so "
                        "(default: no limit)")
    p.set_defaults(func=cmd_bench)
    bench_sub = p.add_subparsers(dest="bench_command", metavar="{compare,cluster}", parser_class=type(p))
    c = bench_sub.add_parser("compare", help="two results JSONs side by side with B/A speedups (Markdown)")
    c.add_argument("a", metavar="A.json", help="baseline results")
    c.add_argument("b", metavar="B.json", help="results to compare with the baseline")
    c.set_defaults(func=cmd_bench_compare)
    from ccld_trt.benchmarks.cluster_bench import add_command as add_cluster_command

    add_cluster_command(bench_sub)

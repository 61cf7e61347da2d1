"""``ccld-trt bench cluster``: throughput and latency of ``ccld-trt cluster`` at several concurrencies, with and
without iteration-level batching, on the same replicas (batching is switched in place between runs).

Closed loop: at concurrency c, c client threads each send their next /v1/generate as soon as the previous one
is answered, until ``rounds * c`` requests are done. The two modes alternate at each concurrency, so a busy
spell of a shared machine falls on both. Results: OUTPUT/<machine>/cluster-<time>.json and .md.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import time
import urllib.request
from dataclasses import replace
from pathlib import Path
from typing import Any

from ccld_trt.cli_args import add_backend_args, backend_options
from ccld_trt.export.atomic import write_atomic

PROMPTS = ("a snowy landscape, oil on canvas", "a lighthouse at dusk:3", "portrait of a cat:2",
           "a city in the rain", "abstract shapes, bauhaus:4", "a forest path in autumn")


def _post(url: str, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=3600) as response:
        return dict(json.loads(response.read()))


def _get(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=60) as response:
        return dict(json.loads(response.read()))


def run_level(url: str, concurrency: int, requests: int, steps: int, method: str) -> dict[str, Any]:
    """``requests`` generations, ``concurrency`` at a time (closed loop): images/min, latency percentiles, and
    the U-Net calls they took (from /v1/stats before and after)."""
    import numpy as np

    before = _get(f"{url}/v1/stats")["total"]
    latencies: list[float] = []

    def one(k: int) -> None:
        body = {"prompts": [PROMPTS[k % len(PROMPTS)]], "seed": k, "steps": steps, "method": method}
        start = time.perf_counter()
        _post(f"{url}/v1/generate", body)
        latencies.append(time.perf_counter() - start)

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(requests)))
    wall = time.perf_counter() - start
    after = _get(f"{url}/v1/stats")["total"]
    calls = after["unet_calls"] - before["unet_calls"]
    evaluations = after["evaluations"] - before["evaluations"]
    rows = after["rows"] - before["rows"]
    return {"concurrency": concurrency, "requests": requests, "seconds": wall,
            "images_per_min": 60 * requests / wall,
            "latency_p50_s": float(np.percentile(latencies, 50)), "latency_p90_s": float(np.percentile(latencies, 90)),
            "unet_calls": calls, "requests_per_call_mean": evaluations / calls if calls else 0.0,
            "rows_per_call_mean": rows / calls if calls else 0.0}


def markdown(result: dict[str, Any]) -> str:
    setup = result["setup"]
    lines = [f"# ccld-trt cluster: iteration-level batching ({setup['backend']})", "",
             f"{setup['replicas']} replica(s), {setup['steps']} {setup['method']} steps, 1 image and 1 prompt per "
             f"request, max {setup['max_batch']} rows per U-Net call; weights: {setup['weights']}; "
             f"{result['machine']}, {result['date']}.", "",
             "| concurrency | batching | images/min | p50 latency (s) | p90 latency (s) | U-Net calls | "
             "requests/call | rows/call |", "|---|---|---|---|---|---|---|---|"]
    for row in result["runs"]:
        lines.append(f"| {row['concurrency']} | {'on' if row['batching'] else 'off'} | {row['images_per_min']:.2f} | "
                     f"{row['latency_p50_s']:.2f} | {row['latency_p90_s']:.2f} | {row['unet_calls']} | "
                     f"{row['requests_per_call_mean']:.2f} | {row['rows_per_call_mean']:.2f} |")
    lines += ["", "Throughput gain of batching (on / off): " + ", ".join(
        f"c={c}: {g:.2f}x" for c, g in result["gain"].items())]
    return "\n".join(lines) + "\n"


def cmd_bench_cluster(args: argparse.Namespace) -> None:
    from ccld_trt.benchmarks.machine import machine_info, machine_slug
    from ccld_trt.benchmarks.plan import BenchConfig
    from ccld_trt.benchmarks.sessions import bench_model_files
    from ccld_trt.cluster.app import ClusterSpec, deploy, reconfigure, shutdown, start_ray
    from ccld_trt.cluster.replica import ReplicaSettings
    from ccld_trt.runner import ModelSource

    options = backend_options(args).resolved()
    config = BenchConfig(device=options.device, models=Path(args.models) if args.models else None,
                         demo_size=args.demo_size)
    files, weights = bench_model_files(config, print)
    levels = args.concurrency
    settings = ReplicaSettings(max_batch=args.max_batch, max_ongoing=max(levels))
    spec = ClusterSpec(replicas=args.replicas, max_queue=-1, settings=settings)
    start_ray(args.address)
    runs = []
    try:
        deployed = deploy(options, ModelSource(files), spec, port=args.port)
        # one untimed request per replica and mode: first calls of a shape are slower
        for batching in (True, False):
            deployed = reconfigure(deployed, replace(settings, batching=batching))
            run_level(deployed.url, args.replicas, args.replicas, args.steps, args.method)
        for c in levels:
            for batching in (True, False):
                deployed = reconfigure(deployed, replace(settings, batching=batching))
                row = run_level(deployed.url, c, max(c * args.rounds, 2), args.steps, args.method)
                row["batching"] = batching
                print(json.dumps(row), flush=True)
                runs.append(row)
    finally:
        shutdown()
    info = machine_info(options.device)
    by = {(r["concurrency"], r["batching"]): r["images_per_min"] for r in runs}
    result = {"machine": info.get("gpu", {}).get("name") if info.get("gpu") else info["cpu_model"],
              "date": info["date"], "machine_info": info,
              "setup": {"backend": options.describe(), "device": options.device, "replicas": args.replicas,
                        "steps": args.steps, "method": args.method, "max_batch": args.max_batch,
                        "rounds": args.rounds, "weights": weights},
              "runs": runs, "gain": {str(c): by[c, True] / by[c, False] for c in levels}}
    out_dir = Path(args.output) / machine_slug(info)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"cluster-{info['date'].replace(':', '').replace('-', '').split('+')[0]}"  # never overwrite
    write_atomic(stem.with_suffix(".json"), json.dumps(result, indent=2) + "\n")
    write_atomic(stem.with_suffix(".md"), markdown(result))
    print(markdown(result))
    print(stem.with_suffix(".json"))


def _levels(value: str) -> tuple[int, ...]:
    try:
        levels = tuple(int(v) for v in value.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {value!r}") from None
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError(f"concurrencies must be >= 1, got {value!r}")
    return levels


def add_command(bench_sub: argparse._SubParsersAction[Any]) -> None:
    """Add ``bench cluster`` to the ``bench`` subcommands."""
    p = bench_sub.add_parser("cluster", help="ccld-trt cluster: images/min and p50/p90 latency at several "
                                             "concurrencies, iteration batching on and off (same replicas)")
    p.add_argument("--concurrency", type=_levels, default=(1, 4, 8), metavar="C,...",
                   help="requests in flight (default 1,4,8)")
    p.add_argument("--rounds", type=int, default=2, help="requests per client at each level (default 2)")
    p.add_argument("--steps", type=int, default=15, help="sampler steps per request (default 15)")
    p.add_argument("--method", default="plms", help="sampler (default plms)")
    p.add_argument("--replicas", type=int, default=1, help="replicas (default 1)")
    p.add_argument("--max-batch", type=int, default=32, help="U-Net rows per merged call (default 32)")
    p.add_argument("--address", help="join this Ray cluster (default: a local Ray on 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    p.add_argument("--output", default="benchmarks/results",
                   help="results root; files go to OUTPUT/<machine>/cluster-<time>.{json,md} "
                        "(default benchmarks/results)")
    p.add_argument("--models", help="models directory (default $CCLD_TRT_MODELS or ./models); without weights "
                                    "there, random demo weights are written once to build/bench-weights/")
    p.add_argument("--demo-size", choices=["small", "full"], default="full",
                   help="size of those demo weights (default full: the real networks' FLOPs)")
    add_backend_args(p)
    p.set_defaults(func=cmd_bench_cluster)

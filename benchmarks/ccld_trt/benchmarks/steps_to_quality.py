"""``ccld-trt bench --steps-to-quality``: for each sampler and step count, U-Net evaluations, end-to-end seconds on
one backend, and the PSNR of latents and pixels against a converged reference (DPM-Solver++(3M) with many steps to
log-SNR 20: the probability-flow ODE's endpoint from the same noise). A Markdown table, a JSON and a plot of pixel
PSNR against seconds, one line per method, under benchmarks/results/<machine>/ (timestamped, never overwritten).

Random demo weights are a weak proxy: their latents are far from a trained model's, so the dB here say how fast each
solver converges on *this* network, not what a trained model's images look like; trained weights are re-measured
with the same command (``--models``).
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ccld_trt.backends.base import Backend
from ccld_trt.benchmarks.solver_oracle import REFERENCE_FINAL_LOG_SNR, psnr
from ccld_trt.export.atomic import write_atomic
from ccld_trt.pipeline import Request, conditions, decode, draw_noise, generate, synchronize
from ccld_trt.sampler_names import FAST_METHOD, FAST_STEPS
from ccld_trt.samplers import evaluations, sample
from ccld_trt.schedule import log_snr_timesteps

METHODS = ("plms", "iplms", "dpmpp-2m", "dpmpp-3m", "unipc")
STEP_COUNTS = (5, 7, 8, 10, 15, 20, 25, 50)
REFERENCE_STEPS = 400
REFERENCE_METHOD = "dpmpp-3m"


@dataclass(frozen=True)
class QualityConfig:
    """What to run: ``methods`` x ``step_counts`` (plus the fast preset and plms/50), one image of ``prompt``."""

    methods: tuple[str, ...] = METHODS
    step_counts: tuple[int, ...] = STEP_COUNTS
    reference_steps: int = REFERENCE_STEPS
    prompt: tuple[str, float] = ("a watercolor painting of a lighthouse at dawn", 3.0)
    seed: int = 0
    scale: float = 2.55
    latent_size: tuple[int, int] = (32, 32)
    # run besides the grid (once): the fast preset, and plms/15 and plms/50 (the default) to compare it with
    extra_cells: tuple[tuple[str, int], ...] = ((FAST_METHOD, FAST_STEPS), ("plms", 15), ("plms", 50))
    repeats: int = 1  # timed end-to-end runs per cell, interleaved round by round; the median is reported

    def cells(self) -> list[tuple[str, int]]:
        """(method, steps) in run order, each once."""
        return list(dict.fromkeys([*((m, k) for m in self.methods for k in self.step_counts), *self.extra_cells]))

    def request(self, method: str, steps: int) -> Request:
        return Request(prompts=[self.prompt], seed=self.seed, steps=steps, method=method,
                       latent_size=self.latent_size)


def reference(backend: Backend, config: QualityConfig) -> tuple[torch.Tensor, np.ndarray]:
    """The converged latents [1, 4, h, w] and pixels [1, H, W, 3] uint8 from the cells' starting noise."""
    request = config.request(REFERENCE_METHOD, config.reference_steps)
    conds, weights = conditions(backend, request, [])
    x = draw_noise(request).x.to(backend.device)
    steps = log_snr_timesteps(config.reference_steps, REFERENCE_FINAL_LOG_SNR, backend.device)
    latents = sample(lambda xx, t: backend.unet(xx, t, conds, weights), x, steps, REFERENCE_METHOD).float().cpu()
    return latents, decode(backend, latents, config.scale)


def measure(backend: Backend, config: QualityConfig,
            log: Callable[[str], None] = print) -> tuple[list[dict[str, Any]], float]:
    """One row per cell: evaluations, end-to-end seconds (conditioning + sampling + decoding: the median of
    ``config.repeats`` warm runs, the cells interleaved round by round because a shared machine drifts) and PSNR of
    latents (peak-to-peak 2) and pixels (255) against the reference. Returns the rows and the reference's
    seconds."""
    # warm-up: first calls of a shape are slower
    conds, weights = conditions(backend, config.request("ddim", 1), [])
    backend.unet(draw_noise(config.request("ddim", 1)).x.to(backend.device), torch.ones([1], device=backend.device),
                 conds, weights)
    start = time.perf_counter()
    ref_latents, ref_pixels = reference(backend, config)
    synchronize(backend.device)
    ref_seconds = time.perf_counter() - start
    log(f"reference: {REFERENCE_METHOD} {config.reference_steps} steps, {ref_seconds:.1f} s")
    runs: dict[tuple[str, int], list[dict[str, float]]] = {cell: [] for cell in config.cells()}
    outputs = {}
    for _ in range(max(1, config.repeats)):
        for method, steps in runs:
            start = time.perf_counter()
            out = generate(backend, config.request(method, steps), [], config.scale)
            runs[method, steps].append({"seconds": time.perf_counter() - start, **out.seconds})
            outputs[method, steps] = out  # deterministic: every repeat gives the same latents
            log(f"{method}/{steps}: {runs[method, steps][-1]['seconds']:.2f} s")
    rows = []
    for (method, steps), timings in runs.items():
        out = outputs[method, steps]
        row = {"method": method, "steps": steps, "evaluations": evaluations(method, steps),
               "seconds": statistics.median(r["seconds"] for r in timings),
               "seconds_runs": [r["seconds"] for r in timings],
               "sampling_seconds": statistics.median(r["sampling"] for r in timings),
               "decoding_seconds": statistics.median(r["decoding"] for r in timings),
               "latent_psnr_db": psnr(out.latents, ref_latents),
               "pixel_psnr_db": psnr(torch.from_numpy(out.pixels), torch.from_numpy(ref_pixels), 255.0)}
        log(json.dumps(row))
        rows.append(row)
    return rows, ref_seconds


def _speed(rows: Sequence[dict[str, Any]], method: str, steps: int, key: str = "seconds") -> float | None:
    found = [r.get(key) for r in rows if (r["method"], r["steps"]) == (method, steps)]
    return found[0] if found else None


def markdown(result: dict[str, Any]) -> str:
    """The report section: setup, the table, the fast preset against plms/50."""
    setup, rows = result["setup"], result["rows"]
    lines = [f"## Steps to quality — {result['machine']}, {result['date']}", "",
             f"{setup['backend']}, {setup['weights']}, one image of {setup['prompt']!r}, seed {setup['seed']}. "
             f"Reference: {REFERENCE_METHOD} with {setup['reference_steps']} steps to log-SNR "
             f"{REFERENCE_FINAL_LOG_SNR:g} ({result['reference_seconds']:.0f} s). Seconds: the median of "
             f"{setup.get('repeats', 1)} warm end-to-end run(s) per cell, interleaved round by round "
             "(conditioning + sampling + decoding), "
             f"{setup['threads']} torch thread(s).", "",
             "| method | steps | U-Net evaluations | seconds | latent PSNR dB | pixel PSNR dB |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['method']} | {r['steps']} | {r['evaluations']} | {r['seconds']:.2f} | "
              f"{r['latent_psnr_db']:.1f} | {r['pixel_psnr_db']:.1f} |" for r in rows]
    fast, default = _speed(rows, FAST_METHOD, FAST_STEPS), _speed(rows, "plms", 50)
    if fast and default:
        lines += ["", f"Fast preset ({FAST_METHOD}/{FAST_STEPS}) against the default (plms/50): "
                      f"{default / fast:.2f}x faster end to end ({fast:.2f} s against {default:.2f} s)."]
        sampling = _speed(rows, FAST_METHOD, FAST_STEPS, "sampling_seconds"), _speed(rows, "plms", 50,
                                                                                  "sampling_seconds")
        if sampling[0] and sampling[1]:
            lines[-1] += (f" Sampling alone: {sampling[1] / sampling[0]:.2f}x ({sampling[0]:.2f} s against "
                          f"{sampling[1]:.2f} s); the rest is mostly the decoder, the same for both.")
    if setup.get("demo"):
        lines += ["", "Random demo weights are a weak proxy: their latents are far from a trained model's; "
                      "re-measure trained weights with the same command (`--models`)."]
    return "\n".join(lines) + "\n"


def plot(rows: Sequence[dict[str, Any]], path: Path) -> bool:
    """Pixel PSNR against seconds, one line per method (PNG); False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r["steps"])
        ax.plot([r["seconds"] for r in mine], [r["pixel_psnr_db"] for r in mine], marker="o", label=method)
        for r in mine:
            ax.annotate(str(r["steps"]), (r["seconds"], r["pixel_psnr_db"]), fontsize=7,
                        textcoords="offset points", xytext=(3, 3))
    ax.set_xlabel("seconds per image, end to end")
    ax.set_ylabel("pixel PSNR against the converged image (dB)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    partial = path.with_name(f".{path.name}.partial")
    fig.savefig(partial, format="png", dpi=110)
    plt.close(fig)
    partial.replace(path)
    return True


def write_results(result: dict[str, Any], out_dir: Path) -> list[Path]:
    """JSON, Markdown and plot under ``out_dir`` as steps-to-quality-<UTC time>.* (never overwritten)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = result["date"].replace(":", "").replace("-", "").split("+")[0]
    stem = out_dir / f"steps-to-quality-{stamp}"
    write_atomic(stem.with_suffix(".json"), json.dumps(result, indent=2) + "\n")
    write_atomic(stem.with_suffix(".md"), markdown(result))
    paths = [stem.with_suffix(".json"), stem.with_suffix(".md")]
    if plot(result["rows"], stem.with_suffix(".png")):
        paths.append(stem.with_suffix(".png"))
    return paths


def run_steps_to_quality(backend_name: str, device: str, models: Path | None, demo_size: str, output: Path,
                         config: QualityConfig, log: Callable[[str], None] = print) -> tuple[dict[str, Any],
                                                                                            list[Path]]:
    """Open ``backend_name`` at its default precision on ``device`` (the models directory's weights, else demo
    weights of ``demo_size``), measure, and write the results under ``output``/<machine>/."""
    from ccld_trt.benchmarks.machine import machine_info, machine_slug
    from ccld_trt.benchmarks.plan import BenchConfig
    from ccld_trt.benchmarks.sessions import bench_model_files
    from ccld_trt.runner import BackendOptions, ModelSource, open_session

    files, weights = bench_model_files(BenchConfig(device=device, models=models, demo_size=demo_size), log)
    options = BackendOptions(backend_name, device).resolved()
    session = open_session(options, ModelSource(files))
    rows, ref_seconds = measure(session.backend, config, log)
    info = machine_info(device)
    machine = info["gpu"]["name"] if info.get("gpu") else f"{info['cpu_model']}, {info['cores']} cores"
    weights_text = (f"{weights['size'] or ''} random demo weights".strip() if weights["demo"]
                    else f"weights from {weights['dir']}")
    result = {"machine": machine, "date": info["date"], "machine_info": info, "reference_seconds": ref_seconds,
              "setup": {"backend": options.describe(), "weights": weights_text, "demo": weights["demo"],
                        "threads": torch.get_num_threads(),
                        "prompt": config.prompt[0], "seed": config.seed, "reference_steps": config.reference_steps,
                        "methods": list(config.methods), "step_counts": list(config.step_counts),
                        "repeats": config.repeats},
              "rows": rows}
    return result, write_results(result, output / machine_slug(info))

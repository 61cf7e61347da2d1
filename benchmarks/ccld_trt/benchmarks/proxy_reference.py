"""Is the trained proxy's "converged endpoint" converged? (issue 33: the solver tables on the proxy are only as good
as their reference.) From the same noise and image prompt as ``proxy_measure``, the probability-flow ODE is solved
by DPM-Solver++(3M) at several step counts (``proxy_measure.converged``, log-SNR-uniform to 20, its final jump)
and, independently, by DPM-Solver++(2M) with a first-order final jump; each pair's latent PSNR (min and mean over
the images) says where the references agree, i.e. up to which dB the solver tables can resolve anything.

``python -m ccld_trt.benchmarks.proxy_reference [--images N] [--steps 100,200,400,800]`` writes
benchmarks/proxy/results/reference-check.{json,md}.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ccld_trt.benchmarks.proxy_measure import COMPACT, PROXY_DIR, converged, held_out_prompt, proxy_models
from ccld_trt.benchmarks.solver_oracle import REFERENCE_FINAL_LOG_SNR, psnr
from ccld_trt.export.atomic import write_atomic
from ccld_trt.export.models import ModelFiles
from ccld_trt.pipeline import draw_noise
from ccld_trt.runner import BackendOptions, ModelSource, open_session
from ccld_trt.samplers import dpmpp_sample
from ccld_trt.schedule import log_snr_timesteps

STEPS = (100, 200, 400, 800)


def references(images: int, steps: tuple[int, ...], root: Path, log: Any = print) -> dict[str, torch.Tensor]:
    """name -> endpoints [images, 4, 32, 32]: "dpmpp-3m/K" for K in ``steps``, and "dpmpp-2m/K, jump 1" for the
    largest K."""
    session = open_session(BackendOptions("torch", "cpu", "fp32").resolved(),
                           ModelSource(ModelFiles.resolve(proxy_models(root, COMPACT))))
    backend, size, prompt = session.backend, session.image_size, held_out_prompt()
    out = {}
    for k in steps:
        started = time.perf_counter()
        out[f"dpmpp-3m/{k}"] = converged(backend, size, prompt, k, images)
        log(f"dpmpp-3m/{k}: {time.perf_counter() - started:.0f} s")
    conds, weights = prompt.conds(backend, size)
    check = max(steps)
    x = draw_noise(prompt.request("dpmpp-3m", check, images)).x
    t = log_snr_timesteps(check, REFERENCE_FINAL_LOG_SNR)
    out[f"dpmpp-2m/{check}, jump 1"] = dpmpp_sample(lambda xx, tt: backend.unet(xx, tt, conds, weights),
                                                          x, t, 2, final=1).float().cpu()
    return out


def agreement(refs: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
    """Latent PSNR of every pair of references: mean and min over the images."""
    rows = []
    for (a, x), (b, y) in itertools.combinations(refs.items(), 2):
        db = [psnr(u[None], v[None]) for u, v in zip(x, y, strict=True)]
        rows.append({"a": a, "b": b, "mean_db": statistics.mean(db), "min_db": min(db)})
    return rows


def main(argv: list[str] | None = None) -> int:
    from ccld_trt.benchmarks.machine import machine_info

    parser = argparse.ArgumentParser(prog="python -m ccld_trt.benchmarks.proxy_reference", description=__doc__)
    parser.add_argument("--images", type=int, default=4, help="images from seed 0 (default 4)")
    parser.add_argument("--steps", default=",".join(map(str, STEPS)), help="DPM-Solver++(3M) step counts")
    parser.add_argument("--root", type=Path, default=Path("build/proxy"), help="materialised models (cache)")
    parser.add_argument("--out", type=Path, default=PROXY_DIR / "results", help="results directory")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    info = machine_info("cpu")
    started = time.perf_counter()
    rows = agreement(references(args.images, tuple(int(k) for k in args.steps.split(",")), args.root))
    doc = {"machine": f"{info['cpu_model']}, {info['cores']} cores", "date": info["date"], "images": args.images,
           "wall_seconds": time.perf_counter() - started, "pairs": rows}
    lines = [f"Reference check on the trained proxy ({doc['machine']}, {doc['date']}, {args.images} images from "
             "seed 0, the held-out photo as image prompt, weight 3): latent PSNR between endpoints of the ODE "
             "solved in different ways.", "",
             "| reference | against | mean dB | min dB |", "| --- | --- | ---: | ---: |"]
    lines += [f"| {r['a']} | {r['b']} | {r['mean_db']:.1f} | {r['min_db']:.1f} |" for r in rows]
    args.out.mkdir(parents=True, exist_ok=True)
    write_atomic(args.out / "reference-check.json", json.dumps(doc, indent=1) + "\n")
    write_atomic(args.out / "reference-check.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

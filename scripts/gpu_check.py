"""The steps of ``scripts/gpu_check.sh``: one GPU check of the torch CUDA paths against the CPU fp32 goldens.

Each step runs in its own process (the shell script gives each its own timeout) and writes ``PARTS/<step>.json``:

- ``env``: the GPU, the driver and library versions, TF32 settings, which of the project's dependencies import.
- ``e2e``: the golden end-to-end cases (tests/fixtures) on the seed-3 small demo weights, in one backend per
  mode (fp32, fp32 with TF32 off, fp16 autocast, and both precisions with ``--cuda-graph``), the first case
  again at the end so that CUDA graphs return to an earlier captured shape. fp32: latents rel <= 1e-3 and pixels
  within 2 of the goldens; fp16: pixel PSNR >= 35 dB; CUDA-graph modes also match their eager mode.
- ``latency``: the full-size student U-Net/CFG step and the decoder, median of N timed calls after warm-up.
- ``compiled``: eager vs CUDA graph vs torch.compile (``--compile``) and compiled + graph, fp32 and fp16: the
  full-size U-Net/CFG and decoder at batch 1 and a 50-step PLMS image end to end, with PSNR and latents against
  fp32 eager in the same run; fp32-compiled within the fp32 bounds, fp16 modes >= 35 dB, graph = its eager mode.
- ``report``: merges the parts and the pytest JUnit XML into ``ROOT/<gpu-slug>/gpu-check-<time>.json`` and
  ``.md``, prints one summary line per check; exit status 0 if every check passed, 1 if one failed.

``--cpu-dry-run`` runs the same code on the CPU with one short case and tiny networks (bf16 for fp16, whose
CPU autocast is very slow; no CUDA-graph modes; compiled: fp32 and fp32-compiled only), to catch mistakes before
the GPU minutes are spent.
Only torch, numpy, pillow and pyyaml are needed: without ftfy/instant-clip-tokenizer the cases' prompts are
tokenized from the ids below (a CPU test checks them against the tokenizer).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import importlib.metadata
import importlib.util
import json
import math
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import types
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures"
# BPE ids (no SOT/EOT) of the e2e cases' prompts, as ccld_trt.tokenizer.encode gives them.
TOKEN_IDS: dict[str, list[int]] = {
    "A martian landscape painting, oil on canvas": [320, 30214, 5727, 3086, 267, 2870, 525, 7483],
    "A peaceful meadow, pastel crayons": [320, 9461, 17195, 267, 19457, 43508],
    "a green triangle": [320, 1901, 14615],
    "an orange moon": [550, 4287, 3293],
}
MODULES = ("numpy", "PIL", "yaml", "tqdm", "ftfy", "instant_clip_tokenizer", "onnx", "onnxruntime", "pytest",
           "cupy", "cuda.bindings", "tensorrt", "tensorrt_rtx", "polygraphy")
# mode: (precision, cuda_graph, tf32: None keeps torch's defaults, as `ccld-trt sample` runs)
E2E_MODES: dict[str, tuple[str, bool, bool | None]] = {
    "fp32": ("fp32", False, None), "fp32-no-tf32": ("fp32", False, False), "fp16": ("fp16", False, None),
    "fp32-graph": ("fp32", True, None), "fp16-graph": ("fp16", True, None)}
LATENCY_MODES: dict[str, tuple[str, bool]] = {
    "fp32": ("fp32", False), "fp16": ("fp16", False), "fp32-graph": ("fp32", True), "fp16-graph": ("fp16", True)}
FP32_LATENTS_REL, FP32_PIXELS_DIFF, FP16_PSNR_DB = 1e-3, 2, 35.0
GRAPH_VS_EAGER_REL = {"fp32": 1e-3, "fp16": 1e-2, "bf16": 1e-2}  # stale buffers would be off by O(1)

Check = dict[str, Any]  # {"check", "status": PASS|FAIL|SKIP, "summary", ...details}


def check(name: str, status: str, summary: str, **details: Any) -> Check:
    return {"check": name, "status": status, "summary": summary, **details}


def dry_run_half() -> str:
    """What the CPU dry run runs fp16 modes in: bf16 where this CPU has bf16 dot products, else fp32 (torch
    refuses an emulated bf16, which would take minutes a call)."""
    from ccld_trt.cpu_features import runs_natively

    return "bf16" if runs_natively("bf16") else "fp32"


def precision_here(precision: str, dry_run: bool) -> str:
    return dry_run_half() if dry_run and precision == "fp16" else precision


def label(mode: str, dry_run: bool) -> str:
    """A mode's name as run: the CPU dry run runs fp16 modes in bf16 (fp32 without bf16 instructions)."""
    return mode.replace("fp16", dry_run_half()) if dry_run else mode


def use_token_table_if_needed() -> str:
    """Keep ccld_trt.tokenizer if its dependencies import, else put the TOKEN_IDS table in its place."""
    try:
        import ccld_trt.tokenizer  # noqa: F401
        return "ccld_trt.tokenizer"
    except ImportError as e:
        stub = types.ModuleType("ccld_trt.tokenizer")
        stub.tokenize = table_tokenize  # type: ignore[attr-defined]
        sys.modules["ccld_trt.tokenizer"] = stub
        return f"precomputed token ids ({e.name} is not installed)"


def table_tokenize(texts: str | list[str], context_length: int = 77) -> Any:
    """int64 tensor [N, context_length] of TOKEN_IDS prompts, laid out as ccld_trt.tokenizer.tokenize does."""
    import torch

    from ccld_trt.export.graph_specs import EOT_TOKEN, SOT_TOKEN

    texts = [texts] if isinstance(texts, str) else texts
    out = torch.zeros([len(texts), context_length], dtype=torch.int64)
    for row, text in enumerate(texts):
        ids = [SOT_TOKEN, *TOKEN_IDS[text], EOT_TOKEN]
        out[row, : len(ids)] = torch.tensor(ids)
    return out


def module_versions() -> dict[str, str | None]:
    """Importable module -> its distribution's version ("?" if unknown), None where it is not installed."""
    found: dict[str, str | None] = {}
    dists = importlib.metadata.packages_distributions()
    for name in MODULES:
        try:
            present = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            present = False
        version = None
        if present:
            version = "?"
            for dist in dists.get(name.split(".")[0], []):
                with contextlib.suppress(importlib.metadata.PackageNotFoundError):
                    version = importlib.metadata.version(dist)
                    break
        found[name] = version
    return found


def step_env(dry_run: bool) -> tuple[list[Check], dict[str, Any]]:
    import torch

    from ccld_trt.backend_select import cuda_unavailable_reason
    from ccld_trt.benchmarks.machine import machine_info

    cuda = torch.cuda.is_available()
    info = machine_info("cuda" if cuda else "cpu")
    info.update(modules=module_versions(), cudnn=torch.backends.cudnn.version() if cuda else None,
                tf32={"cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
                      "cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
                      "float32_matmul_precision": torch.get_float32_matmul_precision()})
    if cuda:
        props = torch.cuda.get_device_properties(0)
        info["gpu"]["multiprocessors"] = props.multi_processor_count
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            info["gpu"]["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                text=True, timeout=20, check=True).stdout.strip()
    missing = [m for m, v in info["modules"].items() if v is None]
    versions = f"torch {torch.__version__}, CUDA {torch.version.cuda}, python {platform.python_version()}"
    if cuda:
        status, summary = "PASS", f"{info['gpu']['name']}, {versions}"
    else:
        status = "PASS" if dry_run else "FAIL"
        summary = f"no GPU ({cuda_unavailable_reason()}), {versions}"
    return [check("env", status, f"{summary}; not installed: {', '.join(missing) or 'none'}")], info


@contextlib.contextmanager
def tf32(allow: bool | None) -> Iterator[None]:
    """TF32 for cuDNN convolutions and cuBLAS matmuls set to ``allow`` inside (None: left as it is)."""
    import torch

    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    if allow is not None:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = allow
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def figures(latents: Any, pixels: Any, golden_latents: Any, golden_pixels: Any) -> dict[str, float]:
    """Latents rel error (L2), max pixel difference and pixel PSNR (dB) against the golden arrays."""
    import numpy as np

    ref = golden_latents.astype(np.float64)
    rel = float(np.linalg.norm(latents.astype(np.float64) - ref) / np.linalg.norm(ref))
    diff = np.abs(pixels.astype(np.int64) - golden_pixels.astype(np.int64))
    mse = float(np.mean(diff.astype(np.float64) ** 2))
    psnr = math.inf if mse == 0 else 10 * math.log10(255**2 / mse)
    return {"latents_rel": rel, "pixels_max_diff": int(diff.max()), "psnr_db": psnr}


def e2e_mode(name: str, precision: str, cuda_graph: bool, allow_tf32: bool | None, device: str, files: Any,
             cases: dict[str, dict], order: list[str], golden: dict[str, Any],
             eager_latents: dict[str, dict[str, Any]]) -> Check:
    """One backend for all ``order`` cases; PASS when each meets its precision's bounds."""
    import numpy as np

    from ccld_trt.backends.torch_backend import TorchBackend
    from ccld_trt.export.models import load_networks
    from ccld_trt.image_prompt import parse_prompt
    from ccld_trt.pipeline import DEFAULT_AUTOENCODER_SCALE, Request, generate, load_image_prompts

    networks = load_networks(files)
    backend = TorchBackend(networks, device, precision, cuda_graph)
    rows, failures = [], []
    with tf32(allow_tf32):
        for run in order:
            case_name = run.split()[0]
            case = cases[case_name]
            request = Request(prompts=[parse_prompt(p) for p in case["prompt_list"]],
                              image_prompts=[(FIXTURES / f, w) for f, w in case["image_prompts"]], n=case["n"],
                              seed=case["seed"], steps=case["steps_n"], method=case["method"])
            result = generate(backend, request, load_image_prompts(request, networks.image_size),
                              DEFAULT_AUTOENCODER_SCALE)
            latents = result.latents.numpy()
            row: dict[str, Any] = {"case": run, **figures(latents, result.pixels, golden[f"{case_name}_latents"],
                                                             golden[f"{case_name}_pixels"]),
                                   "seconds": result.seconds}
            eager_latents.setdefault(name, {})[run] = latents
            eager = eager_latents.get(name.removesuffix("-graph"), {}).get(run) if cuda_graph else None
            if eager is not None:
                row["rel_to_eager"] = float(np.linalg.norm(latents - eager) / np.linalg.norm(eager))
            bad = []
            if precision == "fp32" and row["latents_rel"] > FP32_LATENTS_REL:
                bad.append(f"latents rel {row['latents_rel']:.2e} > {FP32_LATENTS_REL:g}")
            if precision == "fp32" and row["pixels_max_diff"] > FP32_PIXELS_DIFF:
                bad.append(f"pixel diff {row['pixels_max_diff']} > {FP32_PIXELS_DIFF}")
            if precision != "fp32" and row["psnr_db"] < FP16_PSNR_DB:
                bad.append(f"PSNR {row['psnr_db']:.1f} dB < {FP16_PSNR_DB:g}")
            if row.get("rel_to_eager", 0.0) > GRAPH_VS_EAGER_REL[precision]:
                bad.append(f"rel to eager {row['rel_to_eager']:.2e} > {GRAPH_VS_EAGER_REL[precision]:g}")
            failures += [f"{run}: {b}" for b in bad]
            rows.append(row)
            print(f"  e2e {name} {run}: rel {row['latents_rel']:.2e}, pixel diff {row['pixels_max_diff']}, "
                  f"PSNR {row['psnr_db']:.1f} dB{' FAIL ' + '; '.join(bad) if bad else ''}", flush=True)
    worst = (f"{len(rows)} runs: max latents rel {max(r['latents_rel'] for r in rows):.2e}, max pixel diff "
             f"{max(r['pixels_max_diff'] for r in rows)}, min PSNR {min(r['psnr_db'] for r in rows):.1f} dB")
    if cuda_graph:
        rel_eager = [r["rel_to_eager"] for r in rows if "rel_to_eager" in r]
        worst += f", max rel to eager {max(rel_eager):.2e}" if rel_eager else ", no eager run to compare"
        worst += f", {backend._guided_call.captures} graphs"  # type: ignore[attr-defined]
    summary = f"{worst}; {'; '.join(failures)}" if failures else worst
    return check(f"e2e {name}", "FAIL" if failures else "PASS", summary, precision=precision, cuda_graph=cuda_graph,
                 tf32=allow_tf32, cases=rows)


def step_e2e(dry_run: bool, case_names: list[str] | None, modes: list[str]) -> tuple[list[Check], dict[str, Any]]:
    import numpy as np
    import torch

    from ccld_trt.export.demo_weights import write_demo_weights
    from ccld_trt.export.models import ModelFiles

    device = "cpu" if dry_run else "cuda"
    cases = json.loads((FIXTURES / "e2e_cases.json").read_text())
    names = case_names or (["e2e_ddpm"] if dry_run else list(cases))
    order = [*names, f"{names[0]} (again)"] if len(names) > 1 else names
    with np.load(FIXTURES / "golden.npz") as g:
        golden = {k: g[k] for k in g.files}
    checks: list[Check] = []
    eager: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        write_demo_weights(Path(tmp), "small", seed=3)
        files = ModelFiles.resolve(Path(tmp))
        for mode in modes:
            precision, cuda_graph, allow_tf32 = E2E_MODES[mode]
            precision = precision_here(precision, dry_run)
            name = label(mode, dry_run)
            if cuda_graph and dry_run:
                checks.append(check(f"e2e {name}", "SKIP", "CUDA graphs need a GPU (CPU dry run)"))
                continue
            if device == "cuda" and not torch.cuda.is_available():
                checks.append(check(f"e2e {name}", "FAIL", "torch sees no CUDA GPU"))
                continue
            try:
                checks.append(e2e_mode(name, precision, cuda_graph, allow_tf32, device, files, cases, order,
                                       golden, eager))
            except Exception as e:
                traceback.print_exc()
                checks.append(check(f"e2e {name}", "FAIL", f"{type(e).__name__}: {e}"))
    return checks, {"device": device, "order": order}


def latency_networks(size: str, device: str, tmp: Path) -> Any:
    """Networks with the demo-weights U-Net and decoder of ``size`` (seed 0: the values ``ccld-trt demo-weights``
    writes), built on ``device`` without writing their checkpoints, and the small seed-3 demo CLOOB encoders
    (written to ``tmp``): full-size CLOOB checkpoints would take minutes to write for a few ms of conditioning."""
    import dataclasses

    import torch

    from ccld_trt.export.autoencoder import AutoencoderDecoder
    from ccld_trt.export.demo_weights import SIZES, init_tensor, write_demo_weights
    from ccld_trt.export.models import ModelFiles, load_networks
    from ccld_trt.export.unet import DiffusionModel

    base, multipliers, ddconfig = SIZES[size]
    built = []
    for make in (lambda: DiffusionModel(base, multipliers), lambda: AutoencoderDecoder(4, ddconfig)):
        with torch.device("meta"):
            model = make()
        model = model.to_empty(device=device)
        model.load_state_dict({k: torch.from_numpy(init_tensor(k, tuple(v.shape), 0))
                               for k, v in model.state_dict().items()})
        built.append(model.eval().requires_grad_(False))
    write_demo_weights(tmp, "small", seed=3)
    return dataclasses.replace(load_networks(ModelFiles.resolve(tmp)), unet=built[0], decoder=built[1])


def time_ms(call: Callable[[], Any], device: Any, warmup: int, repeats: int) -> dict[str, float]:
    """Median and min wall time (ms) of ``call`` over ``repeats`` runs after ``warmup``, synchronised each time."""
    from ccld_trt.pipeline import synchronize

    for _ in range(warmup):
        call()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times)}


def step_latency(dry_run: bool, modes: list[str]) -> tuple[list[Check], dict[str, Any]]:
    import torch

    from ccld_trt.backends.torch_backend import TorchBackend
    from ccld_trt.samplers import evaluations

    if not dry_run and not torch.cuda.is_available():
        return [check("latency", "FAIL", "torch sees no CUDA GPU")], {}
    device = torch.device("cpu" if dry_run else "cuda")
    # the dry run: small networks on 8x8 latents (64x64 images), to stay quick on a CPU
    size, side, batches, warmup, repeats = ("small", 8, (1,), 1, 2) if dry_run else ("full", 32, (1, 4), 5, 30)
    with tempfile.TemporaryDirectory() as tmp:
        networks = latency_networks(size, str(device), Path(tmp))
    gen = torch.Generator().manual_seed(0)
    conds = torch.cat([torch.zeros(1, 512), torch.randn(1, 512, generator=gen)]).to(device)  # 1 prompt + uncond
    weights = torch.tensor([-2.0, 3.0], device=device)
    rows: list[dict[str, Any]] = []
    errors: list[str] = []

    def measure(stage: str, mode: str, batch: int, call: Callable[[], Any]) -> None:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        try:
            row = {"stage": stage, "mode": mode, "batch": batch, **time_ms(call, device, warmup, repeats)}
            finite = bool(torch.isfinite(call()).all())
        except Exception as e:
            traceback.print_exc()
            errors.append(f"{stage} {mode} b{batch}: {type(e).__name__}: {e}")
            return
        if not finite:
            errors.append(f"{stage} {mode} b{batch}: non-finite output")
        if device.type == "cuda":
            row["peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        rows.append(row)
        print(f"  {stage} {mode} batch {batch}: {row['median_ms']:.2f} ms (min {row['min_ms']:.2f})", flush=True)

    labels = []
    for mode in modes:
        precision, cuda_graph = LATENCY_MODES[mode]
        if cuda_graph and dry_run:
            continue
        labels.append(label(mode, dry_run))
        backend = TorchBackend(networks, str(device), precision_here(precision, dry_run), cuda_graph)
        for batch in batches:
            x = torch.randn(batch, 4, side, side, generator=gen).to(device)
            t = torch.full([batch], 0.5, device=device)
            measure("unet_cfg", labels[-1], batch, functools.partial(backend.unet, x, t, conds, weights))
    fp32 = TorchBackend(networks, str(device), "fp32")
    half = torch.bfloat16 if dry_run else torch.float16

    def decode_half(z: torch.Tensor) -> torch.Tensor:  # the backend keeps the decoder fp32: autocast it here
        with torch.inference_mode(), torch.autocast(device.type, dtype=half):
            return networks.decoder(z).float()

    for batch in batches:
        z = torch.randn(batch, 4, side, side, generator=gen).to(device)
        measure("decoder", "fp32", batch, functools.partial(fp32.decode, z))
        measure("decoder", label("fp16", dry_run), batch, functools.partial(decode_half, z))
    by_key = {(r["stage"], r["mode"], r["batch"]): r["median_ms"] for r in rows}
    plms50 = evaluations("plms", 50)
    estimates = {f"{mode} b{b}": by_key[("unet_cfg", mode, b)] * plms50 + by_key[("decoder", "fp32", b)]
                 for mode in labels for b in batches
                 if ("unet_cfg", mode, b) in by_key and ("decoder", "fp32", b) in by_key}
    b = batches[0]
    shown = ", ".join(f"{m} {by_key[('unet_cfg', m, b)]:.2f}" for m in labels if ("unet_cfg", m, b) in by_key)
    decoder = ", ".join(f"{r['mode']} {r['median_ms']:.2f}" for r in rows if r["stage"] == "decoder"
                        and r["batch"] == b)
    summary = f"{size} nets, batch {b}, median ms: unet_cfg {shown}; decoder {decoder}"
    if errors:
        summary += "; " + "; ".join(errors)
    info = {"size": size, "warmup": warmup, "repeats": repeats, "conds": 2, "latent": [side, side], "rows": rows,
            "plms50_ms_estimate": estimates, "plms50_evaluations": plms50}
    return [check("latency", "FAIL" if errors or not rows else "PASS", summary)], info


# compiled step: mode -> (precision, cuda_graph, compiled); the first mode is the reference of the others
COMPARE_MODES: dict[str, tuple[str, bool, bool]] = {
    "fp32": ("fp32", False, False), "fp32-compiled": ("fp32", False, True), "fp16": ("fp16", False, False),
    "fp16-graph": ("fp16", True, False), "fp16-compiled": ("fp16", False, True),
    "fp16-compiled-graph": ("fp16", True, True)}
PLMS50_PROMPT = ("A peaceful meadow, pastel crayons", 3.0)


def compare_mode(name: str, backend: Any, side: int, warmup: int, repeats: int, steps: int,
                 ref: dict[str, Any]) -> dict[str, Any]:
    """One backend: U-Net/CFG and decoder latency at batch 1, then a ``steps``-step PLMS image end to end (the first
    run warms up and compiles, the second is timed) with its figures against ``ref`` (the reference mode's
    latents and pixels, filled in by the first mode)."""
    import torch

    from ccld_trt.pipeline import DEFAULT_AUTOENCODER_SCALE, Request, generate

    gen = torch.Generator().manual_seed(0)
    conds = torch.cat([torch.zeros(1, 512), torch.randn(1, 512, generator=gen)]).to(backend.device)
    weights = torch.tensor([-2.0, 3.0], device=backend.device)
    x = torch.randn(1, 4, side, side, generator=gen).to(backend.device)
    t = torch.full([1], 0.5, device=backend.device)
    row: dict[str, Any] = {"mode": name}
    row["unet_cfg"] = time_ms(functools.partial(backend.unet, x, t, conds, weights), backend.device, warmup, repeats)
    row["decoder"] = time_ms(functools.partial(backend.decode, x), backend.device, warmup, repeats)
    request = Request(prompts=[PLMS50_PROMPT], n=1, seed=0, steps=steps, method="plms", latent_size=(side, side))
    for _ in range(2):
        result = generate(backend, request, [], DEFAULT_AUTOENCODER_SCALE)
    row["plms"] = {stage: seconds * 1e3 for stage, seconds in result.seconds.items()}
    row["plms"]["total"] = sum(result.seconds.values()) * 1e3
    latents = result.latents.numpy()
    if not ref:
        ref.update(mode=name, latents=latents, pixels=result.pixels)
    row.update(figures(latents, result.pixels, ref["latents"], ref["pixels"]))
    row["latents"] = latents
    if backend.compilation is not None:
        row["compilations"] = backend.compilation.compilations
        row["compile_s"] = backend.compilation.compile_seconds
        row["compiled"] = backend.compilation.summary()
    return row


def step_compiled(dry_run: bool, modes: list[str]) -> tuple[list[Check], dict[str, Any]]:
    """Eager vs CUDA graph vs torch.compile (and compiled + graph): U-Net/CFG, decoder, a 50-step PLMS image end to
    end, with PSNR against the first mode (fp32 eager) in the same run. Dry run: small networks on 8x8 latents,
    10 PLMS steps, fp32 and fp32-compiled only (compiling bf16 too would double minutes of CPU compile)."""
    import numpy as np
    import torch

    from ccld_trt.backends.compiled import compile_problem, inductor_cache_dir
    from ccld_trt.backends.torch_backend import TorchBackend

    if not dry_run and not torch.cuda.is_available():
        return [check("compiled", "FAIL", "torch sees no CUDA GPU")], {}
    device = "cpu" if dry_run else "cuda"
    size, side, warmup, repeats, steps = ("small", 8, 1, 3, 10) if dry_run else ("full", 32, 5, 30, 50)
    with tempfile.TemporaryDirectory() as tmp:
        networks = latency_networks(size, device, Path(tmp))
    problem = compile_problem(device)
    rows: list[dict[str, Any]] = []
    checks: list[Check] = []
    ref: dict[str, Any] = {}
    for mode in modes:
        precision, cuda_graph, compiled = COMPARE_MODES[mode]
        name = label(mode, dry_run)
        if dry_run and (cuda_graph or precision != "fp32"):
            continue
        if compiled and problem is not None:
            checks.append(check(f"compiled {name}", "FAIL", problem))
            continue
        try:
            with tf32(False):
                row = compare_mode(name, TorchBackend(networks, device, precision_here(precision, dry_run),
                                                      cuda_graph, compiled), side, warmup, repeats, steps, ref)
        except Exception as e:
            traceback.print_exc()
            checks.append(check(f"compiled {name}", "FAIL", f"{type(e).__name__}: {e}"))
            continue
        eager = next((r for r in rows if r["mode"] == name.removesuffix("-graph")), None) if cuda_graph else None
        if eager is not None:
            row["rel_to_eager"] = float(np.linalg.norm(row["latents"] - eager["latents"]) /
                                        np.linalg.norm(eager["latents"]))
        bad = []
        if precision == "fp32" and (row["latents_rel"] > FP32_LATENTS_REL or row["pixels_max_diff"] > FP32_PIXELS_DIFF):
            bad.append(f"vs {ref['mode']}: latents rel {row['latents_rel']:.2e}, pixel diff {row['pixels_max_diff']}")
        if precision != "fp32" and row["psnr_db"] < FP16_PSNR_DB:
            bad.append(f"PSNR {row['psnr_db']:.1f} dB < {FP16_PSNR_DB:g}")
        if row.get("rel_to_eager", 0.0) > GRAPH_VS_EAGER_REL[precision_here(precision, dry_run)]:
            bad.append(f"rel to {name.removesuffix('-graph')} {row['rel_to_eager']:.2e}")
        summary = (f"unet_cfg {row['unet_cfg']['median_ms']:.2f} ms, decoder {row['decoder']['median_ms']:.2f} ms, "
                   f"{steps}-step PLMS {row['plms']['total']:.0f} ms, PSNR {row['psnr_db']:.1f} dB vs {ref['mode']}"
                   + (f"; {row['compiled']}" if "compiled" in row else ""))
        print(f"  compiled {name}: {summary}", flush=True)
        checks.append(check(f"compiled {name}", "FAIL" if bad else "PASS", "; ".join([summary, *bad])))
        rows.append(row)
    for row in rows:
        del row["latents"]
    info = {"size": size, "latent": [side, side], "warmup": warmup, "repeats": repeats, "steps": steps, "rows": rows,
            "inductor_cache": inductor_cache_dir(), "reference": ref.get("mode")}
    return checks, info


def pytest_check(xml_path: Path, rc: int | None, dry_run: bool) -> Check:
    """Summarise ``pytest -m gpu``'s JUnit XML (rc None: pytest was not run)."""
    if rc is None:
        return check("pytest -m gpu", "SKIP", "not run (not asked for, or pytest is not installed; see the log)")
    if not xml_path.is_file():
        return check("pytest -m gpu", "FAIL", f"no JUnit XML (exit status {rc}{', timed out' if rc == 124 else ''})")
    suites = ET.parse(xml_path).getroot()
    suites_list = [suites] if suites.tag == "testsuite" else list(suites)
    counts = {k: sum(int(s.get(k, 0)) for s in suites_list) for k in ("tests", "failures", "errors", "skipped")}
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    failed = [f"{c.get('classname')}.{c.get('name')}" for c in suites.iter("testcase")
              if c.find("failure") is not None or c.find("error") is not None]
    summary = (f"{passed} passed, {counts['failures']} failed, {counts['errors']} errors, {counts['skipped']} "
               f"skipped (exit status {rc})" + (f": {', '.join(failed)}" if failed else ""))
    ok = rc == 0 and not failed and (passed > 0 or dry_run)  # on a GPU, all skipped means CUDA was not seen
    return check("pytest -m gpu", "PASS" if ok else "FAIL", summary)


def table(header: list[str], rows: list[list[Any]]) -> list[str]:
    """Markdown table lines."""
    return [f"| {' | '.join(header)} |", f"|{' --- |' * len(header)}",
            *(f"| {' | '.join(map(str, r))} |" for r in rows)]


def markdown(result: dict[str, Any]) -> str:
    env = result.get("env", {})
    gpu = env.get("gpu") or {}
    tf32 = ", ".join(f"{k} {v}" for k, v in (env.get("tf32") or {}).items())
    lines = [f"# GPU check: {gpu.get('name', 'no GPU (CPU dry run)' if result['dry_run'] else 'no GPU')}", "",
             f"{result['date']}; torch {env.get('torch')} (CUDA {gpu.get('cuda')}, cuDNN {env.get('cudnn')}), "
             f"driver {gpu.get('driver')}, python {env.get('python')}, {env.get('cpu_model')} x{env.get('cores')}; "
             f"defaults: {tf32}.", ""]
    lines += table(["check", "status", "figures"], [[c["check"], c["status"], c["summary"]] for c in result["checks"]])
    for c in result["checks"]:
        if c.get("cases"):
            lines += ["", f"## {c['check']}", ""]
            lines += table(["case", "latents rel", "max pixel diff", "PSNR dB", "rel to eager"],
                           [[r["case"], f"{r['latents_rel']:.2e}", r["pixels_max_diff"], f"{r['psnr_db']:.1f}",
                             f"{r['rel_to_eager']:.2e}" if "rel_to_eager" in r else ""] for r in c["cases"]])
    latency = result.get("latency", {})
    if latency.get("rows"):
        side = "x".join(map(str, latency["latent"]))
        lines += ["", f"## Latency ({latency['size']} networks, {side} latents, 2 CFG conditions; median of "
                      f"{latency['repeats']} after {latency['warmup']} warm-up calls)", ""]
        lines += table(["stage", "mode", "batch", "median ms", "min ms", "peak MiB"],
                       [[r["stage"], r["mode"], r["batch"], f"{r['median_ms']:.2f}", f"{r['min_ms']:.2f}",
                         f"{r['peak_mb']:.0f}" if "peak_mb" in r else ""] for r in latency["rows"]])
        lines += ["", f"Estimated 50-step PLMS ({latency['plms50_evaluations']} U-Net/CFG evaluations + decoder "
                      "fp32), ms: " + ", ".join(f"{k} {v:.0f}" for k, v in latency["plms50_ms_estimate"].items())]
    compared = result.get("compiled", {})
    if compared.get("rows"):
        side = "x".join(map(str, compared["latent"]))
        lines += ["", f"## Eager, CUDA graph, torch.compile ({compared['size']} U-Net and decoder, {side} latents, "
                      f"batch 1, 2 CFG conditions; median of {compared['repeats']} after {compared['warmup']} "
                      f"warm-up calls; the {compared['steps']}-step PLMS image is the second run, conditioning + "
                      "sampling + decoding)",
                  ""]
        plms = []
        for r in compared["rows"]:
            stages = " + ".join(f"{ms:.0f}" for stage, ms in r["plms"].items() if stage != "total")
            plms.append(f"{r['plms']['total']:.0f} ({stages})")
        lines += table(["mode", "unet_cfg ms", "decoder ms", f"PLMS-{compared['steps']} image ms",
                        f"PSNR dB vs {compared['reference']}",
                        "latents rel", "rel to eager", "compilations", "compile s"],
                       [[r["mode"], f"{r['unet_cfg']['median_ms']:.2f}", f"{r['decoder']['median_ms']:.2f}", image,
                         f"{r['psnr_db']:.1f}", f"{r['latents_rel']:.2e}",
                         f"{r['rel_to_eager']:.2e}" if "rel_to_eager" in r else "", r.get("compilations", ""),
                         f"{r['compile_s']:.1f}" if "compile_s" in r else ""]
                        for r, image in zip(compared["rows"], plms, strict=True)])
        lines += ["", f"Inductor cache: {compared['inductor_cache']}"]
    return "\n".join(lines) + "\n"


def step_report(parts: Path, root: Path, rcs: dict[str, int], pytest_ran: bool, dry_run: bool) -> int:
    from ccld_trt.benchmarks.machine import cpu_model, slugify

    result: dict[str, Any] = {"kind": "gpu-check", "dry_run": dry_run, "checks": [],
                              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    for step in ("env", "pytest", "e2e", "latency", "compiled"):
        if step == "pytest":
            result["checks"].append(pytest_check(parts / "pytest.xml", rcs.get("pytest") if pytest_ran else None,
                                                 dry_run))
            continue
        path = parts / f"{step}.json"
        if step != "env" and step not in rcs and not path.is_file():
            continue  # not asked for (gpu_check.sh --only)
        if path.is_file():
            part = json.loads(path.read_text())
            result["checks"] += part["checks"]
            result[step] = part["info"]
        else:
            rc = rcs.get(step)
            why = "timed out" if rc in (124, 137) else f"exit status {rc}"
            result["checks"].append(check(step, "FAIL", f"the step wrote no results ({why}; see the log)"))
    gpu = (result.get("env") or {}).get("gpu")
    slug = slugify(gpu["name"]) if gpu else f"{slugify(cpu_model())}-{'cpu-dry-run' if dry_run else 'no-gpu'}"
    out = root / slug
    out.mkdir(parents=True, exist_ok=True)
    stem = "gpu-check-" + result["date"].replace("-", "").replace(":", "").replace("+0000", "Z")
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    (out / f"{stem}.md").write_text(markdown(result))
    print(f"results: {out / stem}.json, .md")
    print("SUMMARY")
    for c in result["checks"]:
        print(f"{c['status']} {c['check']}: {c['summary']}")
    return 1 if any(c["status"] == "FAIL" for c in result["checks"]) else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("step", choices=["env", "e2e", "latency", "compiled", "report"])
    p.add_argument("--parts", type=Path, required=True, help="directory of the steps' JSON (and pytest.xml)")
    p.add_argument("--cpu-dry-run", action="store_true", help="run on the CPU, small and short")
    p.add_argument("--cases", help="comma-separated e2e cases (default: all; dry run: e2e_ddpm)")
    p.add_argument("--modes", help="comma-separated modes of the step (default: all of its modes; e2e: "
                                   f"{', '.join(E2E_MODES)}; compiled: {', '.join(COMPARE_MODES)})")
    p.add_argument("--output", type=Path, default=REPO / "benchmarks" / "results",
                   help="report: results root; files go to OUTPUT/<gpu-slug>/")
    p.add_argument("--rc", action="append", default=[], metavar="STEP=N", help="report: a step's exit status")
    p.add_argument("--pytest-ran", action="store_true", help="report: pytest -m gpu was run (else not installed)")
    args = p.parse_args(argv)
    args.parts.mkdir(parents=True, exist_ok=True)
    if args.step == "report":
        rcs = {k: int(v) for k, v in (item.split("=", 1) for item in args.rc)}
        return step_report(args.parts, args.output, rcs, args.pytest_ran, args.cpu_dry_run)
    start = time.perf_counter()
    modes = args.modes.split(",") if args.modes else None
    tokenizer = use_token_table_if_needed()  # before anything imports ccld_trt.pipeline
    try:
        if args.step == "env":
            checks, info = step_env(args.cpu_dry_run)
        elif args.step == "e2e":
            checks, info = step_e2e(args.cpu_dry_run, args.cases.split(",") if args.cases else None,
                                    [m for m in (modes or E2E_MODES) if m in E2E_MODES])
        elif args.step == "latency":
            checks, info = step_latency(args.cpu_dry_run,
                                        [m for m in (modes or LATENCY_MODES) if m in LATENCY_MODES])
        else:
            checks, info = step_compiled(args.cpu_dry_run,
                                         [m for m in (modes or COMPARE_MODES) if m in COMPARE_MODES])
    except Exception as e:  # reported as this step's failure; the other steps run in their own processes
        traceback.print_exc()
        checks, info = [check(args.step, "FAIL", f"{type(e).__name__}: {e}")], {}
    info.update(seconds=time.perf_counter() - start, tokenizer=tokenizer)
    (args.parts / f"{args.step}.json").write_text(json.dumps({"checks": checks, "info": info}, default=str))
    for c in checks:
        print(f"{c['status']} {c['check']}: {c['summary']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Solvers and precisions measured on the trained proxy U-Net (docs/proxy.md), next to random weights of the same
shape in the same run.

``python -m ccld_trt.benchmarks.proxy_measure [--out DIR]`` materialises the committed proxy
(benchmarks/proxy/proxy_unet.safetensors) into build/proxy/models, writes its random twin (the same files, the
U-Net at the demo initialisation of the same shape) into build/proxy/random, and measures both:

* steps to quality: every method of ``steps_to_quality`` at 5-50 steps, plus the fast preset and plms/15 and 50,
  latent PSNR against the converged endpoint (DPM-Solver++(3M), 400 steps to log-SNR 20) from the same noise;
* precisions: torch bf16 autocast, openvino bf16 and int8 and the fp16 graphs' faithful emulation (ONNX Runtime
  running ``fp16.emulate_fp16`` of the fp16 U-Net graph) against torch fp32 on the same seeds and cells.

The conditioning is an image prompt through the pipeline's own path (``load_image_prompt`` and the backend's CLOOB
image tower): the proxy was trained on CLOOB image embeddings of photo crops, so a text prompt's embedding would be
off its training distribution. The prompt is the held-out photo, weight 3. PSNR: latents with peak-to-peak 2 (as
``steps_to_quality``), and "RGB" the latents turned back into the photo colour space (proxy_data.latent_to_rgb,
255 scale), which is what the proxy's samples look like; the demo autoencoder's pixels mean nothing here.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ccld_trt.backends.base import Backend
from ccld_trt.benchmarks.proxy_data import latent_to_rgb, photo_paths
from ccld_trt.benchmarks.proxy_train import COMPACT_FILE, PROXY_MARKER, materialize
from ccld_trt.benchmarks.solver_oracle import REFERENCE_FINAL_LOG_SNR, psnr
from ccld_trt.benchmarks.steps_to_quality import REFERENCE_METHOD, REFERENCE_STEPS, QualityConfig
from ccld_trt.export.atomic import write_atomic
from ccld_trt.export.cloob_config import cloob_image_size, load_cloob_config
from ccld_trt.export.demo_weights import init_tensor
from ccld_trt.export.models import DEMO_MARKER, UNET_FILE, ModelFiles
from ccld_trt.export.unet import infer_unet_config, unet_state_shapes
from ccld_trt.image_prompt import load_image_prompt
from ccld_trt.pipeline import Request, conditions, draw_noise, sample_latents
from ccld_trt.runner import BackendOptions, ModelSource, open_session
from ccld_trt.sampler_names import FAST_METHOD, FAST_STEPS
from ccld_trt.samplers import sample
from ccld_trt.schedule import log_snr_timesteps

PROXY_DIR = Path(__file__).resolve().parents[2] / "proxy"  # benchmarks/proxy: the committed checkpoint
COMPACT = PROXY_DIR / COMPACT_FILE
PROMPT_WEIGHT = 3.0
SEED = 0
IMAGES = 1  # images of one batch from SEED (more cost ~0.4x each again; the shared 2-core CPU allowed one)
# (backend, precision) measured against torch fp32; "fp16-emulated" is ONNX Runtime on fp16.emulate_fp16's graph
PRECISIONS: tuple[tuple[str, str], ...] = (("torch", "bf16"), ("openvino", "bf16"), ("openvino", "int8"),
                                           ("onnxruntime", "fp16-emulated"))
PRECISION_CELLS: tuple[tuple[str, int], ...] = (("plms", 50), (FAST_METHOD, FAST_STEPS))

Log = Callable[[str], None]


def proxy_models(root: Path, compact: Path = COMPACT) -> Path:
    """root/models: the materialised proxy (written once; rewritten when the compact file is newer)."""
    target = root / "models"
    if (target / PROXY_MARKER).exists() and (target / UNET_FILE).stat().st_mtime >= compact.stat().st_mtime:
        return target
    partial = root / "models.partial"
    shutil.rmtree(partial, ignore_errors=True)
    materialize(compact, partial)
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    return target


def random_twin(models: Path, root: Path) -> Path:
    """root/random: ``models`` with its U-Net replaced by the demo weights' random initialisation (seed 0) of the
    same shape: the "random weights" the project's other figures come from, at the proxy's size."""
    target = root / "random"
    if (target / UNET_FILE).exists() and (target / UNET_FILE).stat().st_mtime >= (models / UNET_FILE).stat().st_mtime:
        return target
    partial = root / "random.partial"
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(models, partial)
    (partial / PROXY_MARKER).unlink()
    base, multipliers = infer_unet_config(torch.load(models / UNET_FILE, weights_only=True))
    state = {k: torch.from_numpy(init_tensor(k, s, 0)) for k, s in unet_state_shapes(base, multipliers).items()}
    state["autoencoder_scale"] = torch.tensor(1.0)
    torch.save(state, partial / UNET_FILE)
    (partial / DEMO_MARKER).write_text("RANDOM demo initialisation of the proxy's U-Net shape (proxy_measure).\n",
                                       encoding="utf-8")
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    return target


@dataclass(frozen=True)
class Prompted:
    """The measurements' conditioning: the held-out photo as an image prompt."""

    path: Path
    weight: float = PROMPT_WEIGHT

    def request(self, method: str, steps: int, n: int = IMAGES) -> Request:
        return Request(prompts=[], image_prompts=[(self.path, self.weight)], n=n, seed=SEED, steps=steps,
                       method=method)

    def conds(self, backend: Backend, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        pixels = load_image_prompt(self.path, image_size)
        return conditions(backend, self.request("plms", 1), [(pixels, self.weight)])


def held_out_prompt() -> Prompted:
    return Prompted(photo_paths()[-1])


def latents_for(backend: Backend, image_size: int, prompt: Prompted, cells: Sequence[tuple[str, int]],
                n: int = IMAGES) -> dict[tuple[str, int], torch.Tensor]:
    """(method, steps) -> latents [n, 4, 32, 32] float32 for every cell."""
    conds, weights = prompt.conds(backend, image_size)
    return {(m, k): sample_latents(backend, prompt.request(m, k, n), conds, weights).float().cpu() for m, k in cells}


def converged(backend: Backend, image_size: int, prompt: Prompted, steps: int = REFERENCE_STEPS,
              n: int = IMAGES) -> torch.Tensor:
    """The probability-flow ODE's endpoints [n, 4, 32, 32] from the cells' noise (steps_to_quality's
    reference)."""
    conds, weights = prompt.conds(backend, image_size)
    x = draw_noise(prompt.request(REFERENCE_METHOD, steps, n)).x
    t = log_snr_timesteps(steps, REFERENCE_FINAL_LOG_SNR)
    return sample(lambda xx, tt: backend.unet(xx, tt, conds, weights), x, t, REFERENCE_METHOD).float().cpu()


def rgb_psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return psnr(latent_to_rgb(a) * 255, latent_to_rgb(b) * 255, 255.0)


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def _per_image(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """Latent and RGB PSNR of each image of ``a`` against ``b`` ([IMAGES, 4, h, w]): mean and min over images."""
    lat = [psnr(x[None], y[None]) for x, y in zip(a, b, strict=True)]
    rgb = [rgb_psnr(x[None], y[None]) for x, y in zip(a, b, strict=True)]
    # scale-free: the error against the reference's own size (random weights' latents are ~20x larger)
    snr = [10 * math.log10(float(y.double().pow(2).mean()) / max(float((x - y).double().pow(2).mean()), 1e-300))
           for x, y in zip(a, b, strict=True)]
    return {"latent_psnr_db": statistics.mean(lat), "latent_psnr_min_db": min(lat),
            "rgb_psnr_db": statistics.mean(rgb), "rgb_psnr_min_db": min(rgb), "snr_db": statistics.mean(snr)}


def quality_rows(models: Path, prompt: Prompted, log: Log, cells: Sequence[tuple[str, int]] | None = None,
                 reference_steps: int = REFERENCE_STEPS,
                 images: int = IMAGES) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Per cell: U-Net evaluations and latent / RGB PSNR against the converged endpoint (mean and min over the
    images); and stats of the converged latents (their std says how stiff the network's ODE is)."""
    from ccld_trt.samplers import evaluations

    cells = list(cells or QualityConfig().cells())
    session = open_session(BackendOptions("torch", "cpu", "fp32").resolved(), ModelSource(ModelFiles.resolve(models)))
    backend, size = session.backend, session.image_size
    started = time.perf_counter()
    ref = converged(backend, size, prompt, reference_steps, images)
    log(f"{models.name}: reference {time.perf_counter() - started:.0f} s")
    outs = latents_for(backend, size, prompt, cells, images)
    log(f"{models.name}: cells {time.perf_counter() - started:.0f} s")
    rows = [{"method": m, "steps": k, "evaluations": evaluations(m, k), **_per_image(outs[m, k], ref)}
            for m, k in cells]
    return rows, {"latent_std": float(ref.std()), "latent_absmax": float(ref.abs().max()),
                  "reference_steps": reference_steps}


def _open(models: Path, backend: str, precision: str) -> tuple[Backend, int, str | None]:
    """An opened backend, the CLOOB image size, and a note for the report (or None)."""
    files = ModelFiles.resolve(models)
    if precision != "fp16-emulated":
        session = open_session(BackendOptions(backend, "cpu", precision).resolved(), ModelSource(files))
        return session.backend, session.image_size, None
    backend_, note = _fp16_emulated(files)
    return backend_, cloob_image_size(load_cloob_config(files.cloob_config)), note


def _fp16_emulated(files: ModelFiles) -> tuple[Backend, str]:
    """ONNX Runtime on the fp32 graphs, but with the U-Net graph replaced by the emulation of its fp16 graph
    (every tensor the fp16 graph holds rounded to fp16; fp16.py says why ONNX Runtime needs that). The fp16 graph
    is converted here without the export's validation gate, so that a network the gate refuses is still
    measured; the note says what the gate says (``export_all`` with fp16)."""
    import onnx

    from ccld_trt.backends.onnxruntime_backend import OnnxRuntimeBackend
    from ccld_trt.export.fp16 import convert_to_fp16, emulate_fp16
    from ccld_trt.export.graph_specs import BACKEND_GRAPHS
    from ccld_trt.export.onnx_checks import ExportError
    from ccld_trt.export.onnx_export import default_onnx_dir, export_all, onnx_path
    from ccld_trt.export.onnx_trace import save_onnx

    onnx_dir = default_onnx_dir(files)
    export_all(files, onnx_dir, BACKEND_GRAPHS, fp16=False)
    try:
        export_all(files, onnx_dir, ["unet_cfg"], fp16=True)
        note = "the fp16 export's validation passes"
    except ExportError as e:  # the gate refused the graph
        note = f"the fp16 export refuses this network: {str(e).splitlines()[0]}"
    emulated = onnx_dir.parent / f"{onnx_dir.name}-fp16-emulated"
    if not emulated.exists():
        partial = emulated.with_name(emulated.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        for graph in BACKEND_GRAPHS:
            model = onnx.load(str(onnx_path(onnx_dir, graph)))
            save_onnx(emulate_fp16(convert_to_fp16(model)) if graph == "unet_cfg" else model,
                      onnx_path(partial, graph))
        partial.rename(emulated)
    return OnnxRuntimeBackend(emulated, "cpu", "fp32"), note


def precision_rows(models: Path, prompt: Prompted, log: Log,
                   precisions: Sequence[tuple[str, str]] = PRECISIONS) -> list[dict[str, Any]]:
    """Per precision and cell: latent and RGB PSNR and relative error against torch fp32, same noise and
    conditioning (mean and min over the images); a precision that cannot run here gets an ``error``."""
    reference, size, _ = _open(models, "torch", "fp32")
    ref = latents_for(reference, size, prompt, PRECISION_CELLS)
    rows: list[dict[str, Any]] = []
    for backend_name, precision in precisions:
        started = time.perf_counter()
        try:
            backend, size, note = _open(models, backend_name, precision)
            outs = latents_for(backend, size, prompt, PRECISION_CELLS)
        except Exception as e:  # reported as a row: the other precisions still stand
            rows.append({"backend": backend_name, "precision": precision, "error": f"{type(e).__name__}: {e}"})
            log(f"{models.name} {backend_name} {precision}: {rows[-1]['error']}")
            continue
        for m, k in PRECISION_CELLS:
            rows.append({"backend": backend_name, "precision": precision, "method": m, "steps": k,
                         **_per_image(outs[m, k], ref[m, k]), "rel_error": rel_error(outs[m, k], ref[m, k]),
                         **({"note": note} if note else {})})
        log(f"{models.name} {backend_name} {precision}: {time.perf_counter() - started:.0f} s")
    return rows


def _fmt(value: float) -> str:
    return "inf" if math.isinf(value) else f"{value:.1f}"


def _cell(row: dict[str, Any]) -> str:
    return f"{_fmt(row['latent_psnr_db'])} ({_fmt(row['latent_psnr_min_db'])})"


def markdown(views: dict[str, dict[str, Any]]) -> str:
    """The tables of docs/proxy.md from measure_view's results: the views side by side."""
    names = list(views)
    if not names:
        return "no results\n"
    first = views[names[0]]
    lines = [f"{first['machine']}, {first['date']}, {first['threads']} torch thread(s) per view, the machine "
             f"shared with other work. {first['images']} images (seed {first['seed']}), image prompt "
             f"{first['prompt']} (held out), weight {PROMPT_WEIGHT:g}. PSNR dB: mean (min) over the images.", "",
             "Steps to quality against the converged endpoint: latent PSNR, SNR (scale-free), RGB PSNR (inf: "
             "identical after clamping, i.e. saturated).", "",
             "| method | steps | U-Net evaluations | " + " | ".join(f"{n} latent PSNR" for n in names) + " | " +
             " | ".join(f"{n} SNR" for n in names) + " | " + " | ".join(f"{n} RGB" for n in names) + " |",
             "| --- | ---: | ---: |" + " ---: |" * (3 * len(names))]
    def snr(name: str, row: dict[str, Any]) -> str:
        if "snr_db" in row:
            return _fmt(row["snr_db"])
        # measured before the column existed: from the PSNR and the reference's std (mean ~0)
        std = views[name]["reference"]["latent_std"]
        return "≈" + _fmt(row["latent_psnr_db"] + 20 * math.log10(std / 2))

    by_key = {n: {(r["method"], r["steps"]): r for r in views[n].get("quality", [])} for n in names}
    keys = sorted(by_key[names[0]], key=lambda key: (QualityConfig().methods.index(key[0])
                                                    if key[0] in QualityConfig().methods else 99, key[1]))
    for key in keys:
        cells = [by_key[n].get(key) for n in names]
        lines.append(f"| {key[0]} | {key[1]} | {by_key[names[0]][key]['evaluations']} | " +
                     " | ".join(_cell(c) if c else "—" for c in cells) + " | " +
                     " | ".join(snr(n, c) if c else "—" for n, c in zip(names, cells, strict=True)) + " | " +
                     " | ".join(_fmt(c["rgb_psnr_db"]) if c else "—" for c in cells) + " |")
    lines += ["", "Converged latents: " + "; ".join(
        f"{n} std {views[n]['reference']['latent_std']:.2f}, max |x| {views[n]['reference']['latent_absmax']:.1f}"
        f" ({views[n]['reference'].get('reference_steps', REFERENCE_STEPS)}-step reference)"
        for n in names if "reference" in views[n]) + "."]
    if "precisions" not in first:
        return "\n".join(lines) + "\n"
    lines += ["", "Precisions against torch fp32 on the same noise and cells: latent PSNR, RGB PSNR, relative "
                  "error of the latents.", "",
              "| backend | precision | cell | " + " | ".join(f"{n} latent | {n} RGB | {n} rel. error" for n in names)
              + " |", "| --- | --- | --- |" + " ---: |" * (3 * len(names))]
    for row in first["precisions"]:
        if "error" in row:
            lines.append(f"| {row['backend']} | {row['precision']} | — | {row['error']} |")
            continue
        parts = []
        for n in names:
            match = [r for r in views[n].get("precisions", []) if "error" not in r and
                     (r["backend"], r["precision"], r["method"], r["steps"]) ==
                     (row["backend"], row["precision"], row["method"], row["steps"])]
            parts.append(f"{_cell(match[0])} | {_fmt(match[0]['rgb_psnr_db'])} | {match[0]['rel_error']:.1e}"
                         if match else "— | — | —")
        lines.append(f"| {row['backend']} | {row['precision']} | {row['method']}/{row['steps']} | " +
                     " | ".join(parts) + " |")
    notes = {f"{n}: {r['note']}" for n in names for r in views[n].get("precisions", []) if r.get("note")}
    lines += ["", *sorted(notes)] if notes else []
    return "\n".join(lines) + "\n"


VIEWS = ("proxy", "random")


PARTS = ("quality", "precisions")


def measure_view(view: str, part: str, root: Path, out: Path, log: Log = print, compact: Path = COMPACT,
                 config: QualityConfig | None = None, tag: str = "",
                 precisions: Sequence[tuple[str, str]] = PRECISIONS, images: int = IMAGES) -> Path:
    """Measure one part (steps to quality or precisions) of one view (the proxy or its random twin) and write
    out/<view>-<part>.json; returns its path. Views and parts are separate processes (one thread each) so that
    they can run side by side on a shared machine."""
    from ccld_trt.benchmarks.machine import machine_info

    models = proxy_models(root, compact)
    directory = models if view == "proxy" else random_twin(models, root)
    prompt = held_out_prompt()
    info = machine_info("cpu")
    started = time.perf_counter()
    result: dict[str, Any] = {"view": view, "machine": f"{info['cpu_model']}, {info['cores']} cores",
                              "date": info["date"], "threads": torch.get_num_threads(), "seed": SEED,
                              "images": images if part == "quality" else IMAGES, "prompt": prompt.path.name}
    if part == "quality":
        config = config or QualityConfig()
        result["quality"], result["reference"] = quality_rows(directory, prompt, log, config.cells(),
                                                              config.reference_steps, images)
    else:
        result["precisions"] = precision_rows(directory, prompt, log, precisions)
    result["wall_seconds"] = time.perf_counter() - started
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{view}-{part}{tag}.json"
    write_atomic(path, json.dumps(result, indent=1) + "\n")
    return path


def load_views(out: Path) -> dict[str, dict[str, Any]]:
    """The views measured into ``out``, each its parts merged (quality first)."""
    views: dict[str, dict[str, Any]] = {}
    for view in VIEWS:
        for part in PARTS:
            for path in sorted(out.glob(f"{view}-{part}*.json")):
                doc = json.loads(path.read_text(encoding="utf-8"))
                merged = views.setdefault(view, {})
                rows = {key: merged.get(key, []) + doc.get(key, []) for key in PARTS}
                merged.update(doc)
                merged.update({key: value for key, value in rows.items() if value})
    return views


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ccld_trt.benchmarks.proxy_measure",
                                     description="solvers and precisions on the trained proxy U-Net and on random "
                                                 "weights of its shape (docs/proxy.md)")
    parser.add_argument("--view", choices=VIEWS, action="append", help="measure this view (default both)")
    parser.add_argument("--part", choices=PARTS, action="append", help="measure this part (default both)")
    parser.add_argument("--table", action="store_true", help="only print the tables of what --out holds")
    parser.add_argument("--root", type=Path, default=Path("build/proxy"), help="materialised models (cache)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/proxy"), help="results directory")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--compact", type=Path, default=COMPACT, help="the proxy's compact checkpoint")
    parser.add_argument("--methods", help="quality part: comma-separated methods (default steps_to_quality's)")
    parser.add_argument("--step-counts", help="quality part: comma-separated step counts")
    parser.add_argument("--reference-steps", type=int, default=REFERENCE_STEPS, help="quality part: steps of "
                        "the converged reference")
    parser.add_argument("--precisions", help="precisions part: comma-separated backend:precision (default "
                        + ",".join(f"{b}:{p}" for b, p in PRECISIONS) + ")")
    parser.add_argument("--tag", default="", help="suffix of the result file (parts measured in pieces)")
    parser.add_argument("--images", type=int, default=IMAGES, help=f"quality part: images (default {IMAGES})")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    defaults = QualityConfig()
    config = QualityConfig(
        methods=tuple(args.methods.split(",")) if args.methods else defaults.methods,
        step_counts=tuple(int(k) for k in args.step_counts.split(",")) if args.step_counts else defaults.step_counts,
        reference_steps=args.reference_steps,
        extra_cells=defaults.extra_cells if not args.methods else ())
    if not args.table:
        for view in args.view or VIEWS:
            for part in args.part or PARTS:
                measure_view(view, part, args.root, args.out, log=lambda m: print(m, flush=True),
                             compact=args.compact, config=config, tag=args.tag,
                             precisions=[tuple(v.split(":", 1)) for v in args.precisions.split(",")]  # type: ignore[misc]
                             if args.precisions else PRECISIONS, images=args.images)
    text = markdown(load_views(args.out))
    write_atomic(args.out / "tables.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

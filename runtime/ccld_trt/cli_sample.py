"""``ccld-trt sample``: its flags made into one validated job, checked before anything loads, then the images."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ccld_trt import collector, stage_clock
from ccld_trt.cli_args import backend_options, model_source, weighted
from ccld_trt.export.errors import UserError
from ccld_trt.limits import autoencoder_scale_problem

if TYPE_CHECKING:
    from collections.abc import Mapping
    from concurrent.futures import Future

    import numpy as np

    from ccld_trt.backends.base import Opened
    from ccld_trt.graph_sample import RunGraph
    from ccld_trt.jobs import Job
    from ccld_trt.runner import BackendOptions, ModelSource
    from ccld_trt.sampler_tape import Tape

# How `sample` names the fields of a pipeline Request
_REQUEST_FLAGS = {"n": "-n", "batch_size": "--batch-size", "steps": "--steps", "method": "--method", "eta": "--eta",
                  "seed": "--seed", "autoencoder_scale": "--autoencoder-scale", "init": "--init",
                  "strength": "--strength"}


def _init_fields(args: argparse.Namespace) -> dict[str, Any]:
    """``--init`` / ``--strength`` as assemble's keywords; UserError for a strength without an init image."""
    if args.init is None:
        if args.strength is not None:
            raise UserError("--strength is for image-to-image: give the image to start from with --init IMAGE")
        return {}
    # the string as given: a Path would fold "https://" into "https:/", hiding that it is a URL
    return {"init": args.init, **({} if args.strength is None else {"strength": args.strength})}


def _sampler_fields(args: argparse.Namespace) -> dict[str, Any]:
    """``--steps`` and ``--method``, or a preset's (``--preset``; ``--fast`` is ``--preset fast``)."""
    from ccld_trt.sampler_names import PRESETS, chosen_preset

    try:
        preset = chosen_preset(args.fast, args.preset)  # the parser has checked the name
    except UserError as e:
        raise UserError(f"--fast is --preset fast: give --fast or --preset {args.preset}, not both") from e
    if preset is None:
        return {"steps": args.steps, "method": args.method}
    method, steps = PRESETS[preset]
    return {"steps": steps, "method": method}


def _check_outputs(n: int, latent_size: tuple[int, int], out_dir: Path, latents: str | None) -> None:
    """UserError unless --output-dir (and --save-latents) can take n images' results (check_output_dir)."""
    from ccld_trt.outputs import check_new_file, check_output_dir, png_bytes_bound

    h, w = latent_size
    check_output_dir(out_dir, "--output-dir", n * png_bytes_bound(64 * h * w))
    if latents:
        check_new_file(Path(latents), "--save-latents", n * 4 * h * w * 4 + 128)


def _assemble(args: argparse.Namespace, models: ModelSource) -> Job:
    """Every input of ``sample`` read and checked (without torch but for an init image), before any model loads."""
    from ccld_trt.export.cloob_config import cloob_image_size, load_cloob_config
    from ccld_trt.jobs import assemble
    from ccld_trt.request import InvalidRequest
    from ccld_trt.sampler_names import DEFAULT_AUTOENCODER_SCALE

    scale = args.autoencoder_scale
    try:
        return assemble([weighted(p, "prompt") for p in args.prompts],
                        [(Path(p), w) for p, w in (weighted(v, "image path") for v in args.images)],
                        image_size=cloob_image_size(load_cloob_config(models.files.cloob_config)),
                        autoencoder_scale=DEFAULT_AUTOENCODER_SCALE if scale in (None, "checkpoint") else scale,
                        n=args.n, batch_size=args.batch_size, seed=args.seed, eta=args.eta,
                        **_sampler_fields(args), **_init_fields(args))
    except InvalidRequest as e:
        raise UserError(f"{_REQUEST_FLAGS.get(e.field, e.field)} {e.problem}") from e


def _covered(args: argparse.Namespace, options: BackendOptions, job: Job) -> bool:
    """Whether graph_sample runs this kind of job (not with the U-Net checkpoint's scale, which torch reads)."""
    from ccld_trt import graph_sample

    return args.autoencoder_scale != "checkpoint" and graph_sample.covers(options, job)


def _graphs_without_torch(options: BackendOptions, models: ModelSource, job: Job,
                          prefetched: Future[Opened] | None) -> RunGraph | None:
    """Calls of the graphs ``job`` runs, where they are current for these model files and the thread opened every
    graph a text job runs (graph_sample.graph_runner); else None."""
    from ccld_trt import graph_sample
    from ccld_trt.jobs import graphs_run
    from ccld_trt.runner import graphs_current, graphs_dir, opened_graphs

    if not graphs_current(options, models, graphs_run(job)):
        return None
    stage_clock.mark("model files read")  # the manifest and the digest cache, not the weights
    return graph_sample.graph_runner(options, graphs_dir(options, models), opened_graphs(prefetched))


def cmd_sample(args: argparse.Namespace) -> object:
    stage_clock.mark("cli")  # bench --cold-start's stages (no-op unless $CCLD_TRT_STAGES)
    # the imports make objects that live until exit: the collector skips them (collector.start_up)
    with collector.start_up() as started:
        from ccld_trt.runner import prefetch_graphs

        options, models = backend_options(args), model_source(args)
        # a graph backend's files open in a thread meanwhile: both cores at work (started before the other imports)
        prefetched = prefetch_graphs(options, models)
        from ccld_trt import graph_sample

        job = _assemble(args, models)
        # where the results go is checked before the work too: made, written to and cleaned up again
        out_dir = Path(args.output_dir)
        _check_outputs(job.request.n, job.request.latent_size, out_dir, args.save_latents)
        resolved = options.resolved()
        # a job on a graph backend runs without torch once an earlier run recorded its tapes (graph_sample)
        covered = _covered(args, resolved, job)
        tapes = graph_sample.load_tapes(job.request) if covered else None
        if tapes is not None:
            stage_clock.mark("imports")
            started()
            if (run := _graphs_without_torch(resolved, models, job, prefetched)) is not None:
                return _sample_without_torch(args, resolved, models, job, run, tapes)
        from ccld_trt.api import Pipeline
        from ccld_trt.jobs import graphs_run

        stage_clock.mark("imports")
        started()  # before any export, which makes garbage for the collector
        # the graphs this job runs are exported now if they must be (one read of the networks); others wait for a use
        pipe = Pipeline.open(options, models, prefetched, graphs_run(job))
        stage_clock.mark("backend ready")
        _say_backend(pipe.backend, pipe.demo_weights)
        if args.autoencoder_scale == "checkpoint":
            job = dataclasses.replace(job, autoencoder_scale=pipe.session.checkpoint_autoencoder_scale)
            if problem := autoencoder_scale_problem(job.autoencoder_scale):
                raise UserError(f"--autoencoder-scale checkpoint: the U-Net checkpoint's scale {problem}")
        result = pipe.run(job)
        stage_clock.mark("image")
        _write(args, result.latents.numpy(), result.pixels, out_dir)
        stage_clock.mark("written")
        if covered and tapes is None:
            graph_sample.save_tapes(job.request)  # the next such job runs without torch
        return pipe


def _sample_without_torch(args: argparse.Namespace, options: BackendOptions, models: ModelSource, job: Job,
                          run: RunGraph, tapes: Mapping[int, Tape]) -> object:
    """``sample``'s images on the graphs ``run`` calls, with graph_sample's numpy arithmetic; returns what holds
    the graphs (for cli.run's ``keep``)."""
    from tqdm import tqdm

    from ccld_trt import graph_sample

    stage_clock.mark("backend ready")  # the thread's graphs waited for
    _say_backend(options.describe(), models.files.is_demo())
    total = sum(tapes[graph_sample.batch_rows(batch)].evaluations for batch in job.request.batches())
    with tqdm(total=total, desc="sampling", unit="eval", disable=None, leave=False) as bar:
        latents, pixels = graph_sample.generate(run, job, tapes, bar.update)
    stage_clock.mark("image")
    _write(args, latents, pixels, Path(args.output_dir))
    stage_clock.mark("written")
    return run


def _say_backend(backend: str, demo: bool) -> None:
    print(f"backend: {backend}", file=sys.stderr)  # which backend and precision make these images
    if demo:
        print("warning: these are RANDOM DEMO WEIGHTS: images will be noise-like, not paintings", file=sys.stderr)


def _write(args: argparse.Namespace, latents: np.ndarray, pixels: np.ndarray, out_dir: Path) -> None:
    """The PNGs (their paths printed) and, with --save-latents, the latents."""
    from ccld_trt.outputs import save_images, save_latents

    if args.save_latents:
        save_latents(latents, Path(args.save_latents))
    for path in save_images(pixels, out_dir):
        print(path)

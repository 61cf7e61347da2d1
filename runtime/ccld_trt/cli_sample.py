"""``ccld-trt sample``: its flags made into one validated job, checked before anything loads, then the images."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

from ccld_trt import collector, stage_clock
from ccld_trt.cli_args import backend_options, model_source, weighted
from ccld_trt.export.errors import UserError

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


def cmd_sample(args: argparse.Namespace) -> object:
    stage_clock.mark("cli")  # bench --cold-start's stages (no-op unless $CCLD_TRT_STAGES)
    # the imports make objects that live until exit: the collector skips them (collector.start_up)
    with collector.start_up() as started:
        from ccld_trt.runner import prefetch_graphs

        options, models = backend_options(args), model_source(args)
        # a graph backend's files open in a thread while this one imports torch: both cores at work
        prefetched = prefetch_graphs(options, models)
        from ccld_trt.api import Pipeline
        from ccld_trt.export.cloob_config import cloob_image_size, load_cloob_config
        from ccld_trt.jobs import assemble, graphs_run
        from ccld_trt.limits import autoencoder_scale_problem
        from ccld_trt.outputs import save_latents
        from ccld_trt.pipeline import DEFAULT_AUTOENCODER_SCALE, InvalidRequest

        stage_clock.mark("imports")
        started()  # before any export, which makes garbage for the collector
        scale = args.autoencoder_scale
        try:
            # every input is read here, before the (slow) model loading, so that a bad one fails at once
            job = assemble([weighted(p, "prompt") for p in args.prompts],
                           [(Path(p), w) for p, w in (weighted(v, "image path") for v in args.images)],
                           image_size=cloob_image_size(load_cloob_config(models.files.cloob_config)),
                           autoencoder_scale=DEFAULT_AUTOENCODER_SCALE if scale in (None, "checkpoint") else scale,
                           n=args.n, batch_size=args.batch_size, seed=args.seed, eta=args.eta,
                           **_sampler_fields(args), **_init_fields(args))
        except InvalidRequest as e:
            raise UserError(f"{_REQUEST_FLAGS.get(e.field, e.field)} {e.problem}") from e
        # where the results go is checked before the work too: made, written to and cleaned up again
        out_dir = Path(args.output_dir)
        _check_outputs(job.request.n, job.request.latent_size, out_dir, args.save_latents)
        # the graphs this job runs are exported now if they must be (one read of the networks); others wait for a use
        pipe = Pipeline.open(options, models, prefetched, graphs_run(job))
        stage_clock.mark("backend ready")
        print(f"backend: {pipe.backend}", file=sys.stderr)  # which backend and precision make these images
        if pipe.demo_weights:
            print("warning: these are RANDOM DEMO WEIGHTS: images will be noise-like, not paintings", file=sys.stderr)
        if scale == "checkpoint":
            job = dataclasses.replace(job, autoencoder_scale=pipe.session.checkpoint_autoencoder_scale)
            if problem := autoencoder_scale_problem(job.autoencoder_scale):
                raise UserError(f"--autoencoder-scale checkpoint: the U-Net checkpoint's scale {problem}")
        result = pipe.run(job)
        stage_clock.mark("image")
        if args.save_latents:
            save_latents(result.latents.numpy(), Path(args.save_latents))
        for path in result.save(out_dir):
            print(path)
        stage_clock.mark("written")
        return pipe

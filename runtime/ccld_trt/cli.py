"""The ``ccld-trt`` command: a thin layer over the library. Errors are one line unless --debug."""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from ccld_trt import stage_clock
from ccld_trt.access import add_access_args
from ccld_trt.cli_args import (
    add_backend_args,
    add_model_args,
    backend_options,
    model_files,
    model_source,
    scale,
    triple,
)
from ccld_trt.cli_sample import cmd_sample
from ccld_trt.engines.flavor import CHOICES as FLAVOR_CHOICES
from ccld_trt.export.errors import UserError
from ccld_trt.export.graph_specs import GRAPH_PRECISIONS
from ccld_trt.stopping import leave

# Entry-point group of commands that live in higher layers; see _add_extension_commands.
COMMANDS_GROUP = "ccld_trt.commands"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line instead of usage + message
        self.exit(2, f"{self.prog}: error: {message}\n")


def cmd_download(args: argparse.Namespace) -> None:
    from ccld_trt.download import convert_checkpoints, download_models
    from ccld_trt.export.models import DEFAULT_CLOOB_CONFIG, models_dir

    directory = models_dir(args.models)
    for path in download_models(directory, args.cloob_config or DEFAULT_CLOOB_CONFIG):
        print(path)
    for path in convert_checkpoints(directory):
        print(path)


def cmd_convert(args: argparse.Namespace) -> None:
    from ccld_trt.download import convert_checkpoints
    from ccld_trt.export.models import models_dir

    directory = models_dir(args.models)
    converted = convert_checkpoints(directory)
    if not converted:
        raise UserError(f"no U-Net or autoencoder checkpoint in {directory} to convert")
    for path in converted:
        print(path)


def cmd_demo_weights(args: argparse.Namespace) -> None:
    from ccld_trt.export.demo_weights import write_demo_weights

    for path in write_demo_weights(Path(args.dir), args.size, args.seed):
        print(path)
    print(f"wrote RANDOM demo weights ({args.size}): for trying the pipeline, not for real images", file=sys.stderr)


def cmd_export(args: argparse.Namespace) -> None:
    from ccld_trt.export.onnx_export import default_onnx_dir, export_all

    files = model_files(args)
    out_dir = Path(args.output) if args.output else default_onnx_dir(files)
    for path in export_all(files, out_dir, args.graphs, fp16=not args.no_fp16).values():
        print(path)
    if args.int8:
        from ccld_trt.backends.openvino_backend import check_precision, require_openvino
        from ccld_trt.export.graph_specs import BACKEND_GRAPHS
        from ccld_trt.int8 import ensure_int8
        from ccld_trt.pipeline import DEFAULT_AUTOENCODER_SCALE

        require_openvino()  # OpenVINO installed, and this CPU's instructions, before the long work
        check_precision("int8")
        export_all(files, out_dir, BACKEND_GRAPHS, fp16=False)  # what calibration runs (up to date if --graphs had it)
        for path in ensure_int8(out_dir, DEFAULT_AUTOENCODER_SCALE).values():
            print(path)


def cmd_doctor(args: argparse.Namespace) -> None:
    from ccld_trt.doctor import doctor_report, format_report

    print(format_report(doctor_report()))


def cmd_engines_build(args: argparse.Namespace) -> None:
    from ccld_trt.engines.build import ENGINE_GRAPHS, BuildOptions, build_engines
    from ccld_trt.engines.flavor import RTX_WHERE, parse_capabilities, resolve_flavor
    from ccld_trt.engines.profiles import ProfileParams
    from ccld_trt.engines.sidecar import local_capability
    from ccld_trt.export.cloob_config import cloob_image_size, load_cloob_config
    from ccld_trt.export.onnx_export import default_onnx_dir, export_all, onnx_path

    # before the (long) export, so a machine without a usable TensorRT gets the one clear line at once
    flavor = resolve_flavor(args.trt_flavor, local_capability())
    targets = parse_capabilities(args.compute_capability) if args.compute_capability else ()
    options = BuildOptions(flavor, targets, args.opt_level, args.workspace_gib).validate()
    files = None if args.onnx else model_files(args)
    image_size = args.image_size or (cloob_image_size(load_cloob_config(files.cloob_config)) if files else 224)
    params = ProfileParams(batch=args.batch, conds_max=args.conds_max, height=args.height, width=args.width,
                           image_size=image_size)
    params.validate()
    if files is None:
        onnx_dir = Path(args.onnx)
    else:
        onnx_dir = default_onnx_dir(files)
        export_all(files, onnx_dir, ENGINE_GRAPHS, fp16=args.precision == "fp16")
    targets_text = ", ".join(options.compute_capabilities) or "this GPU"
    print(f"engines: {flavor} for {targets_text} into {args.output}", file=sys.stderr)
    if flavor == "tensorrt-rtx":
        print(f"engines: {RTX_WHERE}", file=sys.stderr)
    sources = {g: onnx_path(onnx_dir, g, args.precision) for g in ENGINE_GRAPHS}
    for path in build_engines(sources, Path(args.output), params, options, rebuild=args.rebuild,
                              progress=lambda line: print(line, file=sys.stderr, flush=True)):
        print(path)


def cmd_serve(args: argparse.Namespace) -> None:
    from ccld_trt.access import load_keys
    from ccld_trt.serve import serve

    serve(backend_options(args), model_source(args), args.host, args.port, args.listen,
          keys=load_keys(args.api_key_file), insecure=args.insecure)
    # Stopped on SIGINT or SIGTERM, as asked, its clean-up done (serve.stop_page): exit 0 (a second signal during
    # the clean-up exits at once with 128 + its number: stopping.StopSignals). Leave without the interpreter's
    # finalisation, in which Gradio's daemon worker threads and torch's thread pools sometimes end the process
    # with std::terminate (rc -6 seen in CI-like runs after a clean stop), and which would wait for a model load
    # or a job that has not reached its next U-Net evaluation.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def cmd_cluster(args: argparse.Namespace) -> None:
    from ccld_trt.access import AccessPolicy, default_client_limit, load_keys
    from ccld_trt.cluster.app import ClusterSpec, run_cluster
    from ccld_trt.cluster.local_ray import check_auth_mode, trusted_proxies
    from ccld_trt.cluster.replica import ReplicaSettings

    settings = ReplicaSettings(max_batch=args.max_batch, batching=not args.no_batching,
                               max_ongoing=args.max_ongoing)
    limit = args.max_in_flight_per_client
    access = AccessPolicy(load_keys(args.api_key_file), log_prompts=args.log_prompts, max_in_flight=limit
                          if limit is not None else default_client_limit(args.replicas * args.max_ongoing))
    spec = ClusterSpec(replicas=args.replicas, max_queue=args.max_queue, settings=settings, access=access)
    warning = check_auth_mode(os.environ, args.insecure)  # refused here, before anything starts
    if warning:
        print(warning, file=sys.stderr)
    stopped_by = run_cluster(backend_options(args), model_source(args), spec, args.address, args.host, args.port,
                             listen=args.listen, insecure=args.insecure, key_file=args.api_key_file,
                             trusted=trusted_proxies(args.trusted_proxy), keep_ray_logs=args.keep_ray_logs)
    if stopped_by:
        # Stopped on SIGINT or SIGTERM, cleaned up (within app.SHUTDOWN_S): exit 0 without the interpreter's
        # finalisation (Ray's atexit hooks, its core worker), after which one stop took 17 s from the signal.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The parser of every command, or of this layer's only where ``argv`` names one of them (finding and importing
    the higher layers' commands, such as ``bench``, is ~45 ms of every start)."""
    from ccld_trt.sampler_names import DEFAULT_STRENGTH, FAST_METHOD, FAST_STEPS, METHODS, PRESETS

    parser = _Parser(prog="ccld-trt", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("sample", help="generate images from text and/or image prompts")
    p.add_argument("prompts", nargs="*", metavar="PROMPT", help="text prompt, optionally TEXT:WEIGHT (default 3)")
    # extend: a second --images adds to the first instead of silently replacing it
    p.add_argument("--images", nargs="+", action="extend", default=[], metavar="PATH[:W]", help="image prompts")
    p.add_argument("-n", type=int, default=1, help="number of images (default 1)")
    p.add_argument("--batch-size", type=int, help="images per batch (default: all n)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--steps", type=int, default=50, help="sampler timesteps (default 50)")
    p.add_argument("--method", default="plms", choices=METHODS, help="sampler (default plms)")
    p.add_argument("--fast", action="store_true",
                   help=f"the fast preset: --method {FAST_METHOD} --steps {FAST_STEPS} ({FAST_STEPS} U-Net evaluations "
                   "instead of plms/50's 59; overrides --method and --steps). Measured on closed-form "
                   "mixture-of-Gaussians oracles, not a trained model: 37.6-49.9 dB latent PSNR against the exact "
                   "ODE endpoint over nine mixtures (docs/solvers.md); on a small trained U-Net ~30 dB (docs/proxy.md)")
    p.add_argument("--preset", choices=PRESETS, help="a named sampler and step count, overriding --method and "
                   "--steps: " + "; ".join(f"{name}: {m}/{k}" for name, (m, k) in PRESETS.items()) + " (balanced: the "
                   "fewest evaluations with >= 35 dB latent PSNR against the converged endpoint on the oracles and on "
                   "the trained proxy, docs/proxy.md)")
    p.add_argument("--eta", type=float, default=0.0, help="ddim noise amount in [0, 1] (default 0)")
    p.add_argument("--init", metavar="IMAGE", help="image-to-image: start from this image (resized and "
                   "centre-cropped to the output size) instead of pure noise")
    p.add_argument("--strength", "--starting-timestep", dest="strength", type=float, metavar="S",
                   help="with --init: the timestep to start at, in (0, 1]: how far the image is noised before "
                   f"sampling; lower keeps more of it (default {DEFAULT_STRENGTH}, as the original's "
                   "--starting-timestep; only the steps below it run)")
    p.add_argument("--autoencoder-scale", type=scale, metavar="F|checkpoint",
                   help="latent scale before decoding (default 2.55, as the published demo)")
    p.add_argument("--output-dir", default="outputs", help="where out_NNNNN.png go (default outputs/)")
    p.add_argument("--save-latents", metavar="FILE.npy", help="also save the final latents, float32 [n,4,32,32]")
    add_backend_args(p)
    add_model_args(p)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("download", help="download the published weights into the models directory")
    p.add_argument("--models", help="models directory (default $CCLD_TRT_MODELS or ./models)")
    p.add_argument("--cloob-config", help="CLOOB config JSON path or built-in name")
    p.set_defaults(func=cmd_download)

    p = sub.add_parser("convert", help="write safetensors copies of the torch checkpoints (then preferred)")
    p.add_argument("--models", help="models directory (default $CCLD_TRT_MODELS or ./models)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("demo-weights", help="write small RANDOM checkpoints in the original formats")
    p.add_argument("dir", help="directory to write into (must not already hold model files)")
    p.add_argument("--size", choices=["small", "full"], default="small",
                   help="small (fast) or full (the real architectures' sizes, for benchmarks)")
    p.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    p.set_defaults(func=cmd_demo_weights)

    p = sub.add_parser("serve", help="a web page for generating images (this machine only unless --listen)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    add_access_args(p, cluster=False)
    add_backend_args(p)
    add_model_args(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("cluster", help="serve /v1/generate on Ray Serve replicas, U-Net calls of concurrent "
                                       "requests merged per step (needs the cluster extra)")
    p.add_argument("--replicas", type=int, default=1, help="model replicas, one GPU each on cuda (default 1)")
    p.add_argument("--address", help="join this Ray cluster (default: start a private local one, every port on "
                                     "127.0.0.1, token auth)")
    p.add_argument("--keep-ray-logs", action="store_true",
                   help="keep the local Ray's private directory (logs, the access log) after it stops "
                        "(default: removed)")
    p.add_argument("--host", default="127.0.0.1", help="HTTP address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    p.add_argument("--max-batch", type=int, default=32,
                   help="U-Net rows (images x CFG conditions) per merged call (default 32)")
    p.add_argument("--max-ongoing", type=int, default=8, help="requests each replica runs at once (default 8)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests waiting at the HTTP proxy before it answers 503 (default 64)")
    p.add_argument("--no-batching", action="store_true", help="one U-Net call per request evaluation")
    add_access_args(p, cluster=True)
    add_backend_args(p)
    add_model_args(p)
    p.set_defaults(func=cmd_cluster)

    from ccld_trt.export.graph_specs import GRAPHS

    p = sub.add_parser("export", help="export the networks to ONNX, fp32 and mixed-precision fp16 (graphs whose "
                                      "checkpoint, configuration and exporter are unchanged are kept)")
    p.add_argument("--output", metavar="DIR",
                   help="directory for the .onnx files and manifest.json (default: build/onnx/<hash of the model "
                        "paths>, under $CCLD_TRT_BUILD instead of ./build if set)")
    p.add_argument("--graphs", nargs="+", choices=list(GRAPHS), default=list(GRAPHS), metavar="GRAPH",
                   help=f"graphs to export (default: all of {', '.join(GRAPHS)})")
    p.add_argument("--no-fp16", action="store_true", help="only the fp32 graphs")
    p.add_argument("--int8", action="store_true",
                   help="also the int8 graphs of the openvino backend (NNCF, calibrated on sampling trajectories "
                        "through the fp32 graphs: minutes on a small CPU; kept while up to date)")
    add_model_args(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("engines", help="TensorRT engines")
    engines = p.add_subparsers(dest="engines_command", required=True, parser_class=_Parser)
    p = engines.add_parser("build", help="build TensorRT or TensorRT-RTX engines from the exported ONNX graphs")
    p.add_argument("--onnx", metavar="DIR",
                   help="directory of exported graphs (default: export them from the model files, as `export` does)")
    p.add_argument("--output", default="build/engines", help="engine directory (default build/engines)")
    p.add_argument("--precision", choices=GRAPH_PRECISIONS, default="fp16", help="which graphs (default fp16)")
    p.add_argument("--batch", type=triple, default=(1, 1, 4), metavar="MIN,OPT,MAX",
                   help="images per sampler call (default 1,1,4)")
    p.add_argument("--conds-max", type=int, default=4,
                   help="CFG conditions per call, the unconditional one included (default 4)")
    p.add_argument("--height", type=triple, default=(32, 32, 32), metavar="MIN,OPT,MAX",
                   help="latent height = image height / 8 (default 32)")
    p.add_argument("--width", type=triple, default=(32, 32, 32), metavar="MIN,OPT,MAX",
                   help="latent width = image width / 8 (default 32)")
    p.add_argument("--image-size", type=int,
                   help="CLOOB image encoder input side (default: the model's, or 224 with --onnx)")
    p.add_argument("--trt-flavor", default="auto", choices=FLAVOR_CHOICES,
                   help="tensorrt: for this machine's GPU; rtx: TensorRT-RTX, ahead of time for RTX GPUs, no GPU "
                        "needed (default auto: tensorrt with a GPU and TensorRT, else rtx)")
    p.add_argument("--compute-capability", metavar="X.Y[,X.Y...]",
                   help="rtx: the RTX GPUs to build for: 7.5, 8.6, 8.9, 12.0, 12.1 (default 8.6,8.9,12.0, "
                        "TensorRT-RTX's portable set; datacenter GPUs need --trt-flavor tensorrt)")
    p.add_argument("--opt-level", type=int, default=3, help="TensorRT builder optimisation level 0-5 (default 3)")
    p.add_argument("--workspace-gib", type=float, help="builder workspace limit in GiB (default: TensorRT's)")
    p.add_argument("--rebuild", action="store_true", help="rebuild even when an engine is up to date")
    add_model_args(p)
    p.set_defaults(func=cmd_engines_build)

    p = sub.add_parser("doctor", help="what is installed and which backends can run here")
    p.set_defaults(func=cmd_doctor)
    # the command is the first word that is not a flag (the top level's one flag, --debug, takes no value)
    if next((word for word in argv if not word.startswith("-")), None) not in sub.choices:
        _add_extension_commands(sub)
    return parser


def _add_extension_commands(sub: argparse._SubParsersAction[Any]) -> None:
    """Commands of higher layers (the benchmarks' ``bench``), found through the ``ccld_trt.commands`` entry points
    so that this layer never imports them: each is a function that adds its subparsers to ``sub``."""
    from importlib.metadata import entry_points

    for entry in sorted(entry_points(group=COMMANDS_GROUP), key=lambda e: e.name):
        try:
            add_commands = entry.load()
        except ImportError as e:  # a broken extension must not take the other commands down with it
            warnings.warn(f"the {entry.name!r} command is unavailable: {e}", stacklevel=1)
            continue
        add_commands(sub)


def run(argv: Sequence[str] | None = None, keep: list[object] | None = None) -> int:
    """Parse ``argv`` (default: sys.argv), run the command; returns the exit status (errors: one line).
    ``keep`` receives what the command leaves loaded (``sample``'s pipeline), for a caller that exits next and
    lets the OS free it: torn down object by object, a loaded OpenVINO pipeline takes ~0.2 s."""
    stage_clock.mark("python")  # bench --cold-start: the interpreter is up and this module imported
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv).parse_args(argv)
    warnings.formatwarning = lambda msg, cat, *_: f"warning: {msg}\n"
    try:
        loaded = args.func(args)
        if keep is not None:
            keep.append(loaded)
    except UserError as e:
        if args.debug:
            raise
        print(f"ccld-trt: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("ccld-trt: interrupted", file=sys.stderr)
        return 130
    return 0


def main() -> NoReturn:
    loaded: list[object] = []
    leave(run(keep=loaded))

"""The command line's reusable argument groups and value types, each parsed once into a library object
(``ModelSource``, ``BackendOptions``): what ``sample``, ``serve``, ``cluster``, ``export``, ``engines`` and
``bench`` share."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from ccld_trt.engines.flavor import CHOICES as FLAVOR_CHOICES
from ccld_trt.export.errors import UserError

if TYPE_CHECKING:
    from ccld_trt.export.models import ModelFiles
    from ccld_trt.runner import BackendOptions, ModelSource


def weighted(value: str, what: str) -> tuple[str, float]:
    from ccld_trt.request import parse_prompt

    text, weight = parse_prompt(value)
    if not text:
        raise UserError(f"empty {what} in {value!r}")
    return text, weight


def scale(value: str) -> float | str:
    if value == "checkpoint":
        return value
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'checkpoint', got {value!r}") from None


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("models (default: the models directory)")
    g.add_argument("--models", help="models directory (default $CCLD_TRT_MODELS or ./models)")
    g.add_argument("--unet", help="U-Net checkpoint (model_student.ckpt)")
    g.add_argument("--autoencoder", help="autoencoder checkpoint (ae_model.ckpt)")
    g.add_argument("--autoencoder-config", help="autoencoder YAML (default: the checkpoint's name with .yaml)")
    g.add_argument("--cloob", help="CLOOB pickle")
    g.add_argument("--cloob-config", help="CLOOB config JSON path or built-in name")
    g.add_argument("--base-channels", type=int, help="U-Net width (default: read from the checkpoint)")
    g.add_argument("--channel-multipliers", type=lambda s: [int(v) for v in s.split(",")],
                   help="U-Net multipliers, e.g. 1,1,2,2 (default: read from the checkpoint)")


def model_files(args: argparse.Namespace) -> ModelFiles:
    from ccld_trt.export.models import ModelFiles, models_dir

    return ModelFiles.resolve(models_dir(args.models), args.unet, args.autoencoder, args.autoencoder_config,
                              args.cloob, args.cloob_config)


def model_source(args: argparse.Namespace) -> ModelSource:
    from ccld_trt.runner import ModelSource

    multipliers = tuple(args.channel_multipliers) if args.channel_multipliers else None
    return ModelSource(model_files(args), args.base_channels, multipliers)


def add_backend_args(p: argparse.ArgumentParser, *, variants: bool = False) -> None:
    """The flags that say how the networks run (read back by ``backend_options``), shared by every command that
    runs them. ``variants``: the command picks the backends and precisions itself (bench): only --device."""
    from ccld_trt.backend_select import ALL_PRECISIONS, BACKENDS
    from ccld_trt.export.build_dir import DEFAULT_ENGINE_DIR

    g = p.add_argument_group("backend")
    g.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    if variants:
        return
    g.add_argument("--backend", default="torch", choices=BACKENDS, help="inference backend (default torch)")
    g.add_argument("--precision", choices=ALL_PRECISIONS,
                   help="torch: U-Net autocast (default fp32 on cpu, fp16 on cuda, as the original); "
                        "onnxruntime: fp32 or fp16 graphs (default fp32 on cpu, fp16 on cuda); openvino: fp32, "
                        "bf16 or int8 (default bf16 where the CPU has bf16 instructions, else fp32); "
                        "tensorrt: fp32 or fp16 engines (default fp16)")
    g.add_argument("--cuda-graph", action="store_true",
                   help="replay each U-Net evaluation from a CUDA graph (torch and tensorrt on CUDA)")
    g.add_argument("--compile", dest="compiled", action="store_true",
                   help="torch backend: torch.compile (Inductor) the networks, once per input shape (the first "
                        "call of each takes seconds to minutes; cached on disk between runs)")
    g.add_argument("--engines", default=str(DEFAULT_ENGINE_DIR),
                   help=f"TensorRT engine directory (default {DEFAULT_ENGINE_DIR})")
    g.add_argument("--trt-flavor", default="auto", choices=FLAVOR_CHOICES,
                   help="tensorrt backend: which TensorRT runs the engines (default auto: the one they were built "
                        "with)")
    g.add_argument("--onnx-dir", metavar="DIR",
                   help="onnxruntime and openvino backends: where the exported graphs are kept, exported there "
                        "unless up to date (default build/onnx/<hash of the model paths>)")


def backend_options(args: argparse.Namespace) -> BackendOptions:
    """The flags of ``add_backend_args`` as BackendOptions (those a command lacks keep their defaults)."""
    from ccld_trt.runner import BackendOptions

    given = vars(args)
    defaults = BackendOptions()
    onnx_dir = given.get("onnx_dir")
    return BackendOptions(backend=given.get("backend", defaults.backend), device=args.device,
                          precision=given.get("precision", defaults.precision),
                          cuda_graph=given.get("cuda_graph", defaults.cuda_graph),
                          engine_dir=Path(given.get("engines", defaults.engine_dir)),
                          onnx_dir=Path(onnx_dir) if onnx_dir else None,
                          trt_flavor=given.get("trt_flavor", defaults.trt_flavor),
                          compiled=given.get("compiled", defaults.compiled))


def triple(value: str) -> tuple[int, int, int]:
    """'1,2,4' -> (1, 2, 4); a single 'N' -> (N, N, N)."""
    try:
        parts = [int(v) for v in value.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN,OPT,MAX or N, got {value!r}") from None
    if len(parts) == 1:
        parts *= 3
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"expected MIN,OPT,MAX or N, got {value!r}")
    return parts[0], parts[1], parts[2]

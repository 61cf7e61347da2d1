"""Which backends exist, what precisions each runs, and which can run on which device: checked before anything
is loaded, with one-line UserErrors that say what to install or choose instead."""

from __future__ import annotations

from typing import Any

from ccld_trt.cpu_features import default_cpu_precision, precision_problem
from ccld_trt.engines.flavor import GPU_KINDS, installed_flavors, require_tensorrt
from ccld_trt.export.errors import UserError
from ccld_trt.export.graph_specs import GRAPH_PRECISIONS
from ccld_trt.export.quiet_imports import import_onnxruntime, import_openvino

BACKENDS = ("torch", "onnxruntime", "openvino", "tensorrt")
OPENVINO_INSTALL_HINT = "pip install 'ccld-trt[openvino]'"
# What each backend runs: torch autocasts its U-Net to fp16 or bf16; the others run the exported graphs (openvino:
# the fp32 graphs at fp32 or with its bf16 hint, or the int8 graphs of export.quantize).
PRECISIONS: dict[str, tuple[str, ...]] = {"torch": ("fp32", "fp16", "bf16"), "onnxruntime": GRAPH_PRECISIONS,
                                          "openvino": ("fp32", "bf16", "int8"), "tensorrt": GRAPH_PRECISIONS}
# Every precision some backend runs, in the order above
ALL_PRECISIONS = tuple(dict.fromkeys(p for precisions in PRECISIONS.values() for p in precisions))


def default_precision(backend: str, device: str) -> str:
    """What ``backend`` runs on ``device`` when no precision is asked for: tensorrt fp16 engines; openvino bf16
    where the CPU has bf16 instructions, else fp32; torch and onnxruntime fp32 on the CPU and fp16 on CUDA (the
    original autocasts its U-Net to fp16 on GPUs)."""
    if backend == "tensorrt":
        return "fp16"
    if backend == "openvino":
        return default_cpu_precision()
    return "fp16" if device.startswith("cuda") else "fp32"


def check_precision(backend: str, precision: str) -> str:
    """``precision`` if ``backend`` runs it, else UserError."""
    if precision not in PRECISIONS[backend]:
        raise UserError(f"the {backend} backend runs {' or '.join(PRECISIONS[backend])}, not {precision!r}")
    return precision


def check_cpu_precision(backend: str, precision: str, device: str = "cpu") -> str:
    """``precision``, unless ``device`` is the CPU and it lacks the instructions ``precision`` needs (see
    cpu_features: bf16 dot products for bf16, VNNI for int8): then UserError in one line. Emulated, such a
    precision is no faster than fp32 but many times slower (torch's bf16 U-Net on an AVX2-only CPU), or quietly
    fp32 (OpenVINO's bf16 hint), so an explicit choice is refused rather than run."""
    if device.strip().lower().split(":")[0] == "cpu":
        problem = precision_problem(f"{backend} {precision}", precision, instead=("fp32", "bf16"))
        if problem:
            raise UserError(problem)
    return precision


def require_openvino() -> Any:
    """The openvino module, or UserError saying how to install it."""
    try:
        return import_openvino()
    except ImportError as e:
        raise UserError(f"the openvino backend needs OpenVINO: {OPENVINO_INSTALL_HINT}") from e


def cuda_unavailable_reason() -> str:
    """Why torch sees no CUDA GPU, in words (meant for when torch.cuda.is_available() is False)."""
    import torch

    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    return f"torch {torch.__version__} (CUDA {torch.version.cuda}) finds no NVIDIA GPU or driver"


def resolve_backend(name: str, device: str) -> tuple[str, str]:
    """(backend, device) normalised ("TensorRT", "CUDA:0" -> "tensorrt", "cuda:0") once the combination can run
    here; UserError otherwise. Devices: cpu, cuda, cuda:N."""
    backend = name.strip().lower()
    if backend not in BACKENDS:
        raise UserError(f"unknown backend {name!r}: choose one of {', '.join(BACKENDS)}")
    # "cpu" is answered without importing torch: `sample` opens the graph files while torch imports
    dev = None if device.strip().lower() == "cpu" else _torch_device(device)
    dev_type = "cpu" if dev is None else dev.type
    if backend == "openvino":
        if dev_type != "cpu":
            raise UserError("the openvino backend runs on the CPU only: use the cpu device")
        require_openvino()  # the one line that says what to install
    if backend == "tensorrt" and dev_type != "cuda":
        raise UserError("the tensorrt backend runs on NVIDIA GPUs only: use a cuda device, or the onnxruntime "
                        "or torch backend on the CPU")
    if dev_type == "cuda":
        _check_cuda(backend, dev)
    if backend == "tensorrt" and not installed_flavors():
        require_tensorrt()  # the one line that says what to install
    return backend, "cpu" if dev is None else str(dev)


def _torch_device(device: str) -> Any:
    """``device`` as a torch.device of type cpu or cuda; UserError otherwise."""
    import torch  # here, not at the top: the CLI's parser reads this module's names without waiting for torch

    bad_device = UserError(f"unknown device {device!r}: use cpu, cuda or cuda:N")
    try:
        dev = torch.device(device.strip().lower())
    except RuntimeError as e:
        raise bad_device from e
    if dev.type not in ("cpu", "cuda"):
        raise bad_device
    return dev


def _check_cuda(backend: str, dev: Any) -> None:
    """UserError unless torch can use the CUDA device ``dev`` and ``backend`` has what it needs to run there."""
    import torch

    if not torch.cuda.is_available():
        if backend == "tensorrt":
            raise UserError(f"the tensorrt backend needs an NVIDIA GPU ({GPU_KINDS}), and "
                            f"{cuda_unavailable_reason()}")
        raise UserError(f"device {dev} is not usable: {cuda_unavailable_reason()}")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UserError(f"device {dev} does not exist: torch sees {torch.cuda.device_count()} CUDA device(s)")
    if backend == "onnxruntime":
        ort = import_onnxruntime()

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise UserError(f"onnxruntime {ort.__version__} has no CUDA provider (it offers "
                            f"{', '.join(ort.get_available_providers())}): pip install 'ccld-trt[gpu]' "
                            "for onnxruntime-gpu, or use the cpu device")

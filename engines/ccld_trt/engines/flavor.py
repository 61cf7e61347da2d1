"""The two TensorRT flavours, chosen in one place.

``tensorrt`` (PyPI ``tensorrt``): engines are built on, and for, the GPU that runs them; datacenter GPUs
(Hopper and later) need it. ``tensorrt-rtx`` (PyPI ``tensorrt-rtx``, module ``tensorrt_rtx``): engines are built
ahead of time on any machine, even one without a GPU, for a list of compute capabilities, and specialised just in
time on the RTX GPU that runs them. Both are imported lazily: importing this module needs neither.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
from collections.abc import Iterable
from typing import TYPE_CHECKING, Literal, cast

from ccld_trt.export.errors import UserError, first_line

if TYPE_CHECKING:
    import tensorrt as trt
    import tensorrt_rtx as trtx

Flavor = Literal["tensorrt", "tensorrt-rtx"]
FLAVORS: tuple[Flavor, ...] = ("tensorrt", "tensorrt-rtx")
CHOICES = ("auto", "tensorrt", "rtx")  # what --trt-flavor accepts
MODULES: dict[Flavor, str] = {"tensorrt": "tensorrt", "tensorrt-rtx": "tensorrt_rtx"}
INSTALL_HINTS: dict[Flavor, str] = {
    "tensorrt": "pip install 'ccld-trt[tensorrt]' (needs an NVIDIA GPU and driver)",
    "tensorrt-rtx": "pip install 'ccld-trt[tensorrt-rtx]' (builds without a GPU; engines run on RTX GPUs)",
}
# Where TensorRT-RTX engines run, per NVIDIA's TensorRT-RTX support matrix: RTX GPUs of Turing (7.5), Ampere
# (8.6), Ada (8.9) and Blackwell (12.0; 12.1: GB10). Datacenter GPUs (A100 8.0, H100/H200 9.0) are regular TensorRT's.
RTX_GPUS = ("7.5", "8.6", "8.9", "12.0", "12.1")
# TensorRT-RTX's own portable default set. Turing (7.5) and 12.1 only when named: NVIDIA advises a Turing engine
# of its own, since a portable engine that includes Turing runs slower elsewhere.
RTX_DEFAULT_TARGETS = ("8.6", "8.9", "12.0")
RTX_WHERE = ("TensorRT-RTX engines run on RTX GPUs of compute capability 7.5, 8.6, 8.9, 12.0 and 12.1; "
             "datacenter GPUs (A100, H100, H200) need regular TensorRT (--trt-flavor tensorrt, built on that GPU)")
# Which GPUs run which engines, for the line that says a GPU is needed.
GPU_KINDS = (f"{RTX_WHERE}, of the compute capabilities they were built for; TensorRT engines: the GPU model "
             "they were built on")


def flavor_label(flavor: str) -> str:
    """"tensorrt-rtx" -> "TensorRT-RTX"; an unknown name as it is (read from a sidecar)."""
    return {"tensorrt": "TensorRT", "tensorrt-rtx": "TensorRT-RTX"}.get(flavor, flavor)


def parse_flavor(choice: str) -> Flavor | Literal["auto"]:
    """``auto``, ``tensorrt``, ``rtx`` (or ``tensorrt-rtx``) -> the flavour name; UserError otherwise."""
    name = choice.strip().lower().replace("_", "-")
    if name in ("rtx", "tensorrt-rtx"):
        return "tensorrt-rtx"
    if name in ("auto", "tensorrt"):
        return cast("Flavor | Literal['auto']", name)
    raise UserError(f"unknown TensorRT flavour {choice!r}: choose one of {', '.join(CHOICES)}")


def require_flavor(flavor: Flavor) -> str:
    """The installed version of ``flavor`` ("10.13.0.35", "1.7.1.116"); one-line UserError if it cannot be
    imported (or only its type stubs are there)."""
    label = flavor_label(flavor)
    try:
        module = importlib.import_module(MODULES[flavor])
    except (ImportError, OSError) as e:  # OSError: the package is there but its shared library is not
        raise UserError(f"{label} is not installed: import {MODULES[flavor]} failed ({first_line(e)}); "
                        f"{INSTALL_HINTS[flavor]}") from e
    version = getattr(module, "__version__", None)
    # type stubs alone make the import succeed, as an empty namespace package
    if not isinstance(version, str) or not hasattr(module, "Builder"):
        raise UserError(f"{label} is not installed: only its type stubs are; {INSTALL_HINTS[flavor]}")
    return version


def require_tensorrt() -> str:
    """require_flavor("tensorrt")."""
    return require_flavor("tensorrt")


def installed_flavors() -> dict[Flavor, str]:
    """{flavour: version} of those that import."""
    found = {}
    for flavor in FLAVORS:
        with contextlib.suppress(UserError):
            found[flavor] = require_flavor(flavor)
    return found


def resolve_flavor(choice: str, gpu_capability: str | None) -> Flavor:
    """The flavour to build or run with. ``auto``: with a GPU (``gpu_capability`` "8.9"), regular TensorRT if
    installed (engines tuned on that GPU), else TensorRT-RTX if it can run there; without one, TensorRT-RTX, the
    flavour that builds without a GPU. A named flavour must be installed. UserError naming what to install."""
    flavor = parse_flavor(choice)
    if flavor != "auto":
        require_flavor(flavor)
        return flavor
    found = installed_flavors()
    if gpu_capability is not None and "tensorrt" in found:
        return "tensorrt"
    if "tensorrt-rtx" in found and (gpu_capability is None or gpu_capability in rtx_gpus()):
        return "tensorrt-rtx"
    if gpu_capability is None:
        if "tensorrt" in found:
            raise UserError("regular TensorRT builds engines only on the GPU that runs them, and there is none "
                            f"here: {INSTALL_HINTS['tensorrt-rtx']} to build ahead of time")
        raise UserError(f"no TensorRT is installed: {INSTALL_HINTS['tensorrt-rtx']}, or on the GPU machine "
                        f"{INSTALL_HINTS['tensorrt']}")
    if "tensorrt-rtx" in found:
        raise UserError(f"TensorRT-RTX does not run on this GPU (compute {gpu_capability}; it runs on "
                        f"{', '.join(rtx_gpus())}): {INSTALL_HINTS['tensorrt']}")
    raise UserError(f"no TensorRT is installed: {INSTALL_HINTS['tensorrt']}")


@functools.cache
def rtx_capabilities() -> tuple[str, ...]:
    """The compute capabilities the installed TensorRT-RTX can build for ("7.5", "8.0", ..., "12.1")."""
    import tensorrt_rtx as trtx

    names = [n for n in trtx.ComputeCapability.__members__ if n.startswith("SM")]
    return tuple(f"{n[2:-1]}.{n[-1]}" for n in names)


def rtx_gpus() -> tuple[str, ...]:
    """The compute capabilities whose GPUs run engines of the installed TensorRT-RTX: RTX_GPUS that it can
    build for."""
    return tuple(c for c in RTX_GPUS if c in rtx_capabilities())


def check_rtx_targets(capabilities: Iterable[str]) -> None:
    """UserError for a build target that is no RTX GPU (8.0: A100; 9.0: H100, H200)."""
    other = [c for c in capabilities if c not in RTX_GPUS]
    if other:
        raise UserError(f"compute capability {', '.join(other)} is not an RTX GPU: {RTX_WHERE}")


def parse_capabilities(values: str | Iterable[str]) -> tuple[str, ...]:
    """"8.0,8.6" or ["8.0", "8.6"] -> ("8.0", "8.6"): sorted, without repeats, each "major.minor";
    UserError otherwise."""
    items = values.split(",") if isinstance(values, str) else list(values)
    caps = set()
    for item in items:
        major, dot, minor = item.strip().partition(".")
        if not (dot and major.isdigit() and minor.isdigit()):
            raise UserError(f"compute capability must be MAJOR.MINOR (e.g. 8.6), got {item.strip()!r}")
        caps.add((int(major), int(minor)))
    if not caps:
        raise UserError("no compute capability given")
    return tuple(f"{a}.{b}" for a, b in sorted(caps))


def rtx_compute_capability(capability: str) -> trtx.ComputeCapability:
    """"8.6" -> tensorrt_rtx.ComputeCapability.SM86; UserError for one this TensorRT-RTX cannot target."""
    import tensorrt_rtx as trtx

    value = trtx.ComputeCapability.__members__.get("SM" + capability.replace(".", ""))
    if value is None:
        raise UserError(f"TensorRT-RTX {trtx.__version__} cannot build for compute capability {capability}; "
                        f"it builds for {', '.join(rtx_capabilities())}")
    return cast("trtx.ComputeCapability", value)


@functools.cache
def trt_logger() -> trt.ILogger:
    """One regular-TensorRT logger for every runtime (TensorRT wants one per process), warnings and errors."""
    import tensorrt as trt

    return trt.Logger(trt.Logger.WARNING)


@functools.cache
def rtx_logger() -> trtx.ILogger:
    """The TensorRT-RTX counterpart of trt_logger."""
    import tensorrt_rtx as trtx

    return trtx.Logger(trtx.Logger.WARNING)

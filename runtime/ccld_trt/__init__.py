"""ccld_trt: CLOOB-conditioned latent diffusion on torch, ONNX Runtime, OpenVINO and TensorRT.

``from ccld_trt import Pipeline`` is the Python API (see ``ccld_trt.api``). The package's code lives in four
source roots (export, engines, runtime, benchmarks): ``extend_path`` keeps the other roots' subpackages
importable when they are separate directories on sys.path (a source checkout), and nothing heavy is imported
until ``Pipeline`` is first used, so ``import ccld_trt.export...`` stays cheap.
"""

from __future__ import annotations

from pkgutil import extend_path
from typing import TYPE_CHECKING, Any

__path__ = extend_path(__path__, __name__)

if TYPE_CHECKING:
    from ccld_trt.api import Pipeline, Result

__all__ = ["Pipeline", "Result"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from ccld_trt import api

        return getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

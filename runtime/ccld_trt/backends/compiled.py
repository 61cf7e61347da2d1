"""torch.compile (Inductor) of the torch backend's network calls: ``ccld-trt sample --backend torch --compile``.

Each call (the guided U-Net, the per-row U-Net, the decoder, the encoders) is compiled with static shapes, once
per input shape/dtype set the first time that set is seen, up to ``MAX_SHAPES`` sets per call; later new shapes
run eager, so an unusual request never starts a recompile storm. A sampling request uses one shape per call
(its batch and its number of conditions), so a serving process compiles a handful. Compilations and the seconds
spent in them are counted per call and logged. Inductor keeps what it compiled in its on-disk caches
(``inductor_cache_dir()``: $TORCHINDUCTOR_CACHE_DIR, else <tmp>/torchinductor_<user>), so a second process
with the same networks and shapes loads the kernels instead of generating them again (seconds instead of a
minute on a small CPU).

Inductor needs a C++ compiler for CPU code and Triton (with a GPU of compute capability >= 7.0) for CUDA code;
``compile_problem`` says what is missing before anything loads.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Collection, Sequence
from typing import Any

import torch

from ccld_trt.export.errors import UserError, first_line

logger = logging.getLogger(__name__)

MAX_SHAPES = 8  # compiled input-shape sets per call; beyond it a new shape runs eager (no recompile storm)
# Dynamo allows 8 compiled versions of one function's code before it silently falls back to eager; several
# backends in one process (bench, the GPU check) share the same code objects, so that limit is raised to this.
_RECOMPILE_LIMIT = 64

Key = tuple[tuple[tuple[int, ...], torch.dtype], ...]

# Inductor's options per device type. channels_last: on the CPU Inductor always lays convolutions out
# channels-last for oneDNN; on CUDA it decides by heuristics, forced here because small convnets gain from it
# (the weights of the modules are not converted, so eager calls that share them are unchanged). Not yet measured
# on a GPU: gpu_check.sh's compiled step is where to see whether it helps.
INDUCTOR_OPTIONS: dict[str, dict[str, Any]] = {"cpu": {}, "cuda": {"force_layout_optimization": True}}


def compile_problem(device: str) -> str | None:
    """Why torch.compile cannot run on ``device`` ("cpu", "cuda", "cuda:N") here, in one line; None if it can."""
    if torch.device(device).type == "cuda":
        from torch.utils._triton import has_triton, has_triton_package

        if not has_triton_package():
            return (f"--compile on CUDA needs Triton, and torch {torch.__version__} here has none: install the "
                    "triton package that matches this torch, or run without --compile")
        if not has_triton():
            return "--compile on CUDA needs Triton and a GPU of compute capability 7.0 or newer: run without --compile"
        return None
    from torch._inductor.cpp_builder import get_cpp_compiler

    try:
        get_cpp_compiler()
    except Exception:  # InvalidCxxCompiler, or the search itself failing: either way there is no compiler
        return ("--compile on the CPU needs a C++ compiler (g++, or the one $CXX names) and none was found: "
                "install one or run without --compile")
    return None


def compile_toolchain(device: str) -> str:
    """What Inductor generates code with on ``device`` (meant for when ``compile_problem`` is None)."""
    if torch.device(device).type == "cuda":
        import triton

        return f"Inductor with Triton {triton.__version__}"
    from torch._inductor.cpp_builder import get_cpp_compiler

    return f"Inductor with the C++ compiler {get_cpp_compiler()}"


def require_compile(device: str) -> None:
    """UserError (one line) when torch.compile cannot run on ``device`` here."""
    problem = compile_problem(device)
    if problem is not None:
        raise UserError(problem)


def inductor_cache_dir() -> str:
    """Where Inductor keeps its compiled kernels and graphs between processes."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return cache_dir()


def shape_key(inputs: Sequence[torch.Tensor]) -> Key:
    return tuple((tuple(t.shape), t.dtype) for t in inputs)


def _say(message: str) -> None:
    # Printed as well as logged: a first compile is a silent minute on a small CPU otherwise.
    logger.info(message)
    print(message, file=sys.stderr, flush=True)


class CompiledCall:
    """``fn(*tensors) -> tensor`` through torch.compile(dynamic=False), for at most ``max_shapes`` input
    shape/dtype sets (the first ones seen); other sets call ``fn`` eager. Owns the compiled function and its
    counts: ``compilations`` (graphs Inductor compiled: one per shape set unless the code splits into several
    graphs) and ``compile_seconds`` (wall time of the first calls of each set, which include compiling)."""

    def __init__(self, name: str, fn: Callable[..., torch.Tensor], max_shapes: int = MAX_SHAPES,
                 options: dict[str, Any] | None = None) -> None:
        self.name = name
        self.options = options or {}
        self.fn = fn
        self.max_shapes = max_shapes
        self.shapes: list[Key] = []
        self.compilations = 0
        self.compile_seconds = 0.0
        self.eager_calls = 0  # calls at a shape beyond the cap
        self._compiled = torch.compile(fn, backend=self._inductor, dynamic=False)

    def _inductor(self, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        """torch.compile's backend: Inductor, counted."""
        from torch._inductor.compile_fx import compile_fx

        self.compilations += 1
        return compile_fx(gm, example_inputs, config_patches=self.options)

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        key = shape_key(inputs)
        if key in self.shapes:
            return self._compiled(*inputs)
        if len(self.shapes) >= self.max_shapes:
            self.eager_calls += 1
            return self.fn(*inputs)
        shapes = ", ".join("x".join(map(str, shape)) for shape, _ in key)
        _say(f"torch.compile: compiling the {self.name} for [{shapes}] (first call of this shape)")
        before, start = self.compilations, time.perf_counter()
        try:
            out = self._compiled(*inputs)
        except (torch._dynamo.exc.BackendCompilerFailed, torch._inductor.exc.InductorError) as e:
            raise UserError(f"torch.compile of the {self.name} failed: {first_line(e)}") from e
        seconds = time.perf_counter() - start
        self.shapes.append(key)
        self.compile_seconds += seconds
        made = self.compilations - before
        _say(f"torch.compile: {self.name} [{shapes}] ready in {seconds:.1f} s ({made} graph(s); shape "
             f"{len(self.shapes)} of at most {self.max_shapes}; cache {inductor_cache_dir()})")
        return out


class CompiledSet:
    """The compiled calls of one backend, by name, and their totals."""

    def __init__(self, device: str, max_shapes: int = MAX_SHAPES) -> None:
        require_compile(device)
        self.options = INDUCTOR_OPTIONS[torch.device(device).type]
        limit = torch._dynamo.config.recompile_limit
        torch._dynamo.config.recompile_limit = max(limit, _RECOMPILE_LIMIT)
        self.max_shapes = max_shapes
        self.calls: dict[str, CompiledCall] = {}

    def wrap(self, name: str, fn: Callable[..., torch.Tensor]) -> CompiledCall:
        call = self.calls[name] = CompiledCall(name, fn, self.max_shapes, self.options)
        return call

    @property
    def compilations(self) -> int:
        return sum(c.compilations for c in self.calls.values())

    @property
    def compile_seconds(self) -> float:
        return sum(c.compile_seconds for c in self.calls.values())

    def summary(self) -> str:
        """e.g. "2 compilations in 71.3 s (unet_cfg 1, decoder 1)"."""
        per_call = ", ".join(f"{n} {c.compilations}" for n, c in self.calls.items() if c.shapes)
        return f"{self.compilations} compilations in {self.compile_seconds:.1f} s ({per_call or 'none yet'})"


# The torch backend's attributes that are compiled as they are (modules called with one tensor), and their names
# in the log; the U-Net calls are its autocast functions, so autocast is traced into the compiled graph.
_MODULE_CALLS = {"_decoder": "decoder", "_encoder": "encoder", "_text": "text_encoder", "_image": "image_encoder"}


def compile_calls(backend: Any, device: str, only: Collection[str] | None = None) -> CompiledSet:
    """Replace the network calls of ``backend`` (a TorchBackend, before any CUDA-graph wrapping) by compiled
    ones: ``_guided_call`` (unet_cfg), ``_rows_call`` (unet_rows) and the modules of ``_MODULE_CALLS`` it has;
    ``only``: just the calls of these names (tests: the U-Net alone compiles in a minute on a small CPU).
    UserError when torch.compile cannot run on ``device`` here."""
    compiled = CompiledSet(device)
    calls = {"_guided_call": "unet_cfg", "_rows_call": "unet_rows", **_MODULE_CALLS}
    for attribute, name in calls.items():
        if hasattr(backend, attribute) and (only is None or name in only):
            setattr(backend, attribute, compiled.wrap(name, getattr(backend, attribute)))
    return compiled

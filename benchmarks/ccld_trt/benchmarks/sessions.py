"""Where a benchmark's weights come from and how it opens a variant: the models directory (or cached demo
weights), and ``runner.open_session`` with a one-line reason when a variant cannot run here."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from typing import Any

from ccld_trt.benchmarks.backend_names import CUDA_GRAPH_BACKEND
from ccld_trt.benchmarks.plan import BenchConfig, Variant
from ccld_trt.export.errors import UserError
from ccld_trt.export.graph_specs import BACKEND_GRAPHS
from ccld_trt.export.models import ModelFiles, models_dir, named_models_dir
from ccld_trt.runner import BackendOptions, ModelSource, Session, open_session

# (variant, device, model files) -> an open session; UserError (or any exception) = skipped with the reason.
# Worker processes are spawned and import it by name, so an opener must be a module-level function.
Opener = Callable[[Variant, str, ModelFiles], Session]


def bench_model_files(config: BenchConfig, log: Callable[[str], None]) -> tuple[ModelFiles, dict[str, Any]]:
    """The models directory's files when complete, else demo weights of ``config.demo_size`` in the cache
    (written once). Returns the files and a description of them for the report. A directory named by the caller
    or $CCLD_TRT_MODELS that does not exist is a UserError (a typo must not bench random weights for minutes);
    only the default ./models may be absent."""
    directory = models_dir(config.models)
    if named_models_dir(config.models) is not None and not directory.is_dir():
        raise UserError(f"models directory {directory} does not exist (leave out --models and $CCLD_TRT_MODELS "
                        "to bench random demo weights)")
    files = ModelFiles.resolve(directory)
    try:
        files.check_present()
        return files, {"dir": str(directory), "demo": files.is_demo(), "size": None}
    except UserError:
        pass
    from ccld_trt.export.demo_weights import write_demo_weights
    from ccld_trt.export.models import DEMO_MARKER

    cache = config.weights_cache / f"{config.demo_size}-seed0"
    if not (cache / DEMO_MARKER).exists():
        log(f"{directory} lacks model weights: writing {config.demo_size} RANDOM demo weights to {cache} (once)")
        # written under a temporary name and renamed, so an interrupted write never looks complete
        partial = cache.with_name(f"{cache.name}.partial-{os.getpid()}")
        shutil.rmtree(partial, ignore_errors=True)
        write_demo_weights(partial, config.demo_size, seed=0)
        shutil.rmtree(cache, ignore_errors=True)
        partial.rename(cache)
    return ModelFiles.resolve(cache), {"dir": str(cache), "demo": True, "size": config.demo_size}


def variant_options(variant: Variant, device: str) -> BackendOptions:
    """How the runtime opens ``variant`` on ``device`` (torch-cudagraph is torch with CUDA-graph replay)."""
    cuda_graph = variant.backend == CUDA_GRAPH_BACKEND
    return BackendOptions("torch" if cuda_graph else variant.backend, device, variant.precision, cuda_graph)


def open_variant(variant: Variant, device: str, files: ModelFiles) -> Session:
    """``runner.open_session`` for the variant, every graph exported (the bench times the image encoder too, and
    an export must not land in a timed call); UserError with a one-line reason when it cannot run here (said
    before anything loads)."""
    session = open_session(variant_options(variant, device), ModelSource(files), graphs=BACKEND_GRAPHS)
    opened = getattr(session.backend, "precision", variant.precision)
    if opened != variant.precision:
        raise UserError(f"opened at precision {opened}, not {variant.precision}")
    return session


def failure_reason(error: BaseException) -> str:
    """One line for the report: a UserError's message, else the exception's type and first line."""
    text = str(error).splitlines()[0] if str(error) else ""
    return text if isinstance(error, UserError) else f"{type(error).__name__}: {text}"

"""onnxslim's simplification (constant folding, dead code, fusions) without its cost in weights: onnxslim infers
shapes after each of its passes until the graph stops changing, and its shape inference serialises the whole
model, weights and all, several times over (7.5 of the full-size U-Net's 15.5 s of simplification on a 2-core AMD
EPYC). Shape inference reads only the dims of a large initializer, so here its contents are set aside while it
runs; the graph that comes out is the one onnxslim makes with them (a test checks every exported graph)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from types import ModuleType

import onnx

from ccld_trt.export.fp16 import large_contents_aside, put_contents_back


def slim(model: onnx.ModelProto) -> onnx.ModelProto:
    """``onnxslim.slim(model)``, its shape inference run on the graph without the large initializers' contents."""
    import onnxslim
    import onnxslim.core

    with _shape_inference_without_contents(onnxslim.core):
        return onnxslim.slim(model)


@contextlib.contextmanager
def _shape_inference_without_contents(core: ModuleType) -> Iterator[None]:
    """Swap ``core.shape_infer`` (which ``onnxslim.slim`` looks up on each call) for itself run on the model with
    its large initializers' contents set aside, which are put back into the model it returns."""
    infer = core.shape_infer

    def without_contents(model: onnx.ModelProto) -> onnx.ModelProto:
        with large_contents_aside(model) as contents:
            inferred = infer(model)
        put_contents_back(inferred, contents)
        return inferred

    setattr(core, "shape_infer", without_contents)  # noqa: B010  (mypy: the module's attributes are not typed)
    try:
        yield
    finally:
        setattr(core, "shape_infer", infer)  # noqa: B010

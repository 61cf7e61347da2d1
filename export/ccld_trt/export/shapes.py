"""Shape binding for the graphs of graph_specs: the symbolic dimensions read from concrete input shapes, and the
output shapes they imply (``8*height``). Shared by the ONNX Runtime backend and the TensorRT engines."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from ccld_trt.export.graph_specs import Dim, GraphSpec


def bind_dims(spec: GraphSpec, input_shapes: Mapping[str, Sequence[int]]) -> dict[str, int]:
    """Symbolic dimension -> size, read from concrete input shapes; ValueError if they break the spec."""
    expected = sorted(t.name for t in spec.inputs)
    if sorted(input_shapes) != expected:
        raise ValueError(f"{spec.name} takes inputs {expected}, got {sorted(input_shapes)}")
    env: dict[str, int] = {}
    for t in spec.inputs:
        shape = tuple(int(s) for s in input_shapes[t.name])
        if len(shape) != len(t.shape):
            raise ValueError(f"{spec.name} input {t.name} has shape {list(shape)}, expected {list(t.shape)}")
        for dim, size in zip(t.shape, shape, strict=True):
            if isinstance(dim, int):
                if size != dim:
                    raise ValueError(f"{spec.name} input {t.name} has shape {list(shape)}, expected {list(t.shape)}")
                continue
            factor, _, symbol = dim.rpartition("*")  # "8*height": an image side, 8 pixels per latent pixel
            if factor and size % int(factor):
                raise ValueError(f"{spec.name} input {t.name} has shape {list(shape)}: {dim} must be a multiple "
                                 f"of {factor}")
            size //= int(factor) if factor else 1
            if env.setdefault(symbol, size) != size:
                raise ValueError(f"{spec.name}: dimension {symbol} is {env[symbol]} in one input and {size} in "
                                 f"{t.name}")
    return env


def resolve_dim(dim: Dim, env: Mapping[str, int]) -> int:
    """An int, a symbol (``height``) or a multiple of one (``8*height``) -> its size under ``env``."""
    if isinstance(dim, int):
        return dim
    factor, _, symbol = dim.rpartition("*")
    return (int(factor) if factor else 1) * env[symbol]


def output_shapes(spec: GraphSpec, input_shapes: Mapping[str, Sequence[int]]) -> dict[str, tuple[int, ...]]:
    """{output name: shape} for these input shapes; ValueError if they break the spec."""
    env = bind_dims(spec, input_shapes)
    return {t.name: tuple(resolve_dim(d, env) for d in t.shape) for t in spec.outputs}

"""The samplers' arithmetic on a batch of latents, recorded once by running them under torch and replayed on numpy.

A sampler does the same float32 operations whatever the latents' values (and, for ddpm and ddim with eta > 0,
whatever the fresh noise it adds at its steps: inputs of the tape like the latents): its coefficients (the
schedule's cosines, log-SNR steps, UniPC's small linear solves) depend only on the method, the step count, eta and
the batch's rows. ``record`` runs ``samplers.sample`` once on a tiny batch under a torch function mode and writes
down each operation on the latents (and each model call) with its coefficient operands as float32 constants;
``replay`` applies them with numpy's float32 operations, each rounded as torch rounds it, so the latents are the
same bits (tests/test_graph_sample.py compares every method). This lets a job on a graph backend run without
importing torch (``graph_sample``). A tape is data: ``from_json`` accepts only the operations below and node
references that exist.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

# operation -> numpy's float32 ufunc; "model" is a model call (x node, t constant); "noise" is the next of the
# fresh noise draws a sampler adds at its steps (ddpm, ddim with eta > 0), inputs of the replay like the latents
_UFUNCS: dict[str, Callable[..., np.ndarray]] = {"add": np.add, "sub": np.subtract, "mul": np.multiply,
                                                 "div": np.divide, "neg": np.negative}
_ARITY = {"add": 2, "sub": 2, "mul": 2, "div": 2, "neg": 1, "model": 2, "noise": 0}
# torch's names for them (operators and their reflected forms; a reflected one swaps its operands)
_TORCH_OPS = {"__add__": "add", "add": "add", "__radd__": "add", "__sub__": "sub", "sub": "sub", "__rsub__": "-sub",
              "__mul__": "mul", "mul": "mul", "__rmul__": "mul", "__truediv__": "div", "div": "div",
              "__rtruediv__": "-div", "__neg__": "neg", "neg": "neg"}
# calls that make a new tensor of constants (or read a property) from a latent-valued one
_CONSTANT_MAKERS = {"new_ones", "new_zeros", "new_full", "new_empty", "ones_like", "zeros_like", "full_like",
                    "empty_like", "__get__", "size", "dim"}
# calls that hand back the same float32 values
_SAME_VALUES = {"float", "cpu", "contiguous", "clone", "detach", "to"}

Operand = int | np.ndarray  # a node (0: the starting latents; k: the result of op k - 1) or a float32 constant
Model = Callable[[np.ndarray, np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Tape:
    """``ops``: (name, operand...) in order; op k's result is node k + 1. ``result``: the node sampling returns."""

    ops: tuple[tuple[Any, ...], ...]
    result: int

    @property
    def evaluations(self) -> int:
        return sum(op[0] == "model" for op in self.ops)

    @property
    def noise_draws(self) -> int:
        """How many fresh noise draws like the latents the sampler adds (``replay``'s ``noise``)."""
        return sum(op[0] == "noise" for op in self.ops)


def replay(tape: Tape, x: np.ndarray, model: Model, noise: Sequence[np.ndarray] = ()) -> np.ndarray:
    """The sampler's latents from x float32 [rows, 4, h, w] (the rows ``record`` was given), ``model(x, t)`` ->
    v float32 like x for t float32 [rows]; ``noise``: the ``noise_draws`` fresh draws like x, in order (ValueError
    for another number)."""
    if len(noise) != tape.noise_draws:
        raise ValueError(f"the tape adds {tape.noise_draws} noise draws, {len(noise)} given")
    draws = iter(noise)
    # each node is let go after its last use: a long tape holds as few latents at once as the sampler does
    last_use = {o: k for k, (_, *operands) in enumerate(tape.ops) for o in operands if isinstance(o, int)}
    last_use[tape.result] = len(tape.ops)
    nodes: list[np.ndarray | None] = [x]

    def value(operand: Operand) -> np.ndarray:
        if not isinstance(operand, int):
            return operand
        node = nodes[operand]
        assert node is not None  # a tape uses a node after it is made and until its last use
        return node

    for k, (name, *operands) in enumerate(tape.ops):
        args = [value(o) for o in operands]
        nodes.append(next(draws) if name == "noise" else model(*args) if name == "model" else _UFUNCS[name](*args))
        for o in operands:
            if isinstance(o, int) and last_use[o] == k:
                nodes[o] = None
        if last_use.get(k + 1, -1) < k + 1:  # a result nothing uses
            nodes[k + 1] = None
    return value(tape.result)


def record(method: str, steps: int, rows: int, eta: float = 0.0) -> Tape:
    """The tape of ``samplers.sample(..., method, eta)`` over ``method``'s ``steps`` timesteps for a batch of
    ``rows`` images (a sampler that adds fresh noise at its steps takes it as ``noise`` inputs, drawn first).
    ValueError for an operation a tape cannot hold."""
    import torch
    from torch.overrides import TorchFunctionMode

    from ccld_trt.sampler_names import needs_step_noise
    from ccld_trt.samplers import sample
    from ccld_trt.schedule import method_timesteps

    ops: list[tuple[Any, ...]] = []
    nodes: dict[int, int] = {}  # id(tensor) -> node
    alive: list[torch.Tensor] = []  # every tensor seen stays alive, so that no id is reused

    def track(tensor: torch.Tensor, node: int) -> torch.Tensor:
        alive.append(tensor)
        nodes[id(tensor)] = node
        return tensor

    def operand(value: object) -> Operand:
        if isinstance(value, torch.Tensor):
            if id(value) in nodes:
                return nodes[id(value)]
            if value.dtype != torch.float32:
                raise ValueError(f"a {value.dtype} operand: a tape holds float32 constants")
            return value.detach().cpu().numpy().copy()
        if isinstance(value, int | float) and not isinstance(value, bool):
            return np.array(value, dtype=np.float32)  # torch rounds a Python number to the float32 tensor's type
        raise ValueError(f"operand {value!r}: a tape holds tensors and numbers")

    class Recorder(TorchFunctionMode):
        def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            out = func(*args, **(kwargs or {}))
            if not any(isinstance(a, torch.Tensor) and id(a) in nodes for a in args):
                return out  # coefficient arithmetic: its results enter the tape as constants
            name = getattr(func, "__name__", repr(func))
            if name in _CONSTANT_MAKERS or not isinstance(out, torch.Tensor):
                return out
            if name in _SAME_VALUES and out.dtype == torch.float32:
                return track(out, nodes[id(args[0])])
            if name not in _TORCH_OPS or kwargs or len(args) != _ARITY[_TORCH_OPS[name].lstrip("-")]:
                raise ValueError(f"torch.{name} on the latents: a tape cannot hold it")
            op = _TORCH_OPS[name]
            operands = [operand(a) for a in args]
            ops.append((op.lstrip("-"), *(reversed(operands) if op.startswith("-") else operands)))
            return track(out, len(ops))

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ops.append(("model", operand(x), operand(t)))
        return track(torch.zeros_like(x), len(ops))  # any values: the operations do not depend on them

    x = track(torch.zeros([rows, 1, 1, 1]), 0)  # elementwise operations: one value per row is enough
    timesteps = method_timesteps(method, steps)
    noise = []
    for _ in range(len(timesteps) - 1 if needs_step_noise(method, eta) else 0):  # the pipeline's draws, in order
        ops.append(("noise",))
        noise.append(track(torch.zeros([rows, 1, 1, 1]), len(ops)))
    with Recorder():
        out = sample(model, x, timesteps, method, eta, noise)
    return Tape(tuple(ops), nodes[id(out)])


def to_json(tape: Tape) -> dict[str, Any]:
    """The tape as JSON data: constants as their float32 bit patterns (exact), with their shapes."""
    def encode(o: Operand) -> Any:
        return o if isinstance(o, int) else {"shape": list(o.shape), "bits": o.astype(np.float32).view(np.uint32)
                                             .reshape(-1).tolist()}

    return {"ops": [[name, *(encode(o) for o in operands)] for name, *operands in tape.ops], "result": tape.result}


def from_json(data: Any) -> Tape:
    """A tape from ``to_json``'s data (as JSON reads it back); ValueError for anything else (an unknown operation,
    a node not yet made, a constant whose bits do not fill its shape)."""
    if not isinstance(data, dict) or not isinstance(data.get("ops"), list):
        raise ValueError("not a sampler tape")
    ops = []
    for k, entry in enumerate(data["ops"]):
        if not isinstance(entry, list) or not entry or entry[0] not in _ARITY or len(entry) != 1 + _ARITY[entry[0]]:
            raise ValueError(f"op {k}: not an operation of a tape")
        ops.append((entry[0], *(_decode(o, k) for o in entry[1:])))
    result = data.get("result")
    if not isinstance(result, int) or isinstance(result, bool) or not 0 <= result <= len(ops):
        raise ValueError("the tape's result is not one of its nodes")
    return Tape(tuple(ops), result)


def _decode(o: Any, k: int) -> Operand:
    """An operand of op ``k``: a node made before it, or a float32 constant."""
    if isinstance(o, int) and not isinstance(o, bool):
        if not 0 <= o <= k:
            raise ValueError(f"op {k}: node {o} is not made yet")
        return o
    if isinstance(o, dict) and isinstance(o.get("shape"), list) and isinstance(o.get("bits"), list):
        shape = tuple(o["shape"])
        if not all(isinstance(d, int) and d >= 0 for d in shape) or len(o["bits"]) != int(np.prod(shape)):
            raise ValueError(f"op {k}: a constant's bits do not fill its shape")
        return np.array(o["bits"], dtype=np.uint32).view(np.float32).reshape(shape)
    raise ValueError(f"op {k}: an operand is neither a node nor a constant")

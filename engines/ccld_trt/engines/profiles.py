"""Optimisation profiles: the (min, opt, max) input shapes each TensorRT engine is built for, computed from a
few user parameters and the graphs' symbolic dimensions (``export/graph_specs.py``).

Also naming the shapes that fall outside a built profile. (Binding symbolic dimensions to concrete shapes is
``ccld_trt.export.shapes``: the ONNX Runtime backend needs it too.)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ccld_trt.export.errors import UserError
from ccld_trt.export.graph_specs import GRAPHS, Dim
from ccld_trt.export.shapes import resolve_dim

Shape = tuple[int, ...]
ShapeRange = tuple[Shape, Shape, Shape]  # min, opt, max
GraphProfile = dict[str, ShapeRange]  # input name -> shape range
DimRange = tuple[int, int, int]  # min, opt, max of one symbolic dimension

# The student U-Net (channel_multipliers [1, 1, 2, 2]) halves the latent three times.
LATENT_MULTIPLE = 8


@dataclass(frozen=True)
class ProfileParams:
    """What the engines must accept. ``batch``: images per sampler call; ``conds_max``: CFG conditions per call,
    the zero embedding included (so prompts per encoder call <= conds_max - 1); ``height``/``width``: latent
    size (image size / 8); ``image_size``: the CLOOB image encoder's input side."""

    batch: DimRange = (1, 1, 4)
    conds_max: int = 4
    height: DimRange = (32, 32, 32)
    width: DimRange = (32, 32, 32)
    image_size: int = 224

    def validate(self) -> None:
        """UserError naming the first bad value."""
        for what, r in (("batch", self.batch), ("latent height", self.height), ("latent width", self.width)):
            if len(r) != 3 or not all(_is_int(v) for v in r) or not 1 <= r[0] <= r[1] <= r[2]:
                raise UserError(f"{what} range must be three integers 1 <= min <= opt <= max, got {list(r)}")
        if self.batch[0] != 1:  # calls above the maximum are split, and the last part can be any size
            raise UserError(f"batch range must start at 1, got {list(self.batch)}: calls larger than the maximum "
                            "are split, and the last part can be a single image")
        for what, r in (("latent height", self.height), ("latent width", self.width)):
            bad = [v for v in r if v % LATENT_MULTIPLE]
            if bad:
                raise UserError(f"{what} {bad[0]} is not a multiple of {LATENT_MULTIPLE} "
                                f"(images must be a multiple of {8 * LATENT_MULTIPLE} pixels)")
        for what, v in (("number of CFG conditions", self.conds_max), ("CLOOB image size", self.image_size)):
            if not _is_int(v) or v < 1:
                raise UserError(f"{what} must be a positive integer, got {v!r}")


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def dim_ranges(graph: str, params: ProfileParams) -> dict[str, DimRange]:
    """(min, opt, max) of each symbolic dimension of ``graph``'s inputs."""
    conds = (1, min(2, params.conds_max), params.conds_max)  # opt: the zero embedding and one prompt
    prompts = (1, 1, max(1, params.conds_max - 1))
    latent = {"height": params.height, "width": params.width}
    if graph == "unet":  # no CFG fusion: one row per (image, condition)
        rows = (params.batch[0] * conds[0], params.batch[1] * conds[1], params.batch[2] * conds[2])
        return {"batch": rows, **latent}
    if graph == "unet_cfg":
        return {"batch": params.batch, "conds": conds, **latent}
    if graph in ("decoder", "encoder"):  # the encoder's images are 8x the latent size ("8*height")
        return {"batch": params.batch, **latent}
    if graph == "text_encoder":
        return {"batch": prompts}
    if graph == "image_encoder":
        s = params.image_size
        return {"batch": prompts, "image_size": (s, s, s)}
    raise ValueError(f"unknown graph {graph!r}; known: {', '.join(GRAPHS)}")


def graph_profile(graph: str, params: ProfileParams) -> GraphProfile:
    """{input name: (min, opt, max) shape} for one graph, after validating ``params``."""
    params.validate()
    ranges = dim_ranges(graph, params)
    return {t.name: (_shape_at(t.shape, ranges, 0), _shape_at(t.shape, ranges, 1), _shape_at(t.shape, ranges, 2))
            for t in GRAPHS[graph].inputs}


def all_profiles(params: ProfileParams) -> dict[str, GraphProfile]:
    """graph_profile for every graph in graph_specs."""
    return {g: graph_profile(g, params) for g in GRAPHS}


def as_profile(ranges: Mapping[str, Sequence[Sequence[int]]]) -> GraphProfile:
    """{input: (min, opt, max)} from any nesting of sequences (JSON lists), checked: same rank,
    1 <= min <= opt <= max per dimension; UserError otherwise."""
    profile: GraphProfile = {}
    for name, r in ranges.items():
        shapes = tuple(tuple(int(d) for d in s) for s in r)
        if len(shapes) != 3 or len({len(s) for s in shapes}) != 1:
            raise UserError(f"profile of input {name} must be three shapes of one rank (min, opt, max), got {r}")
        lo, opt, hi = shapes
        if not all(1 <= a <= b <= c for a, b, c in zip(lo, opt, hi, strict=True)):
            raise UserError(f"profile of input {name} needs 1 <= min <= opt <= max in every dimension, got {r}")
        profile[name] = (lo, opt, hi)
    return profile


def _shape_at(dims: tuple[Dim, ...], ranges: Mapping[str, DimRange], i: int) -> Shape:
    return tuple(resolve_dim(d, {name: r[i] for name, r in ranges.items()}) for d in dims)


def outside_profile(graph: str, shapes: Mapping[str, Sequence[int]], profile: Mapping[str, ShapeRange]) -> list[str]:
    """One message per input shape that the built profile does not cover (inputs it does not know included)."""
    problems = []
    for name, shape in shapes.items():
        if name not in profile:
            problems.append(f"{graph} input {name} is not in the built profile")
            continue
        lo, _, hi = profile[name]
        shape = tuple(shape)
        if len(shape) != len(lo) or any(not a <= s <= b for s, a, b in zip(shape, lo, hi, strict=True)):
            problems.append(f"{graph} input {name} shape {list(shape)} is outside the built range "
                            f"{format_range(profile[name])}")
    return problems


def format_range(r: ShapeRange) -> str:
    """``[1..4, 4, 32, 32]``: one entry per dimension, ``min..max`` where they differ."""
    lo, _, hi = r
    return "[" + ", ".join(str(a) if a == b else f"{a}..{b}" for a, b in zip(lo, hi, strict=True)) + "]"

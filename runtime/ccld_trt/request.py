"""One sampling job's settings, validated (``Request``), and the prompt strings it is made from: read without
torch, so that a job is checked before any heavy import (``sample`` checks every input before it loads a model)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ccld_trt import limits
from ccld_trt.export.errors import UserError
from ccld_trt.sampler_names import DEFAULT_STRENGTH, METHODS

if TYPE_CHECKING:
    import torch

URL_SCHEMES = ("http://", "https://")
LATENT_CHANNELS = 4  # the autoencoder's latent channels: a job's latents are [n, 4, *latent_size]


def parse_prompt(prompt: str, default_weight: float = 3.0) -> tuple[str, float]:
    """Split ``"text:weight"`` on the last colon; no colon means ``default_weight``.

    As in the original, an http(s) URL's scheme colon is not a separator, and any other colon must be followed
    by a number (``"style: oil"`` is an error, as is a URL with a port but no weight). Unlike the original,
    a NaN or infinite weight is refused too, since it would turn every sample into NaN.
    """
    if prompt.startswith(URL_SCHEMES):
        scheme, rest = prompt.split(":", 1)
        text, sep, weight = rest.rpartition(":")
        text, sep, weight = (scheme + ":" + text, sep, weight) if sep else (scheme + ":" + rest, "", "")
    else:
        text, sep, weight = prompt.rpartition(":")
        if not sep:
            text = prompt
    if not sep:
        return text, float(default_weight)
    try:
        value = float(weight)
    except ValueError:
        raise UserError(f"prompt {prompt!r}: the part after the last ':' ({weight!r}) is not a number; "
                        "write 'text:weight', e.g. 'a red house:3'") from None
    if not math.isfinite(value):
        raise UserError(f"prompt {prompt!r}: weight {weight!r} is not a finite number")
    return text, value



class InvalidRequest(UserError):
    """A Request field with an invalid value. The message names the field as the library does ("steps must be
    >= 1, got 0"); a front end says it in its own words with ``problem`` (the message after the field's name)."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field} {problem}")
        self.field = field
        self.problem = problem


@dataclass(frozen=True)
class Request:
    """One sampling job. Prompts are (text, weight); image prompts (path, weight)."""

    prompts: list[tuple[str, float]]
    image_prompts: list[tuple[Path, float]] = field(default_factory=list)
    n: int = 1
    batch_size: int | None = None  # None: all n images in one batch, as the original
    seed: int = 0
    steps: int = 50
    method: str = "plms"
    eta: float = 0.0
    latent_size: tuple[int, int] = (32, 32)
    init: Path | None = None  # image-to-image: the init image (None: text-to-image, from pure noise)
    strength: float = DEFAULT_STRENGTH  # image-to-image: the starting timestep in (0, 1]; 1 is all noise

    def validate(self) -> None:
        """InvalidRequest naming the first invalid field."""
        if not self.prompts and not self.image_prompts:
            raise InvalidRequest("prompts", "are missing: give a text prompt or an image prompt")
        if self.n < 1:
            raise InvalidRequest("n", f"must be >= 1, got {self.n}")
        if self.batch_size is not None and self.batch_size < 1:
            raise InvalidRequest("batch_size", f"must be >= 1, got {self.batch_size}")
        if self.steps < 1:
            raise InvalidRequest("steps", f"must be >= 1, got {self.steps}")
        if self.method not in METHODS:
            raise InvalidRequest("method", f"{self.method!r} is unknown; choose from {', '.join(METHODS)}")
        if not 0.0 <= self.eta <= 1.0:
            raise InvalidRequest("eta", f"must be in [0, 1], got {self.eta}")
        if not 0 <= self.seed < 2**63:
            raise InvalidRequest("seed", f"must be in [0, 2**63), got {self.seed}")
        self._check_limits()
        if any(s < 1 for s in self.latent_size):
            raise InvalidRequest("latent_size", f"must be positive, got {self.latent_size}")
        if self.init is not None:
            if not 0.0 < self.strength <= 1.0:
                raise InvalidRequest("strength", f"must be in (0, 1], got {self.strength}")
            if not len(self.timesteps()):
                from ccld_trt.schedule import method_timesteps

                smallest = float(method_timesteps(self.method, self.steps).min())
                raise InvalidRequest("strength", f"{self.strength} is below every one of the {self.steps} timesteps "
                                     f"(the last is {smallest:.3f}): raise it or the steps")

    def _check_limits(self) -> None:
        """InvalidRequest past the limits of every front end (``limits``: sizes this machine can hold, weights
        that keep the CFG sum finite), checked before anything that costs time or memory."""
        for name, value, most in (("n", self.n, limits.MAX_IMAGES), ("steps", self.steps, limits.MAX_STEPS)):
            if value > most:
                raise InvalidRequest(name, limits.out_of_range(value, 1, most))
        if problem := limits.prompt_count_problem(len(self.prompts) + len(self.image_prompts)):
            raise InvalidRequest("the number of prompts", problem)
        for i, (text, _) in enumerate(self.prompts):
            if problem := limits.prompt_text_problem(text):
                raise InvalidRequest(f"prompts[{i}]", problem)
        for kind, items in (("prompts", self.prompts), ("image_prompts", self.image_prompts)):
            for i, (_, weight) in enumerate(items):
                if problem := limits.weight_problem(weight):
                    raise InvalidRequest(f"{kind}[{i}].weight", problem)
        if problem := limits.latent_size_problem(self.latent_size):
            raise InvalidRequest("latent_size", problem)
        rows = limits.unet_rows_problem(min(self.batch_size or self.n, self.n),
                                        1 + len(self.prompts) + len(self.image_prompts), self.latent_size)
        if rows:
            raise InvalidRequest("batch_size", rows)

    def timesteps(self) -> torch.Tensor:
        """The sampler's timesteps, float32 [k] on the CPU: the method's ``steps`` timesteps, and with an init
        image only those below ``strength`` (the original's ``--starting-timestep``), so k <= steps."""
        from ccld_trt.schedule import method_timesteps, start_timesteps

        t = method_timesteps(self.method, self.steps)
        return start_timesteps(t, self.strength) if self.init is not None else t

    def batches(self) -> list[slice]:
        """The rows of each batch the n images are sampled in, ``batch_size`` at a time (the last may be smaller)."""
        batch = self.batch_size or self.n
        return [slice(i, min(i + batch, self.n)) for i in range(0, self.n, batch)]

    @property
    def evaluations(self) -> int:
        """U-Net/CFG evaluations over the whole job (one per batch per sampler evaluation)."""
        from ccld_trt.samplers import evaluations

        return len(self.batches()) * evaluations(self.method, len(self.timesteps()))

"""The samplers' names and the request defaults the CLI's parser shows, in a module that imports nothing heavy:
building the parser (and answering ``--help`` or a bad flag) must not wait for torch."""

from __future__ import annotations

# The fast ODE solvers: one evaluation per step (DPM-Solver++ and UniPC with a setting per step count:
# schedule.SOLVER_SETTINGS).
FAST_METHODS = ("iplms", "dpmpp-2m", "dpmpp-3m", "unipc")
METHODS = ("ddpm", "ddim", "prk", "plms", "pie", "plms2", *FAST_METHODS)
# ``--fast``: 7 evaluations. On the mixture-of-Gaussians oracle (docs/solvers.md) unipc/7 gives 37.6-49.9 dB against
# the converged ODE endpoint over nine mixtures (42.3 mean on the five held out from choosing its setting), the best
# k-diffusion/diffusers setting at 7 evaluations 36.3 mean there.
FAST_METHOD = "unipc"
FAST_STEPS = 7
DEFAULT_STRENGTH = 0.9  # image-to-image's starting timestep: the original cfg_sample.py's default

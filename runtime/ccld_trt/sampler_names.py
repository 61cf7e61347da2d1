"""The samplers' names and the request defaults the CLI's parser shows, in a module that imports nothing heavy:
building the parser (and answering ``--help`` or a bad flag) must not wait for torch."""

from __future__ import annotations

from ccld_trt.export.errors import UserError

# The fast ODE solvers: one evaluation per step (DPM-Solver++ and UniPC with a setting per step count:
# schedule.SOLVER_SETTINGS).
FAST_METHODS = ("iplms", "dpmpp-2m", "dpmpp-3m", "unipc")
METHODS = ("ddpm", "ddim", "prk", "plms", "pie", "plms2", *FAST_METHODS)
# ``--fast``: 7 evaluations. On the mixture-of-Gaussians oracle (docs/solvers.md) unipc/7 gives 37.6-49.9 dB against
# the converged ODE endpoint over nine mixtures (42.3 mean on the five held out from choosing its setting), the best
# k-diffusion/diffusers setting at 7 evaluations 36.3 mean there.
FAST_METHOD = "unipc"
FAST_STEPS = 7
# Named (method, steps) presets, each overriding --method and --steps. "balanced": the fewest evaluations at which a
# default setting clears 35 dB latent PSNR against the converged endpoint on both quality views: dpmpp-3m/15 gives
# 48.6 mean / 43.6 min on the oracle's held-out mixtures (docs/solvers.md) and 45.4 on the trained proxy over four
# images (docs/proxy.md), where the fast preset gives 30.1.
PRESETS: dict[str, tuple[str, int]] = {"fast": (FAST_METHOD, FAST_STEPS), "balanced": ("dpmpp-3m", 15)}


def needs_step_noise(method: str, eta: float) -> bool:
    """Whether ``method`` draws fresh noise at each step (so the caller must supply ``noise``)."""
    return method == "ddpm" or (method == "ddim" and eta != 0)


def chosen_preset(fast: bool, preset: object) -> str | None:
    """The preset a request names: ``preset``, or "fast" for ``fast`` (the same request, so both at once must
    agree), or None for neither. UserError in one line otherwise; a front end may say it in its own words."""
    if fast and preset not in (None, "fast"):
        raise UserError(f"fast is the preset 'fast', and preset is {preset!r}: give one of them")
    chosen = "fast" if fast else preset
    if chosen is None:
        return None
    if not isinstance(chosen, str) or chosen not in PRESETS:
        raise UserError(f"preset must be one of {', '.join(PRESETS)}, got {chosen!r}")
    return chosen


DEFAULT_AUTOENCODER_SCALE = 2.55  # what the published demo hard-codes, whatever the checkpoint stores
DEFAULT_STRENGTH = 0.9  # image-to-image's starting timestep: the original cfg_sample.py's default

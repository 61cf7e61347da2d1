"""Public solvers as oracles: k-diffusion 0.1.1's and diffusers' samplers driven through the same closed-form
denoiser as the project's (solver_oracle.mixture_model), so that (a) on the same timesteps the project's
DPM-Solver++(2M) and UniPC must give the same latents (a regression test for the maths) and (b) the project's default
settings can be scored against the best peer setting at each number of evaluations (``bench --solver-oracle``).

Both are dev dependencies. k-diffusion's package ``__init__`` imports torchvision and clean-fid (torchvision would pull
a CUDA torch), so only its ``k_diffusion/sampling.py`` is loaded, by file path, with its one in-package import
(``utils.append_dims``) provided here and its ODE/SDE helpers' imports (torchdiffeq, torchsde: not used by the
deterministic samplers run here) stubbed when missing. Install it with ``pip install --no-deps k-diffusion==0.1.1``.
"""

from __future__ import annotations

import importlib.util
import itertools
import math
import sys
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import torch

from ccld_trt.samplers import ModelFn
from ccld_trt.schedule import log_snr_timesteps, t_to_alpha_sigma

_K_PACKAGE = "_ccld_trt_k_diffusion"  # private name: the real ``k_diffusion`` package is never imported


def _append_dims(x: torch.Tensor, target_dims: int) -> torch.Tensor:
    return x[(...,) + (None,) * (target_dims - x.ndim)]


@cache
def k_sampling() -> types.ModuleType:
    """k-diffusion's ``sampling`` module, loaded by path without its package (ImportError when not installed)."""
    spec = importlib.util.find_spec("k_diffusion")  # finds the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("k-diffusion is not installed: pip install --no-deps k-diffusion==0.1.1")
    path = Path(next(iter(spec.submodule_search_locations))) / "sampling.py"
    package = types.ModuleType(_K_PACKAGE)
    package.__path__ = []
    utils = types.ModuleType(f"{_K_PACKAGE}.utils")
    utils.append_dims = _append_dims  # type: ignore[attr-defined]
    package.utils = utils  # type: ignore[attr-defined]
    stubs = {name: types.ModuleType(name) for name in ("torchdiffeq", "torchsde")
             if importlib.util.find_spec(name) is None}
    stubs["torchdiffeq"].odeint = None  # type: ignore[attr-defined]
    added = {_K_PACKAGE: package, f"{_K_PACKAGE}.utils": utils, **stubs}
    sys.modules.update(added)
    try:
        module_spec = importlib.util.spec_from_file_location(f"{_K_PACKAGE}.sampling", path)
        assert module_spec is not None and module_spec.loader is not None
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    finally:
        for name in added:
            sys.modules.pop(name, None)
    return module


def start_log_snr() -> float:
    """log(alpha^2 / sigma^2) at the project's first timestep: where every project method starts."""
    alpha, sigma = t_to_alpha_sigma(log_snr_timesteps(1, 0.0).double()[0])
    return float(2 * torch.log(alpha / sigma))


def sigma_to_t(sigma: torch.Tensor) -> torch.Tensor:
    """The timestep whose sigma / alpha (k-diffusion's and diffusers' sigma) is ``sigma``, in sigma's dtype."""
    return torch.atan(sigma) / math.pi * 2


def k_denoiser(model: ModelFn) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """k-diffusion's VDenoiser with sigma_data = 1 around the v model: x_ve = x / alpha, sigma = sigma_t / alpha_t;
    returns the x0 prediction alpha x - sigma_t v (same shape as x_ve)."""

    def denoise(x_ve: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        t = sigma_to_t(sigma)
        alpha, sigma_t = (_append_dims(a, x_ve.ndim) for a in t_to_alpha_sigma(t))
        x = x_ve * alpha
        return x * alpha - model(x, t) * sigma_t

    return denoise


# name -> (k-diffusion function, evaluations per step but the last, extra keyword arguments); all deterministic
K_SAMPLERS: dict[str, tuple[str, int, dict[str, Any]]] = {
    "euler": ("sample_euler", 1, {}),
    "heun": ("sample_heun", 2, {}),
    "dpm_2": ("sample_dpm_2", 2, {}),
    "lms": ("sample_lms", 1, {}),
    "dpmpp_2s": ("sample_dpmpp_2s_ancestral", 2, {"eta": 0.0}),
    "dpmpp_2m": ("sample_dpmpp_2m", 1, {}),
    "dpmpp_2m_heun": ("sample_dpmpp_2m_sde", 1, {"eta": 0.0, "solver_type": "heun"}),
    "dpmpp_3m": ("sample_dpmpp_3m_sde", 1, {"eta": 0.0}),
}
K_SIGMAS = ("karras", "exponential", "polyexponential-2")
# log-SNR where the k-diffusion sigmas end before 0: as fine a grid as the project's own settings were chosen from
PEER_STOPS = (2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0, 5.5, 6.0, 6.5, 7.0, 7.5, 8.0, 9.0, 10.0, 12.0)


def k_sigmas(family: str, n: int, stop_log_snr: float, begin_log_snr: float) -> torch.Tensor:
    """float64 [n + 1] k-diffusion sigmas from log-SNR ``begin_log_snr`` to ``stop_log_snr``, then 0."""
    k = k_sampling()
    smin, smax = math.exp(-stop_log_snr / 2), math.exp(-begin_log_snr / 2)
    if family == "karras":
        return k.get_sigmas_karras(n, smin, smax, rho=7.0).double()
    if family == "exponential":
        return k.get_sigmas_exponential(n, smin, smax).double()
    return k.get_sigmas_polyexponential(n, smin, smax, rho=2.0).double()


def k_steps(sampler: str, evaluations: int) -> int:
    """The most sigmas (before the 0) whose run makes at most ``evaluations`` denoiser calls."""
    per_step = K_SAMPLERS[sampler][1]
    return evaluations if per_step == 1 else (evaluations + 1) // 2


def run_k(model: ModelFn, x: torch.Tensor, sampler: str, sigmas: torch.Tensor) -> torch.Tensor:
    """k-diffusion's ``sampler`` over ``sigmas`` [n + 1] (ending in 0) from the VP x [N, C, H, W] at sigmas[0];
    returns the x0 it ends with."""
    name, _, extra = K_SAMPLERS[sampler]
    fn = getattr(k_sampling(), name)
    if "eta" in extra:
        extra = {**extra, "noise_sampler": lambda _s, _t: torch.zeros_like(x)}
    alpha0 = 1 / torch.sqrt(1 + sigmas[0] ** 2)
    with torch.no_grad():
        return fn(k_denoiser(model), x / alpha0, sigmas, disable=True, **extra)


@dataclass(frozen=True)
class PeerSetting:
    """One peer configuration: ``library`` k-diffusion or diffusers, a sampler/scheduler and its options."""

    library: str
    sampler: str
    options: tuple[tuple[str, Any], ...] = ()

    def describe(self) -> str:
        return f"{self.library} {self.sampler}" + "".join(f", {k}={v}" for k, v in self.options)


def k_settings() -> Iterator[PeerSetting]:
    for sampler, family, stop in itertools.product(K_SAMPLERS, K_SIGMAS, PEER_STOPS):
        yield PeerSetting("k-diffusion", sampler, (("sigmas", family), ("stop_log_snr", stop)))


# diffusers schedulers: (class name, fixed config) x sigma options x timestep spacing
D_SCHEDULERS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("dpmpp-2m", "DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    ("dpmpp-3m", "DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 3}),
    ("unipc-bh1-2", "UniPCMultistepScheduler", {"solver_type": "bh1", "solver_order": 2}),
    ("unipc-bh2-2", "UniPCMultistepScheduler", {"solver_type": "bh2", "solver_order": 2}),
    ("unipc-bh2-3", "UniPCMultistepScheduler", {"solver_type": "bh2", "solver_order": 3}),
    ("deis-2", "DEISMultistepScheduler", {"solver_order": 2}),
    ("deis-3", "DEISMultistepScheduler", {"solver_order": 3}),
)
D_SIGMAS = ("default", "karras", "exponential")
D_SPACINGS = ("linspace", "trailing")


def d_settings() -> Iterator[PeerSetting]:
    for (name, _, _), sigmas, spacing in itertools.product(D_SCHEDULERS, D_SIGMAS, D_SPACINGS):
        yield PeerSetting("diffusers", name, (("sigmas", sigmas), ("spacing", spacing)))


def d_scheduler(setting: PeerSetting, steps: int) -> Any:
    """The diffusers scheduler of ``setting`` with the cosine schedule's betas and v prediction, set to ``steps``."""
    import diffusers

    _, cls, config = next(s for s in D_SCHEDULERS if s[0] == setting.sampler)
    options = dict(setting.options)
    sigmas = {"default": {}, "karras": {"use_karras_sigmas": True},
              "exponential": {"use_exponential_sigmas": True}}[options["sigmas"]]
    scheduler = getattr(diffusers, cls)(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                                        prediction_type="v_prediction", timestep_spacing=options["spacing"],
                                        **config, **sigmas)
    scheduler.set_timesteps(steps)
    # rounded timesteps can repeat at the start; the first step is step 0 whatever the timestep's value
    scheduler.set_begin_index(0)
    return scheduler


def run_d(model: ModelFn, x: torch.Tensor, setting: PeerSetting, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """diffusers' scheduler over ``steps`` evaluations from x [N, C, H, W] at its first sigma; each evaluation is at
    exactly the noise level the scheduler assumes (its sigmas). Returns (x0, the float64 sigmas [steps + 1])."""
    scheduler = d_scheduler(setting, steps)
    sigmas = scheduler.sigmas.double()
    ones = x.new_ones([x.shape[0]])
    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps):
            v = model(x, ones * sigma_to_t(sigmas[i]))
            x = scheduler.step(v, t, x).prev_sample
    return x, sigmas


def _finite(db: float) -> float:
    return db if not math.isnan(db) else -math.inf  # a run that blew up scores below every other


def score_peers(cases: tuple[Any, ...], eval_counts: tuple[int, ...]) -> dict[str, dict[int, list[float]]]:
    """Latent PSNR (dB, 4 noises per case) of every peer setting at each evaluation count on each
    solver_oracle.MixtureCase, against the converged ODE endpoint from the same x at the run's own first noise level
    (k-diffusion starts at the project's; diffusers at its scheduler's first sigma)."""
    from ccld_trt.benchmarks.solver_oracle import converged_endpoint, mixture_model, psnr

    begin = start_log_snr()
    scores: dict[str, dict[int, list[float]]] = {}
    for case in cases:
        model, x = mixture_model(case.mixture()), case.noise()
        references = {begin: converged_endpoint(model, x)}
        for setting in k_settings():
            options = dict(setting.options)
            for n in eval_counts:
                sigmas = k_sigmas(options["sigmas"], k_steps(setting.sampler, n), options["stop_log_snr"], begin)
                db = psnr(run_k(model, x, setting.sampler, sigmas), references[begin])
                scores.setdefault(setting.describe(), {}).setdefault(n, []).append(_finite(db))
        for setting in d_settings():
            for n in eval_counts:
                out, sigmas = run_d(model, x, setting, n)
                start = round(float(-2 * torch.log(sigmas[0])), 9)
                if start not in references:
                    references[start] = converged_endpoint(model, x, start_log_snr=start)
                scores.setdefault(setting.describe(), {}).setdefault(n, []).append(_finite(psnr(out,
                                                                                              references[start])))
    return scores


def best_setting(scores: dict[str, dict[int, list[float]]], n: int) -> tuple[str, list[float]]:
    """The setting with the highest mean dB at ``n`` evaluations (chosen in hindsight on the cases it is scored on),
    and its dB per case."""
    name = max(scores, key=lambda s: sum(scores[s][n]) / len(scores[s][n]))
    return name, scores[name][n]

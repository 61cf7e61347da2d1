"""The v-diffusion noise schedule: pure functions of float tensors, same arithmetic as the original."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# Where the DDPM and cosine schedules are spliced (v-diffusion-pytorch's constants).
_DDPM_CROSSOVER = 0.48536712
_COSINE_CROSSOVER = 0.80074257


@dataclass(frozen=True)
class SolverSetting:
    """How a log-SNR method samples at a given step count: the spacing ``family`` of its timesteps (``log-snr``:
    uniform in log(alpha^2 / sigma^2); ``karras``: rho-7 ramp in sigma / alpha; ``poly-2``: log-SNR quadratic in
    the step index, denser near the data), where it stops before the final jump to t = 0 (``final_log_snr``), and
    the solver order (UniPC's; DPM-Solver++'s order is in its name). ``final`` is how the jump to t = 0 is made:
    1 takes the last x0 prediction (the posterior mean there, off the ODE's endpoint by ~sigma^2 / s^2), 3
    extrapolates the last three x0 predictions to sigma = 0 by a quadratic in (sigma / alpha)^2 (samplers.py)."""

    family: str
    final_log_snr: float
    order: int = 2
    final: int = 1


# DPM-Solver++ and UniPC (samplers.py) start at the original's first timestep and end with a jump to t = 0 from
# final_log_snr. Per method, (fewest steps, setting) rows in ascending steps: the last row whose step count is <= the
# requested one applies. Chosen per step count on solver_oracle.TUNING_CASES (the mixture-of-Gaussians oracle;
# docs/solvers.md) by benchmarks/solver_tuning.py, whose output this is (best mean dB; below the fast preset's 7
# steps best worst-mixture dB, a setting counting as its worst neighbour on the stop grid); scored on
# HELD_OUT_CASES only. iplms and the original six keep the original timesteps.
SOLVER_SETTINGS: dict[str, tuple[tuple[int, SolverSetting], ...]] = {
    "dpmpp-2m": ((1, SolverSetting("log-snr", 4.5, 2, 3)), (6, SolverSetting("log-snr", 5.0, 2, 3)),
                 (7, SolverSetting("log-snr", 6.0, 2, 3)), (8, SolverSetting("log-snr", 5.5, 2, 3)),
                 (9, SolverSetting("log-snr", 5.0, 2, 3)), (10, SolverSetting("log-snr", 4.5, 2, 3)),
                 (12, SolverSetting("poly-1.5", 6.0, 2, 3)), (15, SolverSetting("poly-1.5", 6.5, 2, 3)),
                 (20, SolverSetting("poly-1.5", 6.0, 2, 3)), (30, SolverSetting("poly-1.5", 5.5, 2, 3))),
    "dpmpp-3m": ((1, SolverSetting("poly-2", 2.0, 3, 3)), (6, SolverSetting("poly-2", 3.0, 3, 3)),
                 (7, SolverSetting("poly-1.5", 3.0, 3, 3)),
                 (8, SolverSetting("poly-2", 3.0, 3, 3)), (15, SolverSetting("log-snr", 5.0, 3, 1)),
                 (20, SolverSetting("log-snr", 5.5, 3, 3)), (30, SolverSetting("log-snr", 6.0, 3, 3)),
                 (50, SolverSetting("log-snr", 6.5, 3, 3))),
    "unipc": ((1, SolverSetting("poly-1.5", 3.0, 3, 3)), (6, SolverSetting("log-snr", 5.5, 2, 3)),
              (7, SolverSetting("poly-1.5", 3.5, 2, 3)), (8, SolverSetting("poly-1.5", 4.0, 2, 3)),
              (9, SolverSetting("poly-1.5", 7.0, 2, 1)), (10, SolverSetting("poly-1.5", 7.5, 2, 1)),
              (12, SolverSetting("poly-2", 6.5, 2, 3)), (20, SolverSetting("log-snr", 9.0, 3, 1)),
              (30, SolverSetting("log-snr", 7.0, 3, 3))),
}


def t_to_alpha_sigma(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaling factors of the clean image and of the noise at timestep t (any shape)."""
    return torch.cos(t * math.pi / 2), torch.sin(t * math.pi / 2)


def _alpha_sigma_to_t(alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return torch.atan2(sigma, alpha) / math.pi * 2


def _ddpm_schedule(ddpm_t: torch.Tensor) -> torch.Tensor:
    log_snr = -torch.special.expm1(1e-4 + 10 * ddpm_t**2).log()
    alpha, sigma = log_snr.sigmoid().sqrt(), log_snr.neg().sigmoid().sqrt()
    return _alpha_sigma_to_t(alpha, sigma)


def spliced_ddpm_cosine_schedule(t: torch.Tensor) -> torch.Tensor:
    """Map linear timesteps to the spliced DDPM/cosine schedule the CCLD models were trained with."""
    big_t = t * (1 + _COSINE_CROSSOVER - _DDPM_CROSSOVER)
    ddpm_part = _ddpm_schedule(big_t + _DDPM_CROSSOVER - _COSINE_CROSSOVER)
    return torch.where(big_t < _COSINE_CROSSOVER, big_t, ddpm_part)


def sampling_timesteps(steps: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The original's timesteps, float32 [steps]: ``linspace(1, 0, steps + 1)[:-1]``, spliced schedule."""
    t = torch.linspace(1, 0, steps + 1, device=device)[:-1]
    return spliced_ddpm_cosine_schedule(t)


def log_snr_to_t(log_snr: torch.Tensor) -> torch.Tensor:
    """The timestep whose log(alpha^2 / sigma^2) is ``log_snr`` (inverse of t_to_alpha_sigma's log-SNR)."""
    return torch.atan(torch.exp(-log_snr / 2)) / math.pi * 2


def _start_log_snr() -> float:
    t_max = spliced_ddpm_cosine_schedule(torch.ones([], dtype=torch.float64))
    alpha, sigma = t_to_alpha_sigma(t_max)
    return float(2 * torch.log(alpha / sigma))


def log_snr_timesteps(steps: int, final_log_snr: float, device: torch.device | str = "cpu",
                      family: str = "log-snr") -> torch.Tensor:
    """float32 [steps] from the original's first timestep (the same starting noise level) down to the one at
    ``final_log_snr``, spaced by ``family`` (SolverSetting); the samplers then jump from there to t = 0."""
    start = _start_log_snr()
    u = torch.linspace(0, 1, steps, dtype=torch.float64) if steps > 1 else torch.zeros([1], dtype=torch.float64)
    if family == "log-snr":
        log_snr = torch.linspace(start, final_log_snr, steps, dtype=torch.float64) if steps > 1 else u + start
    elif family.startswith("poly-"):
        log_snr = final_log_snr + (start - final_log_snr) * (1 - u) ** float(family[5:])
    elif family == "karras":
        s_max, s_min = math.exp(-start / 2) ** (1 / 7), math.exp(-final_log_snr / 2) ** (1 / 7)
        log_snr = -2 * 7 * torch.log(s_max + u * (s_min - s_max))
    else:
        raise ValueError(f"unknown timestep family {family!r}")
    return log_snr_to_t(log_snr).float().to(device)


def solver_setting(method: str, steps: int) -> SolverSetting:
    """The SOLVER_SETTINGS row of ``method`` that applies at ``steps`` steps (KeyError for other methods)."""
    rows = SOLVER_SETTINGS[method]
    return [setting for fewest, setting in rows if fewest <= max(steps, 1)][-1]


def method_timesteps(method: str, steps: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The timesteps ``method`` samples over, float32 [steps]; the samplers end with a jump to t = 0.

    The original six and iplms keep the original's timesteps (their images, the goldens); DPM-Solver++ and UniPC use
    their SOLVER_SETTINGS row for ``steps`` (chosen on the mixture-of-Gaussians oracle, docs/solvers.md).
    """
    if method in SOLVER_SETTINGS:
        setting = solver_setting(method, steps)
        return log_snr_timesteps(steps, setting.final_log_snr, device, setting.family)
    return sampling_timesteps(steps, device)


def start_timesteps(timesteps: torch.Tensor, start: float) -> torch.Tensor:
    """Image-to-image's timesteps, as the original ``cfg_sample.py --init --starting-timestep``: those of
    ``timesteps`` (any method's, after the schedule) below ``start``; the sampler starts at the first one."""
    return timesteps[timesteps < start]

"""The v-diffusion noise schedule: pure functions of float tensors, same arithmetic as the original."""

from __future__ import annotations

import math

import torch

# Where the DDPM and cosine schedules are spliced (v-diffusion-pytorch's constants).
_DDPM_CROSSOVER = 0.48536712
_COSINE_CROSSOVER = 0.80074257
# DPM-Solver++ and UniPC (samplers.py) step uniformly in log-SNR = log(alpha^2 / sigma^2) down to
# FAST_FINAL_LOG_SNR, then jump to t = 0: 6 measured best on the mixture-of-Gaussians oracle at 8-25 steps, and the
# original's time-uniform timesteps cost them 10-25 dB there at 7-15 steps (docs/solvers.md). iplms keeps the
# original timesteps: better there from 15 steps up, where it is used (at 50 steps 83 dB against 60).
LOG_SNR_METHODS = ("dpmpp-2m", "dpmpp-3m", "unipc")
FAST_FINAL_LOG_SNR = 6.0


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


def log_snr_timesteps(steps: int, final_log_snr: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """float32 [steps] uniform in log-SNR from the original's first timestep (the same starting noise level) down
    to the one at ``final_log_snr``; the samplers then jump from there to t = 0."""
    t_max = spliced_ddpm_cosine_schedule(torch.ones([], dtype=torch.float64))
    alpha, sigma = t_to_alpha_sigma(t_max)
    start = float(2 * torch.log(alpha / sigma))
    log_snr = torch.linspace(start, final_log_snr, steps, dtype=torch.float64) if steps > 1 else \
        torch.tensor([start], dtype=torch.float64)
    return log_snr_to_t(log_snr).float().to(device)


def method_timesteps(method: str, steps: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The timesteps ``method`` samples over, float32 [steps]; the samplers end with a jump to t = 0.

    The original six and iplms keep the original's timesteps (their images, the goldens); DPM-Solver++ and UniPC step
    uniformly in log-SNR down to log-SNR FAST_FINAL_LOG_SNR (chosen on the mixture-of-Gaussians oracle,
    docs/solvers.md).
    """
    if method in LOG_SNR_METHODS:
        return log_snr_timesteps(steps, FAST_FINAL_LOG_SNR, device)
    return sampling_timesteps(steps, device)


def start_timesteps(timesteps: torch.Tensor, start: float) -> torch.Tensor:
    """Image-to-image's timesteps, as the original ``cfg_sample.py --init --starting-timestep``: those of
    ``timesteps`` (any method's, after the schedule) below ``start``; the sampler starts at the first one."""
    return timesteps[timesteps < start]

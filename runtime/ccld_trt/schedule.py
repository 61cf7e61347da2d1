"""The v-diffusion noise schedule: pure functions of float tensors, same arithmetic as the original."""

from __future__ import annotations

import math

import torch

# Where the DDPM and cosine schedules are spliced (v-diffusion-pytorch's constants).
_DDPM_CROSSOVER = 0.48536712
_COSINE_CROSSOVER = 0.80074257


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

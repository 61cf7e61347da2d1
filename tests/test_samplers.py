"""Samplers and schedule: exact on an ideal denoiser, evaluation counts, noise order."""

from __future__ import annotations

import pytest
import torch

from ccld_trt.samplers import evaluations, needs_step_noise, sample
from ccld_trt.schedule import sampling_timesteps, t_to_alpha_sigma


def ideal_model(x0: torch.Tensor):
    """The exact v of a data distribution concentrated at x0; counts its calls."""
    calls = []

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        calls.append(t.clone())
        alpha, sigma = (a[:, None, None, None] for a in t_to_alpha_sigma(t))
        eps = (x - alpha * x0) / sigma
        return alpha * eps - sigma * x0

    return model, calls


def gaussian_model(mu: torch.Tensor, s: float):
    """The exact v for data ~ N(mu, s^2 I), whose probability-flow ODE has a closed-form solution."""

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha, sigma = (a[:, None, None, None] for a in t_to_alpha_sigma(t))
        var = alpha**2 * s**2 + sigma**2
        eps = sigma * (x - alpha * mu) / var
        x0 = mu + alpha * s**2 * (x - alpha * mu) / var
        return alpha * eps - sigma * x0

    return model


@pytest.mark.parametrize("method", ["ddim", "ddpm"])
@pytest.mark.parametrize("steps", [1, 2, 7])
def test_ddim_family_recovers_the_data_point_of_an_ideal_model(method, steps):
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn([2, 4, 8, 8], generator=gen, dtype=torch.float64)
    x = torch.randn([2, 4, 8, 8], generator=gen, dtype=torch.float64)
    noise = [torch.randn_like(x) for _ in range(steps - 1)]
    model, calls = ideal_model(x0)
    out = sample(model, x, sampling_timesteps(steps).double(), method, eta=0.5, noise=noise)
    assert torch.allclose(out, x0, atol=1e-9)
    assert len(calls) == evaluations(method, steps)


@pytest.mark.parametrize(("method", "tolerance"), [("prk", 2e-3), ("plms", 2e-3), ("pie", 1e-2), ("plms2", 1e-2)])
def test_pndm_samplers_integrate_the_probability_flow_ode(method, tolerance):
    gen = torch.Generator().manual_seed(1)
    mu = torch.randn([1, 4, 8, 8], generator=gen, dtype=torch.float64)
    x = torch.randn([1, 4, 8, 8], generator=gen, dtype=torch.float64)
    steps = sampling_timesteps(20).double()
    alpha, sigma = t_to_alpha_sigma(steps[0])
    exact = mu + 0.5 * (x - alpha * mu) / torch.sqrt(alpha**2 * 0.25 + sigma**2)
    out = sample(gaussian_model(mu, 0.5), x, steps, method)
    assert (out - exact).norm() / exact.norm() < tolerance


def test_evaluation_counts():
    assert evaluations("plms", 50) == 3 * 4 + 47
    assert evaluations("plms", 2) == 8
    assert evaluations("plms2", 10) == 2 + 9
    assert evaluations("prk", 5) == 20
    assert evaluations("pie", 5) == 10
    assert evaluations("ddim", 5) == 5


def test_schedule_starts_below_one_and_decreases():
    t = sampling_timesteps(50)
    assert t.shape == (50,) and t.dtype == torch.float32
    assert 0.9 < t[0] < 1.0 and torch.all(t[1:] < t[:-1]) and t[-1] > 0
    # the linear (cosine) part: below the crossover the schedule is t * (1 + 0.80074257 - 0.48536712)
    lin = torch.linspace(1, 0, 51)[:-1]
    assert torch.allclose(t[-5:], lin[-5:] * (1 + 0.80074257 - 0.48536712))


def test_ddim_eta_zero_ignores_noise_and_ddpm_uses_it():
    x0 = torch.ones([1, 4, 4, 4])
    x = torch.zeros([1, 4, 4, 4])
    model, _ = ideal_model(x0)
    steps = sampling_timesteps(3)
    assert not needs_step_noise("ddim", 0.0) and needs_step_noise("ddpm", 0.0)
    big = [torch.full_like(x, 100.0)] * 2
    # an ideal model predicts x0 whatever the noise, so both agree; the noise must still be read for ddpm
    assert torch.allclose(sample(model, x, steps, "ddpm", noise=big), x0, atol=1e-4)
    with pytest.raises(IndexError):
        sample(model, x, steps, "ddpm", noise=[])

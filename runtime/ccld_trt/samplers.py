"""v-diffusion samplers as pure functions of a model, the starting noise and a schedule.

``model(x, t) -> v`` takes x [N, 4, h, w] and t [N] and returns the velocity v (same shape as x). All
arithmetic stays on x's device; nothing here reads a value back to the host, so a GPU backend runs the
whole loop without synchronising. Semantics follow crowsonkb/v-diffusion-pytorch (ffabbb1a).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ccld_trt.schedule import t_to_alpha_sigma

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
StepCallback = Callable[[int], None]

# The fast ODE solvers: one evaluation per step (DPM-Solver++ on log-SNR timesteps: schedule.method_timesteps).
FAST_METHODS = ("iplms", "dpmpp-2m", "dpmpp-3m", "unipc")
METHODS = ("ddpm", "ddim", "prk", "plms", "pie", "plms2", *FAST_METHODS)
# ``--fast``: the fewest evaluations that reach 40 dB against the converged ODE endpoint on the
# mixture-of-Gaussians oracle (docs/solvers.md): unipc at 7 steps gives 42-53 dB over five mixtures (at 6: 31-37);
# dpmpp-2m needs 8 (40-44 dB).
FAST_METHOD = "unipc"
FAST_STEPS = 7


def evaluations(method: str, steps: int) -> int:
    """How many model evaluations a method makes for ``steps`` timesteps (for progress and FLOP counts)."""
    per_step = {"ddpm": 1, "ddim": 1, "prk": 4, "pie": 2, **{m: 1 for m in FAST_METHODS}}
    if method in per_step:
        return per_step[method] * steps
    warmup = {"plms": (3, 4), "plms2": (1, 2)}[method]
    n_warm = min(warmup[0], steps)
    return n_warm * warmup[1] + (steps - n_warm)


def _bcast(a: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return a.reshape(a.shape + (1,) * (like.ndim - a.ndim))


def ddim_sample(model: ModelFn, x: torch.Tensor, steps: torch.Tensor, eta: float,
                noise: Sequence[torch.Tensor] = (), callback: StepCallback | None = None) -> torch.Tensor:
    """DDPM (eta=1) / DDIM sampling; returns the final denoised prediction.

    ``noise`` supplies the fresh noise of each step but the last when eta > 0 (len(steps) - 1 tensors shaped
    like x), drawn by the caller so that the random stream matches the original's ``randn_like`` order.
    """
    ts = x.new_ones([x.shape[0]])
    alphas, sigmas = t_to_alpha_sigma(steps)
    pred = x
    for i in range(len(steps)):
        v = model(x, ts * steps[i])
        pred = x * alphas[i] - v * sigmas[i]
        eps = x * sigmas[i] + v * alphas[i]
        if i < len(steps) - 1:
            ddim_sigma = eta * (sigmas[i + 1] ** 2 / sigmas[i] ** 2).sqrt() * \
                (1 - alphas[i] ** 2 / alphas[i + 1] ** 2).sqrt()
            adjusted_sigma = (sigmas[i + 1] ** 2 - ddim_sigma ** 2).sqrt()
            x = pred * alphas[i + 1] + eps * adjusted_sigma
            if eta:
                x = x + noise[i] * ddim_sigma
        if callback is not None:
            callback(i)
    return pred


def _eps(model: ModelFn, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    alphas, sigmas = t_to_alpha_sigma(t)
    v = model(x, t)
    return x * _bcast(sigmas, x) + v * _bcast(alphas, x)


def _transfer(x: torch.Tensor, eps: torch.Tensor, t_1: torch.Tensor,
              t_2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    alphas, sigmas = t_to_alpha_sigma(t_1)
    next_alphas, next_sigmas = t_to_alpha_sigma(t_2)
    pred = (x - eps * _bcast(sigmas, x)) / _bcast(alphas, x)
    return pred * _bcast(next_alphas, x) + eps * _bcast(next_sigmas, x), pred


def _prk_step(model: ModelFn, x: torch.Tensor, t_1: torch.Tensor, t_2: torch.Tensor):
    t_mid = (t_2 + t_1) / 2
    eps_1 = _eps(model, x, t_1)
    x_1, _ = _transfer(x, eps_1, t_1, t_mid)
    eps_2 = _eps(model, x_1, t_mid)
    x_2, _ = _transfer(x, eps_2, t_1, t_mid)
    eps_3 = _eps(model, x_2, t_mid)
    x_3, _ = _transfer(x, eps_3, t_1, t_2)
    eps_4 = _eps(model, x_3, t_2)
    eps_prime = (eps_1 + 2 * eps_2 + 2 * eps_3 + eps_4) / 6
    x_new, _ = _transfer(x, eps_prime, t_1, t_2)
    return x_new, eps_prime


def _pie_step(model: ModelFn, x: torch.Tensor, t_1: torch.Tensor, t_2: torch.Tensor):
    eps_1 = _eps(model, x, t_1)
    x_1, _ = _transfer(x, eps_1, t_1, t_2)
    eps_2 = _eps(model, x_1, t_2)
    eps_prime = (eps_1 + eps_2) / 2
    x_new, _ = _transfer(x, eps_prime, t_1, t_2)
    return x_new, eps_prime


def _plms_step(model: ModelFn, x: torch.Tensor, old_eps: list[torch.Tensor], t_1: torch.Tensor,
               t_2: torch.Tensor):
    eps = _eps(model, x, t_1)
    eps_prime = (55 * eps - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24
    x_new, _ = _transfer(x, eps_prime, t_1, t_2)
    return x_new, eps


def _plms2_step(model: ModelFn, x: torch.Tensor, old_eps: list[torch.Tensor], t_1: torch.Tensor,
                t_2: torch.Tensor):
    eps = _eps(model, x, t_1)
    eps_prime = (3 * eps - old_eps[-1]) / 2
    x_new, _ = _transfer(x, eps_prime, t_1, t_2)
    return x_new, eps


def pseudo_sample(model: ModelFn, x: torch.Tensor, steps: torch.Tensor, method: str,
                  callback: StepCallback | None = None) -> torch.Tensor:
    """PNDM-family sampling (``prk``, ``plms``, ``pie``, ``plms2``) down to t = 0; returns x at t = 0.

    The linear-multistep methods start with Runge-Kutta-style steps until they have enough history
    (3 PRK steps for PLMS, 1 PIE step for PLMS2), as the original.
    """
    ts = x.new_ones([x.shape[0]])
    steps = torch.cat([steps, steps.new_zeros([1])])
    history = {"plms": 3, "plms2": 1}.get(method, 0)
    warmup = _pie_step if method in ("pie", "plms2") else _prk_step
    old_eps: list[torch.Tensor] = []
    for i in range(len(steps) - 1):
        t_1, t_2 = steps[i] * ts, steps[i + 1] * ts
        if len(old_eps) < history or history == 0:
            x, eps = warmup(model, x, t_1, t_2)
        elif method == "plms":
            x, eps = _plms_step(model, x, old_eps, t_1, t_2)
            old_eps.pop(0)
        else:
            x, eps = _plms2_step(model, x, old_eps, t_1, t_2)
            old_eps.pop(0)
        if history:
            old_eps.append(eps)
        if callback is not None:
            callback(i)
    return x


def iplms_sample(model: ModelFn, x: torch.Tensor, steps: torch.Tensor,
                 callback: StepCallback | None = None) -> torch.Tensor:
    """Improved PLMS (v-diffusion-pytorch's ``iplms``) down to t = 0; returns x at t = 0.

    PLMS without the PRK warm-up: Adams-Bashforth on eps of order 1, 2, 3, then 4 as the history fills, so
    ``len(steps)`` evaluations for ``len(steps)`` steps.
    """
    ts = x.new_ones([x.shape[0]])
    steps = torch.cat([steps, steps.new_zeros([1])])
    coefficients = ((1.0,), (3 / 2, -1 / 2), (23 / 12, -16 / 12, 5 / 12), (55 / 24, -59 / 24, 37 / 24, -9 / 24))
    old_eps: list[torch.Tensor] = []  # newest last, at most 3
    for i in range(len(steps) - 1):
        t_1, t_2 = steps[i] * ts, steps[i + 1] * ts
        eps = _eps(model, x, t_1)
        history = [eps, *reversed(old_eps)]
        eps_prime = history[0] * coefficients[len(old_eps)][0]
        for c, e in zip(coefficients[len(old_eps)][1:], history[1:], strict=True):
            eps_prime = eps_prime + e * c
        x, _ = _transfer(x, eps_prime, t_1, t_2)
        old_eps = [*old_eps[-2:], eps]
        if callback is not None:
            callback(i)
    return x


def _dpmpp_update(x: torch.Tensor, sigma_ratio: torch.Tensor, alpha_next: torch.Tensor, h: torch.Tensor,
                  preds: list[torch.Tensor], lambdas: list[torch.Tensor], order: int) -> torch.Tensor:
    """One DPM-Solver++ multistep step in log-SNR: x_next = (sigma_n / sigma) x + alpha_n * integral over
    [0, h] of e^(u - h) p(u) du, p the polynomial through the last ``order`` x0 predictions (newest last)."""
    em = -torch.expm1(-h)  # 1 - e^-h without cancellation at small h
    m0 = preds[-1]
    if order == 1:
        return x * sigma_ratio + m0 * (alpha_next * em)
    r = (lambdas[-1] - lambdas[-2]) / h
    if order == 2:
        # Lu et al. 2022b, DPM-Solver++(2M): D = (1 + 1/2r) m0 - 1/2r m1
        d = m0 + (m0 - preds[-2]) / (2 * r)
        return x * sigma_ratio + d * (alpha_next * em)
    # order 3: p(u) = m0 + c1 u + c2 u^2 from Newton's divided differences at u = 0, -h0, -(h0 + h1)
    h0, h1 = lambdas[-1] - lambdas[-2], lambdas[-2] - lambdas[-3]
    d01 = (m0 - preds[-2]) / h0
    d12 = (preds[-2] - preds[-3]) / h1
    c2 = (d01 - d12) / (h0 + h1)
    c1 = d01 + c2 * h0
    phi2 = h - em                   # integral of u e^(u - h)
    phi3 = h * h - 2 * phi2         # integral of u^2 e^(u - h)
    return x * sigma_ratio + alpha_next * (m0 * em + c1 * phi2 + c2 * phi3)


def dpmpp_sample(model: ModelFn, x: torch.Tensor, steps: torch.Tensor, order: int,
                 callback: StepCallback | None = None) -> torch.Tensor:
    """DPM-Solver++ (multistep, data prediction x0 = alpha x - sigma v) of ``order`` 1-3 over ``steps`` [K], then
    first order into t = 0 (there sigma = 0 and the step is the last x0 prediction); returns latents like x.

    Steps in lambda = log(alpha / sigma); the order rises 1, 2, ... as the history fills. Order 1 is DDIM (eta 0).
    """
    ts = x.new_ones([x.shape[0]])
    alphas, sigmas = t_to_alpha_sigma(steps)
    lambdas = torch.log(alphas / sigmas)
    preds: list[torch.Tensor] = []
    for i in range(len(steps)):
        v = model(x, ts * steps[i])
        preds = [*preds[-2:], x * alphas[i] - v * sigmas[i]]
        if i < len(steps) - 1:
            h = lambdas[i + 1] - lambdas[i]
            x = _dpmpp_update(x, sigmas[i + 1] / sigmas[i], alphas[i + 1], h, preds,
                              list(lambdas[max(0, i - 2):i + 1]), min(order, len(preds)))
        if callback is not None:
            callback(i)
    return preds[-1]


def _unic(x_prev: torch.Tensor, sigma_ratio: torch.Tensor, alpha: torch.Tensor, h: torch.Tensor, m_t: torch.Tensor,
          preds: list[torch.Tensor], lambdas: list[torch.Tensor]) -> torch.Tensor:
    """UniC with B(h) = e^-h - 1 (bh2, data prediction): x at the new timestep recomputed from ``x_prev`` with the
    new x0 prediction ``m_t`` and the earlier ones ``preds`` at ``lambdas`` (newest last): order 1, or 2 with one
    earlier prediction (Zhao et al. 2023, the rhos solve R rho = b in closed form)."""
    em = -torch.expm1(-h)  # 1 - e^-h
    m0 = preds[-1]
    d_t = m_t - m0
    if len(preds) < 2:
        return x_prev * sigma_ratio + (m0 + d_t * 0.5) * (alpha * em)
    r1 = (lambdas[-2] - lambdas[-1]) / h
    d1 = (preds[-2] - m0) / r1
    phi2 = em / h - 1
    phi3 = phi2 / -h - 0.5
    b1, b2 = phi2 / -em, 2 * phi3 / -em
    rho0 = (b1 - b2) / (1 - r1)
    rho1 = b1 - rho0
    return x_prev * sigma_ratio + (m0 + d1 * rho0 + d_t * rho1) * (alpha * em)


def unipc_sample(model: ModelFn, x: torch.Tensor, steps: torch.Tensor,
                 callback: StepCallback | None = None) -> torch.Tensor:
    """UniPC (bh2, order 2) over ``steps`` [K], then first order into t = 0; returns latents like x.

    Each step predicts with UniP-2 (with B(h) = e^-h - 1 the same step as DPM-Solver++(2M)), and the evaluation at
    the predicted x then corrects it with UniC before the next prediction: one evaluation per step, order 3 on
    smooth data.
    """
    ts = x.new_ones([x.shape[0]])
    alphas, sigmas = t_to_alpha_sigma(steps)
    lambdas = torch.log(alphas / sigmas)
    preds: list[torch.Tensor] = []
    x_prev = x
    for i in range(len(steps)):
        v = model(x, ts * steps[i])
        m_t = x * alphas[i] - v * sigmas[i]
        if i > 0:
            x = _unic(x_prev, sigmas[i] / sigmas[i - 1], alphas[i], lambdas[i] - lambdas[i - 1], m_t, preds,
                      list(lambdas[max(0, i - 2):i]))
        preds = [*preds[-1:], m_t]
        if i < len(steps) - 1:
            x_prev = x
            x = _dpmpp_update(x, sigmas[i + 1] / sigmas[i], alphas[i + 1], lambdas[i + 1] - lambdas[i], preds,
                              list(lambdas[max(0, i - 1):i + 1]), len(preds))
        if callback is not None:
            callback(i)
    return preds[-1]


def sample(model: ModelFn, x: torch.Tensor, steps: torch.Tensor, method: str, eta: float = 0.0,
           noise: Sequence[torch.Tensor] = (), callback: StepCallback | None = None) -> torch.Tensor:
    """Run ``method`` from noise x [N, 4, h, w] over the timesteps ``steps`` [K]; returns latents like x.

    ``ddpm`` is DDIM with eta = 1; ``noise`` is only read by ddpm and by ddim with eta > 0.
    """
    if method == "ddpm":
        return ddim_sample(model, x, steps, 1.0, noise, callback)
    if method == "ddim":
        return ddim_sample(model, x, steps, eta, noise, callback)
    if method in ("prk", "plms", "pie", "plms2"):
        return pseudo_sample(model, x, steps, method, callback)
    if method == "iplms":
        return iplms_sample(model, x, steps, callback)
    if method in ("dpmpp-2m", "dpmpp-3m"):
        return dpmpp_sample(model, x, steps, int(method[-2]), callback)
    if method == "unipc":
        return unipc_sample(model, x, steps, callback)
    raise ValueError(f"unknown sampling method {method!r}; choose from {', '.join(METHODS)}")


def needs_step_noise(method: str, eta: float) -> bool:
    """Whether ``method`` draws fresh noise at each step (so the caller must supply ``noise``)."""
    return method == "ddpm" or (method == "ddim" and eta != 0)

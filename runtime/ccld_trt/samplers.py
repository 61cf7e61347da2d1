"""v-diffusion samplers as pure functions of a model, the starting noise and a schedule.

``model(x, t) -> v`` takes x [N, 4, h, w] and t [N] and returns the velocity v (same shape as x). All
arithmetic stays on x's device; nothing here reads a value back to the host, so a GPU backend runs the
whole loop without synchronising. Semantics follow crowsonkb/v-diffusion-pytorch (ffabbb1a).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ccld_trt.sampler_names import FAST_METHODS, METHODS
from ccld_trt.sampler_names import needs_step_noise as needs_step_noise  # its importers' name
from ccld_trt.schedule import solver_setting, t_to_alpha_sigma

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
StepCallback = Callable[[int], None]



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


def final_prediction(preds: list[torch.Tensor], lambdas: torch.Tensor, final: int) -> torch.Tensor:
    """The latents at t = 0 from the x0 predictions ``preds`` (newest last) at the last log-SNR/2 ``lambdas``
    (0-dim tensors, as many): ``final`` 1 is the newest prediction; 3 the quadratic in s = (sigma / alpha)^2 through
    the last three, at s = 0 (along the ODE path the prediction is smooth in s: for Gaussian data its error is
    ~s / 2 var, so the extrapolation lifts the cap that the stop's log-SNR puts on a first-order jump)."""
    if final == 1 or len(preds) < 3:
        return preds[-1]
    a, b, c = (torch.exp(-2 * lam) for lam in lambdas[-3:])
    p_a, p_b, p_c = preds[-3:]
    # Lagrange's basis at s = 0
    return (p_a * (b * c / ((a - b) * (a - c))) + p_b * (a * c / ((b - a) * (b - c)))
            + p_c * (a * b / ((c - a) * (c - b))))


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
                 callback: StepCallback | None = None, final: int = 1) -> torch.Tensor:
    """DPM-Solver++ (multistep, data prediction x0 = alpha x - sigma v) of ``order`` 1-3 over ``steps`` [K], then
    first order into t = 0 (there sigma = 0 and the step is the last x0 prediction); returns latents like x.

    Steps in lambda = log(alpha / sigma); the order rises 1, 2, ... as the history fills. Order 1 is DDIM (eta 0).
    ``final``: how the jump to t = 0 is made (``final_prediction``).
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
    return final_prediction(preds, lambdas[-len(preds):], final)


def _unipc_rhos(rs: list[torch.Tensor], h: torch.Tensor) -> torch.Tensor:
    """UniPC's coefficients with B(h) = e^-h - 1 (bh2, Zhao et al. 2023): the rho [len(rs)] solving R rho = b, R's
    rows the powers 0 .. len(rs) - 1 of the relative steps ``rs`` ((lambda_k - lambda_0) / h), b_k the phi
    functions of -h scaled by k! / B(h). One small linear solve on 0-dim tensors (no host synchronisation)."""
    hh = -h
    b_h = torch.expm1(hh)
    phi = b_h / hh - 1
    factorial = 1.0
    b = []
    for k in range(1, len(rs) + 1):
        b.append(phi * factorial / b_h)
        factorial *= k + 1
        phi = phi / hh - 1 / factorial
    matrix = torch.stack([torch.stack([r**k for r in rs]) for k in range(len(rs))])
    return torch.linalg.solve(matrix, torch.stack(b))


def _unipc_update(x: torch.Tensor, sigma_ratio: torch.Tensor, alpha: torch.Tensor, h: torch.Tensor,
                  preds: list[torch.Tensor], lambdas: list[torch.Tensor], m_new: torch.Tensor | None) -> torch.Tensor:
    """One UniPC (bh2, data prediction) step of length h in log-SNR from x at ``lambdas[-1]``, with the x0
    predictions ``preds`` at ``lambdas`` (newest last). ``m_new`` None: the predictor UniP of order len(preds);
    else the corrector UniC of order len(preds) + 1 with ``m_new`` the prediction at the end of the step."""
    em = -torch.expm1(-h)  # 1 - e^-h without cancellation at small h
    m0 = preds[-1]
    base = x * sigma_ratio + m0 * (alpha * em)
    rs = [(lam - lambdas[-1]) / h for lam in lambdas[-2::-1]]  # the earlier points, newest first (each < 0)
    diffs = [(m - m0) / r for m, r in zip(preds[-2::-1], rs, strict=True)]
    if m_new is not None:
        rs, diffs = [*rs, torch.ones_like(h)], [*diffs, m_new - m0]
    if not diffs:
        return base
    # with one difference the coefficient is 1/2, as in the paper's UniP-2 (then DPM-Solver++(2M)) and UniC-1
    rhos = torch.full_like(h, 0.5)[None] if len(rs) == 1 else _unipc_rhos(rs, h)
    correction = diffs[0] * rhos[0]
    for d, rho in zip(diffs[1:], rhos[1:], strict=True):
        correction = correction + d * rho
    return base + correction * (alpha * em)


def unipc_sample(model: ModelFn, x: torch.Tensor, steps: torch.Tensor, order: int = 2,
                 callback: StepCallback | None = None, final: int = 1) -> torch.Tensor:
    """UniPC (bh2) of ``order`` 2 or 3 over ``steps`` [K], then first order into t = 0; returns latents like x.

    Each step predicts with UniP of ``order`` (order 2 is the DPM-Solver++(2M) step), and the evaluation at the
    predicted x then corrects it with UniC (one order higher) before the next prediction: one evaluation per step.
    The orders rise 1, 2, ... as the history fills. ``final``: how the jump to t = 0 is made (``final_prediction``).
    """
    ts = x.new_ones([x.shape[0]])
    alphas, sigmas = t_to_alpha_sigma(steps)
    lambdas = torch.log(alphas / sigmas)
    preds: list[torch.Tensor] = []
    last: list[torch.Tensor] = []  # the last three x0 predictions, for the final jump
    x_prev = x
    for i in range(len(steps)):
        v = model(x, ts * steps[i])
        m_t = x * alphas[i] - v * sigmas[i]
        last = [*last[-2:], m_t]
        if i > 0:
            x = _unipc_update(x_prev, sigmas[i] / sigmas[i - 1], alphas[i], lambdas[i] - lambdas[i - 1], preds,
                              list(lambdas[i - len(preds):i]), m_t)
        preds = [*preds[1 - order:], m_t]
        if i < len(steps) - 1:
            x_prev = x
            x = _unipc_update(x, sigmas[i + 1] / sigmas[i], alphas[i + 1], lambdas[i + 1] - lambdas[i], preds,
                              list(lambdas[i + 1 - len(preds):i + 1]), None)
        if callback is not None:
            callback(i)
    return final_prediction(last, lambdas[-len(last):], final)


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
        return dpmpp_sample(model, x, steps, int(method[-2]), callback, solver_setting(method, len(steps)).final)
    if method == "unipc":
        setting = solver_setting(method, len(steps))
        return unipc_sample(model, x, steps, setting.order, callback, setting.final)
    raise ValueError(f"unknown sampling method {method!r}; choose from {', '.join(METHODS)}")

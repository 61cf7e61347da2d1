"""The fast ODE solvers against closed-form oracles: order of convergence on Gaussian data, distance to the converged
ODE endpoint on a mixture of Gaussians (the issue's targets), DPM-Solver++(1) = DDIM, and convergence on the network."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch

from ccld_trt.benchmarks.solver_oracle import (
    HELD_OUT_CASES,
    converged_endpoint,
    gaussian_exact,
    gaussian_model,
    make_mixture,
    mixture_model,
    psnr,
    run,
    start_noise,
)
from ccld_trt.sampler_names import FAST_METHOD, FAST_METHODS, FAST_STEPS, METHODS
from ccld_trt.samplers import ddim_sample, dpmpp_sample, evaluations, final_prediction, sample, unipc_sample
from ccld_trt.schedule import (
    SOLVER_SETTINGS,
    log_snr_timesteps,
    log_snr_to_t,
    method_timesteps,
    sampling_timesteps,
    solver_setting,
    t_to_alpha_sigma,
)


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    # thousands of small float64 ops: on a shared 2-core CPU thread barriers make them ~100x slower
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def counting(model):
    """``model`` that records the x of each call."""
    calls: list[torch.Tensor] = []

    def counted(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        calls.append(x)
        return model(x, t)

    return counted, calls


def test_original_six_and_iplms_keep_the_original_timesteps_and_dpm_solver_pp_steps_in_log_snr():
    for method in ("ddpm", "ddim", "prk", "plms", "pie", "plms2", "iplms"):
        assert torch.equal(method_timesteps(method, 17), sampling_timesteps(17))
    t = log_snr_timesteps(8, 6.0).double()
    alpha, sigma = t_to_alpha_sigma(t)
    log_snr = 2 * torch.log(alpha / sigma)
    assert torch.allclose(log_snr.diff(), log_snr.diff()[:1].expand(7), atol=1e-4)  # uniform
    assert t[0] == pytest.approx(float(sampling_timesteps(8)[0]), abs=1e-6)  # same starting noise level
    assert log_snr[-1] == pytest.approx(6.0, abs=1e-4)
    assert torch.allclose(log_snr_to_t(log_snr), t, atol=1e-6)


@pytest.mark.parametrize("family", ["log-snr", "poly-1.5", "poly-2", "karras"])
def test_timestep_families_start_at_the_original_noise_level_and_stop_at_the_setting(family):
    t = log_snr_timesteps(9, 7.5, family=family).double()
    alpha, sigma = t_to_alpha_sigma(t)
    log_snr = 2 * torch.log(alpha / sigma)
    assert t[0] == pytest.approx(float(sampling_timesteps(9)[0]), abs=1e-6)
    assert log_snr[-1] == pytest.approx(7.5, abs=1e-3) and torch.all(log_snr.diff() > 0)
    if family.startswith("poly-"):  # log-SNR = stop + (start - stop) (1 - u)^p: the steps shrink toward the data
        p = float(family[5:])
        u = torch.linspace(0, 1, 9, dtype=torch.float64)
        assert torch.allclose(log_snr, 7.5 + (log_snr[0] - 7.5) * (1 - u) ** p, atol=1e-3)
        assert p == 1 or log_snr.diff()[-1] < log_snr.diff()[0]


@pytest.mark.parametrize("method", sorted(SOLVER_SETTINGS))
def test_each_step_count_uses_its_setting_row(method):
    rows = SOLVER_SETTINGS[method]
    assert rows[0][0] == 1 and [r[0] for r in rows] == sorted({r[0] for r in rows})  # ascending, from 1 step
    for fewest, setting in rows:
        for steps in {fewest, max(fewest, 5) + 1}:
            if solver_setting(method, steps) != setting:
                continue  # the next row starts there
            assert torch.equal(method_timesteps(method, steps),
                               log_snr_timesteps(steps, setting.final_log_snr, family=setting.family))
    assert solver_setting(method, 1000) == rows[-1][1]


def test_final_extrapolation_is_exact_for_a_quadratic_in_sigma_squared():
    """final 3: the last three x0 predictions at log-SNR 2 lambda, a quadratic A + B s + C s^2 in s = e^(-2 lambda)
    = (sigma / alpha)^2, give A exactly; final 1 gives the last prediction."""
    gen = torch.Generator().manual_seed(4)
    a, b, c = (torch.randn([2, 4, 3, 3], generator=gen, dtype=torch.float64) for _ in range(3))
    lambdas = torch.tensor([1.0, 1.9, 3.1], dtype=torch.float64)
    preds = [a + b * s + c * s**2 for s in torch.exp(-2 * lambdas)]
    assert torch.allclose(final_prediction(preds, lambdas, 3), a, rtol=0, atol=1e-12)
    assert torch.equal(final_prediction(preds, lambdas, 1), preds[-1])
    assert torch.equal(final_prediction(preds[-2:], lambdas[-2:], 3), preds[-1])  # too few: the last one


@pytest.mark.parametrize("method", FAST_METHODS)
@pytest.mark.parametrize("steps", [1, 2, 7])
def test_one_evaluation_per_step(method, steps):
    model, calls = counting(gaussian_model(torch.zeros([1, 4, 4, 4], dtype=torch.float64), 0.5))
    x = torch.randn([2, 4, 4, 4], dtype=torch.float64)
    out = sample(model, x, method_timesteps(method, steps).double(), method)
    assert len(calls) == evaluations(method, steps) == steps and out.shape == x.shape
    assert method in METHODS


def test_first_order_dpm_solver_pp_is_ddim():
    x = start_noise(2, (4, 8, 8))
    model = mixture_model(make_mixture(shape=(4, 8, 8)))
    for dtype, tolerance in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        steps = log_snr_timesteps(12, 6.0).to(dtype)
        a = dpmpp_sample(model, x.to(dtype), steps, 1)
        b = ddim_sample(model, x.to(dtype), steps, 0.0)
        assert (a - b).abs().max() <= tolerance * b.abs().max()


def _order(method: str, unipc_order: int | None = None) -> float:
    """Measured order of convergence to an end time t > 0 (log-SNR -10 -> 2) on Gaussian data, from 64 -> 128 steps:
    the error of the x fed to the sampler's last evaluation against the ODE's exact x there."""
    gen = torch.Generator().manual_seed(0)
    mu = torch.randn([1, 4, 8, 8], generator=gen, dtype=torch.float64)
    x = torch.randn([2, 4, 8, 8], generator=gen, dtype=torch.float64)
    errors = []
    for k in (64, 128):
        t = log_snr_to_t(torch.linspace(-10, 2, k + 1, dtype=torch.float64))
        model, seen = counting(gaussian_model(mu, 0.5))
        if unipc_order is None:
            sample(model, x, t, method)
        else:
            unipc_sample(model, x, t, unipc_order)
        exact = gaussian_exact(mu, 0.5, x, t[0], t[-1])
        errors.append(float((seen[-1] - exact).norm() / exact.norm()))
    return math.log2(errors[0] / errors[1])


@pytest.mark.parametrize(("method", "order"), [("ddim", 1), ("dpmpp-2m", 2), ("dpmpp-3m", 3)])
def test_order_of_convergence_on_gaussian_data(method, order):
    assert _order(method) == pytest.approx(order, abs=0.25)


@pytest.mark.parametrize(("unipc_order", "order"), [(2, 3), (3, 4)])
def test_unipc_correction_adds_an_order(unipc_order, order):
    """UniP of order p then UniC: order p + 1 on smooth data (measured 2.80 and 4.26)."""
    assert _order("unipc", unipc_order) == pytest.approx(order, abs=0.3)


@pytest.fixture(scope="module")
def mixture_oracle():
    """A mixture of 8 Gaussians in the latent shape, 2 starting noises, the converged endpoint (1000 float64 steps)."""
    model = mixture_model(make_mixture())
    x = start_noise(2)
    return model, x, converged_endpoint(model, x, 1000)


def test_mixture_oracle_targets(mixture_oracle):
    model, x, reference = mixture_oracle
    assert psnr(converged_endpoint(model, x, 500), reference) > 100  # the endpoint is converged
    counted, calls = counting(model)
    iplms = sample(counted, x, method_timesteps("iplms", 20).double(), "iplms")
    assert len(calls) == 20 and psnr(iplms, reference) >= 45
    assert evaluations(FAST_METHOD, FAST_STEPS) <= 10
    assert psnr(run(model, x, FAST_METHOD, method_timesteps(FAST_METHOD, FAST_STEPS)), reference) >= 40


def test_log_snr_spacing_beats_the_original_timesteps_for_dpm_solver_pp(mixture_oracle):
    """The measurement behind method_timesteps: at 10 evaluations the original's timesteps cost DPM-Solver++(2M)
    well over 10 dB against uniform log-SNR down to log-SNR 6."""
    model, x, reference = mixture_oracle
    original = psnr(run(model, x, "dpmpp-2m", sampling_timesteps(10)), reference)
    log_snr = psnr(run(model, x, "dpmpp-2m", method_timesteps("dpmpp-2m", 10)), reference)
    assert log_snr >= 45 and log_snr - original >= 10


@pytest.mark.parametrize("method", FAST_METHODS)
def test_mixture_distance_falls_with_steps(mixture_oracle, method):
    model, x, reference = mixture_oracle
    db = [psnr(run(model, x, method, method_timesteps(method, k)), reference) for k in (5, 12, 25)]
    assert db[0] < db[1] < db[2], db


@pytest.fixture(scope="module")
def small_network(seed3_dir):
    """The small random-weight network's guided v(x, t) for one prompt, and a starting noise [1, 4, 8, 8]."""
    from ccld_trt.backends.torch_backend import TorchBackend
    from ccld_trt.export.models import ModelFiles, load_networks
    from ccld_trt.pipeline import Request, conditions, draw_noise

    backend = TorchBackend(load_networks(ModelFiles.resolve(seed3_dir)))
    request = Request(prompts=[("a lighthouse at dusk", 3.0)], latent_size=(8, 8), seed=5)
    conds, weights = conditions(backend, request, [])
    return (lambda x, t: backend.unet(x, t, conds, weights)), draw_noise(request).x


@pytest.mark.slow
def test_network_distance_to_a_converged_reference_falls_with_steps(small_network):
    """Random weights: the reference is DPM-Solver++(3M) with 400 steps on the same log-SNR span (the new methods'
    converged endpoint); the new methods approach it as their steps rise."""
    model, x = small_network
    with torch.no_grad():
        reference = sample(model, x, method_timesteps("dpmpp-3m", 400), "dpmpp-3m")
        for method in ("iplms", "dpmpp-2m", "unipc"):
            db = [psnr(sample(model, x, method_timesteps(method, k), method), reference) for k in (5, 10, 25)]
            assert db[0] < db[1] < db[2], (method, db)


def test_fast_flag_selects_the_preset():
    from ccld_trt.cli import build_parser
    from ccld_trt.cli_sample import _sampler_fields

    fast = build_parser().parse_args(["sample", "a cat", "--fast", "--steps", "50"])
    assert _sampler_fields(fast) == {"steps": FAST_STEPS, "method": FAST_METHOD}
    default = build_parser().parse_args(["sample", "a cat"])
    assert _sampler_fields(default) == {"steps": 50, "method": "plms"}


def test_cluster_api_fast_selects_the_preset():
    from ccld_trt.cluster.api import BadRequest, parse_generate

    job = parse_generate(b'{"prompts": ["a cat"], "fast": true, "steps": 50}', 224)
    assert (job.request.method, job.request.steps) == (FAST_METHOD, FAST_STEPS)
    assert parse_generate(b'{"prompts": ["a cat"]}', 224).request.method == "plms"
    with pytest.raises(BadRequest, match="fast must be true or false"):
        parse_generate(b'{"prompts": ["a cat"], "fast": 1}', 224)
    job = parse_generate(b'{"prompts": ["a cat"], "preset": "balanced", "steps": 50}', 224)
    assert (job.request.method, job.request.steps) == ("dpmpp-3m", 15)
    with pytest.raises(BadRequest, match="preset must be one of fast, balanced, got 'slow'"):
        parse_generate(b'{"prompts": ["a cat"], "preset": "slow"}', 224)
    with pytest.raises(BadRequest, match="give one"):
        parse_generate(b'{"prompts": ["a cat"], "preset": "balanced", "fast": true}', 224)


def test_cluster_step_batcher_merges_requests_of_different_methods(seed3_dir):
    """A plms and a unipc request stepping through one StepBatcher: their evaluations merge into shared U-Net calls,
    and each result equals its solo run."""
    import threading

    from ccld_trt.backends.torch_backend import TorchBackend
    from ccld_trt.cluster.batcher import StepBatcher
    from ccld_trt.cluster.rows import UNetCall, run_merged
    from ccld_trt.export.models import ModelFiles, load_networks
    from ccld_trt.pipeline import Request, conditions, draw_noise

    backend = TorchBackend(load_networks(ModelFiles.resolve(seed3_dir)))
    merged_sizes: list[int] = []

    def execute(calls):
        merged_sizes.append(len(calls))
        return run_merged(backend, calls)

    batcher = StepBatcher(execute, lambda call: call.rows, 64, 30.0)
    jobs = [Request(prompts=[("a lighthouse", 3.0)], latent_size=(8, 8), seed=1, steps=3, method="plms"),
            Request(prompts=[("a red barn", 2.0), ("fog", 1.0)], latent_size=(8, 8), seed=2, steps=4, method="unipc")]
    results: list[torch.Tensor | None] = [None, None]
    entered = threading.Barrier(2)

    def run(k: int, merged: bool) -> torch.Tensor:
        conds, weights = conditions(backend, jobs[k], [])
        x = draw_noise(jobs[k]).x

        def model(xx: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            if not merged:
                return backend.unet(xx, t, conds, weights)
            return batcher.evaluate(UNetCall(xx, t, conds, weights))

        with torch.no_grad():
            return sample(model, x, method_timesteps(jobs[k].method, jobs[k].steps), jobs[k].method)

    def work(k: int) -> None:
        with batcher.sampling():
            entered.wait()
            results[k] = run(k, merged=True)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    batcher.close()
    assert max(merged_sizes) == 2  # the two methods' evaluations shared U-Net calls
    for k in range(2):
        solo = run(k, merged=False)
        got = results[k]
        # float32 convolutions of a merged batch differ from solo ones in the last bits; unipc's final extrapolation
        # (weights up to ~1.6 at 4 steps) carries them to ~1e-5
        assert got is not None and float((got - solo).norm() / solo.norm()) < 3e-5


@pytest.fixture(scope="module")
def held_out():
    """The held-out mixtures (none of them chose SOLVER_SETTINGS), 4 noises each, endpoints (1000 float64 steps)."""
    oracles = []
    for case in HELD_OUT_CASES:
        model, x = mixture_model(case.mixture()), case.noise()
        oracles.append((model, x, converged_endpoint(model, x, 1000)))
    return oracles


def _db(oracles, method: str, steps: int) -> list[float]:
    return [psnr(run(model, x, method, method_timesteps(method, steps)), ref) for model, x, ref in oracles]


def test_fast_preset_on_the_held_out_mixtures(held_out):
    """Issue 32: --fast at 7 evaluations, mean >= 42 dB over the held-out mixtures (none of which chose it)."""
    db = _db(held_out, FAST_METHOD, FAST_STEPS)
    assert evaluations(FAST_METHOD, FAST_STEPS) == 7
    assert sum(db) / len(db) >= 42, db


@pytest.mark.parametrize("method", FAST_METHODS)
def test_more_steps_never_cost_more_than_1_db_on_any_held_out_mixture(held_out, method):
    """Issue 32's monotone target: dB at 10, 15 and 20 steps >= dB at 7 minus 1, on every held-out mixture."""
    at_7 = _db(held_out, method, 7)
    for steps in (10, 15, 20):
        db = _db(held_out, method, steps)
        assert all(d >= a - 1 for d, a in zip(db, at_7, strict=True)), (steps, db, at_7)


def test_solver_settings_are_the_committed_tuning_searchs_choice():
    """schedule.SOLVER_SETTINGS is data: solver_tuning.choose over the committed search on the tuning mixtures."""
    from pathlib import Path

    from ccld_trt.benchmarks.solver_tuning import choose, load_scores

    results = Path(__file__).parent.parent / "benchmarks" / "results" / "amd-epyc-2c"
    search = sorted(results.glob("solver-tuning-*.json"))[-1]
    assert choose(load_scores(search)) == SOLVER_SETTINGS

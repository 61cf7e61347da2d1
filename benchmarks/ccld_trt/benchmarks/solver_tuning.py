"""How schedule.SOLVER_SETTINGS was chosen: every candidate setting (spacing family, stop before the final jump,
UniPC order, final jump) of each log-SNR method at each step count, scored on the mixture-of-Gaussians oracles of
solver_oracle.TUNING_CASES only. Per step count the best mean dB wins from the fast preset's step count up; below it
the best worst-mixture dB wins (mean breaks ties), counting each setting as good as its worst neighbour on the stop
grid: with so few steps one spacing can be excellent on most mixtures and collapse on one, and a default must not.
HELD_OUT_CASES never enter here.

``python -m ccld_trt.benchmarks.solver_tuning OUT.json`` reruns the search (~20 minutes on a busy 2-core CPU) and
prints the table to paste into schedule.py; ``... OUT.json BASE.json 5,6`` reruns those step counts only and keeps
BASE's scores for the others. benchmarks/results/amd-epyc-2c/solver-tuning-*.json is the committed search (the
newest applies), and tests/test_solvers.py checks that the table is its choice.
"""

from __future__ import annotations

import itertools
import json
import statistics
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

from ccld_trt.benchmarks.solver_oracle import TUNING_CASES, MixtureCase, converged_endpoint, mixture_model, psnr
from ccld_trt.sampler_names import FAST_STEPS
from ccld_trt.samplers import dpmpp_sample, unipc_sample
from ccld_trt.schedule import SolverSetting, log_snr_timesteps

TUNE_STEPS = (5, 6, 7, 8, 9, 10, 12, 15, 20, 30, 50)
FAMILIES = ("log-snr", "poly-1.5", "poly-2")
STOP_STEP = 0.5
STOPS = tuple(3.0 + STOP_STEP * k for k in range(15))  # log-SNR 3 .. 10
# Below the fast preset's step count the worst-mixture choice sat on the grid's lowest stop (3), so the grid goes on
# down there; ROBUST_BELOW is where the criterion changes (choose).
ROBUST_BELOW = FAST_STEPS
LOW_STOPS = (2.0, 2.5)
VARIANTS: dict[str, tuple[tuple[int, int], ...]] = {  # method -> (order, final) pairs tried
    "dpmpp-2m": ((2, 1), (2, 3)),
    "dpmpp-3m": ((3, 1), (3, 3)),
    "unipc": ((2, 1), (2, 3), (3, 1), (3, 3)),
}


def candidates(method: str, steps: int) -> Iterator[SolverSetting]:
    stops = (LOW_STOPS + STOPS) if steps < ROBUST_BELOW else STOPS
    for (order, final), family, stop in itertools.product(VARIANTS[method], FAMILIES, stops):
        yield SolverSetting(family, stop, order, final)


def run_setting(model, x: torch.Tensor, method: str, setting: SolverSetting, steps: int) -> torch.Tensor:
    """``method`` with ``setting`` (not the table's) over ``steps`` float64 steps from x."""
    t = log_snr_timesteps(steps, setting.final_log_snr, family=setting.family).double()
    if method == "unipc":
        return unipc_sample(model, x.double(), t, setting.order, final=setting.final)
    return dpmpp_sample(model, x.double(), t, setting.order, final=setting.final)


def key(method: str, setting: SolverSetting, steps: int) -> str:
    return f"{method}|{setting.family}|{setting.final_log_snr:g}|{setting.order}|{setting.final}|{steps}"


def score_all(cases: tuple[MixtureCase, ...] = TUNING_CASES,
              step_counts: tuple[int, ...] = TUNE_STEPS) -> dict[str, list[float]]:
    """dB per case of every candidate of every method at every step count."""
    oracles = []
    for case in cases:
        model, x = mixture_model(case.mixture()), case.noise()
        oracles.append((model, x, converged_endpoint(model, x)))
    return {key(method, setting, n): [psnr(run_setting(model, x, method, setting, n), ref)
                                      for model, x, ref in oracles]
            for method in VARIANTS for n in step_counts for setting in candidates(method, n)}


def choose(scores: dict[str, list[float]],
           step_counts: tuple[int, ...] = TUNE_STEPS) -> dict[str, tuple[tuple[int, SolverSetting], ...]]:
    """Per method and step count the candidate with the best mean dB (below ROBUST_BELOW steps: the best minimum
    over the mixtures and over the stops next to its own, then the best mean); rows from the step count on (the
    first from 1 step), consecutive equal settings merged: schedule.SOLVER_SETTINGS' shape."""
    def merit(method: str, setting: SolverSetting, n: int) -> tuple[float, ...]:
        db = scores[key(method, setting, n)]
        if n >= ROBUST_BELOW:
            return (statistics.mean(db),)
        # With so few steps the best minimum can sit on a cliff: half a unit of log-SNR further and one mixture
        # collapses (unipc/5 at poly-2, stop 3: 32 dB worst on the tuning mixtures, 16 on a held-out one). So a
        # setting counts as good as its worst neighbour on the stop grid.
        near = [scores[key(method, other, n)] for other in candidates(method, n)
                if other.family == setting.family and (other.order, other.final) == (setting.order, setting.final)
                and abs(other.final_log_snr - setting.final_log_snr) <= STOP_STEP]
        return (min(min(case) for case in zip(*near, strict=True)), statistics.mean(db))

    table = {}
    for method in VARIANTS:
        rows: list[tuple[int, SolverSetting]] = []
        for i, n in enumerate(step_counts):
            best = max(candidates(method, n), key=lambda s: merit(method, s, n))
            if not rows or rows[-1][1] != best:
                rows.append((1 if i == 0 else n, best))
        table[method] = tuple(rows)
    return table


def load_scores(path: Path) -> dict[str, list[float]]:
    """The scores of a saved search (``main``'s JSON)."""
    return json.loads(path.read_text(encoding="utf-8"))["scores"]


def main(out: str, base: str | None = None, steps: str | None = None) -> None:
    """Search TUNE_STEPS (or the comma-separated ``steps``, the other step counts' scores kept from ``base``)."""
    from ccld_trt.benchmarks.machine import machine_info

    torch.set_num_threads(1)
    info = machine_info("cpu")
    counts = tuple(int(n) for n in steps.split(",")) if steps else TUNE_STEPS
    kept = {}
    if base is not None:
        saved = json.loads(Path(base).read_text(encoding="utf-8"))
        if saved["cases"] != [c.name for c in TUNING_CASES]:
            raise SystemExit(f"{base} scored other tuning mixtures ({saved['cases']}): search all step counts")
        kept = {k: v for k, v in saved["scores"].items() if int(k.rsplit("|", 1)[1]) not in counts}
    scores = kept | {k: [round(db, 3) for db in v] for k, v in score_all(step_counts=counts).items()}
    Path(out).write_text(json.dumps({"machine": f"{info['cpu_model']}, {info['cores']} cores", "date": info["date"],
                                     "cases": [c.name for c in TUNING_CASES], "key": "method|family|stop|order|final"
                                     "|steps", "searched": list(counts), "base": base and Path(base).name,
                                     "scores": scores}, separators=(",", ":")) + "\n", encoding="utf-8")
    for method, rows in choose(scores).items():
        print(f"{method!r}: {rows!r},")


if __name__ == "__main__":
    main(*sys.argv[1:])

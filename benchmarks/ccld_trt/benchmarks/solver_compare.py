"""The project's samplers on their default settings against the best peer setting (k-diffusion, diffusers;
solver_peers) at 5, 7, 10, 15 and 20 evaluations, on the held-out mixture-of-Gaussians oracles
(solver_oracle.HELD_OUT_CASES: none of them chose schedule.SOLVER_SETTINGS), plus the issue-32 checks: monotone in
the steps, and the fast preset's range over every case.

``python -m ccld_trt.benchmarks.solver_compare [OUT_DIR [PEERS.json]]`` writes solver-peers-<UTC time>.{json,md}
under OUT_DIR/<machine>/ (default benchmarks/results) and prints the Markdown (~5-10 minutes on a busy 2-core CPU;
PEERS.json: the peers' scores from an earlier run's JSON "peers" entry, which the project's settings do not change).
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

from ccld_trt.benchmarks.solver_oracle import (
    HELD_OUT_CASES,
    TUNING_CASES,
    MixtureCase,
    converged_endpoint,
    mixture_model,
    psnr,
)
from ccld_trt.benchmarks.solver_peers import best_setting, score_peers
from ccld_trt.sampler_names import FAST_METHOD, FAST_METHODS, FAST_STEPS
from ccld_trt.samplers import evaluations, sample
from ccld_trt.schedule import method_timesteps

COMPARE_STEPS = (5, 7, 10, 15, 20)
MONOTONE_FROM, MONOTONE_TO, MONOTONE_SLACK_DB = 7, (10, 15, 20), 1.0

Scores = dict[str, dict[int, list[float]]]


def project_scores(cases: tuple[MixtureCase, ...], step_counts: tuple[int, ...]) -> Scores:
    """dB per case of each one-evaluation-per-step method on its default timesteps (method_timesteps), float64."""
    scores: Scores = {m: {} for m in FAST_METHODS}
    for case in cases:
        model, x = mixture_model(case.mixture()), case.noise()
        reference = converged_endpoint(model, x)
        for method in FAST_METHODS:
            for n in step_counts:
                out = sample(model, x, method_timesteps(method, n).double(), method)
                scores[method].setdefault(n, []).append(psnr(out, reference))
    return scores


def comparison_rows(project: Scores, peers: Scores, step_counts: tuple[int, ...] = COMPARE_STEPS
                    ) -> list[dict[str, Any]]:
    """Per evaluation count: the project's best default setting and the best peer setting (each the best mean over
    the cases, chosen in hindsight), their mean and minimum dB, and whether the issue's targets hold (mean >= the
    peer's, minimum within 2 dB of the peer's)."""
    rows = []
    for n in step_counts:
        mine = max(project, key=lambda m: statistics.mean(project[m][n]))
        assert evaluations(mine, n) == n
        theirs, their_db = best_setting(peers, n)
        mean, low = statistics.mean(project[mine][n]), min(project[mine][n])
        rows.append({"evaluations": n, "project": mine, "project_mean": mean, "project_min": low,
                     "project_db": project[mine][n], "peer": theirs, "peer_mean": statistics.mean(their_db),
                     "peer_min": min(their_db), "peer_db": their_db,
                     "met": mean >= statistics.mean(their_db) and low >= min(their_db) - 2})
    return rows


def monotone_failures(scores: Scores, names: tuple[str, ...]) -> list[str]:
    """Where a method's dB at 10/15/20 steps falls more than 1 dB below its dB at 7 on a case (empty: none)."""
    return [f"{m} {n} steps on {name}: {scores[m][n][i]:.1f} dB < {scores[m][MONOTONE_FROM][i]:.1f} - 1"
            for m in scores for n in MONOTONE_TO for i, name in enumerate(names)
            if scores[m][n][i] < scores[m][MONOTONE_FROM][i] - MONOTONE_SLACK_DB]


def markdown(result: dict[str, Any]) -> str:
    held, tuning = result["held_out_cases"], result["tuning_cases"]
    lines = [f"## Solvers against k-diffusion and diffusers — {result['machine']}, {result['date']}", "",
             f"Latent PSNR (dB, peak-to-peak 2) against the converged ODE endpoint, 4 starting noises per mixture, "
             f"float64. Scored on the held-out mixtures {', '.join(held)}; schedule.SOLVER_SETTINGS was chosen on "
             f"{', '.join(tuning)} only. Each side's setting is the best mean over the held-out mixtures at that "
             f"evaluation count (chosen in hindsight; {result['peer_settings']} peer settings).", "",
             "| evaluations | project best (default setting) mean / min | best peer setting | peer mean / min | "
             "target met |", "| ---: | --- | --- | --- | --- |"]
    lines += [f"| {r['evaluations']} | {r['project']}: {r['project_mean']:.1f} / {r['project_min']:.1f} | "
              f"{r['peer']} | {r['peer_mean']:.1f} / {r['peer_min']:.1f} | {'yes' if r['met'] else 'NO'} |"
              for r in result["rows"]]
    lines += ["", "Per method on its default settings, held-out mean / min dB:", "",
              "| method | " + " | ".join(str(n) for n in result["step_counts"]) + " |",
              "| --- |" + " --- |" * len(result["step_counts"])]
    for method, per_n in result["held_out"].items():
        lines.append(f"| {method} | " + " | ".join(f"{statistics.mean(per_n[str(n)]):.1f} / "
                                                    f"{min(per_n[str(n)]):.1f}" for n in result["step_counts"]) + " |")
    fast = result["fast"]
    lines += ["", f"Fast preset ({FAST_METHOD}/{FAST_STEPS}): held-out mean {fast['held_out_mean']:.1f} dB "
                  f"(range {fast['held_out_min']:.1f}-{fast['held_out_max']:.1f}); over all "
                  f"{len(held) + len(tuning)} mixtures {fast['all_min']:.1f}-{fast['all_max']:.1f} dB.",
              "", "Monotone (dB at 10/15/20 steps >= dB at 7 minus 1 on every mixture, every method): "
              + ("yes" if not result["monotone_failures"] else "; ".join(result["monotone_failures"]))]
    return "\n".join(lines) + "\n"


def peer_scores(path: Path | None = None) -> Scores:
    """score_peers on the held-out mixtures at COMPARE_STEPS, or the scores saved earlier as JSON at ``path`` (a
    report's "peers" entry, or that entry alone: they do not depend on the project's settings)."""
    if path is None:
        return score_peers(HELD_OUT_CASES, COMPARE_STEPS)
    saved = json.loads(path.read_text(encoding="utf-8"))
    saved = saved.get("peers", saved)
    return {s: {int(n): v for n, v in per_n.items()} for s, per_n in saved.items()}


def measure(log: Any = print, peers_json: Path | None = None) -> dict[str, Any]:
    steps = tuple(sorted({*COMPARE_STEPS, MONOTONE_FROM, *MONOTONE_TO}))
    log("project, held-out mixtures")
    held = project_scores(HELD_OUT_CASES, steps)
    log("project, tuning mixtures (fast preset's range)")
    tuning = project_scores(TUNING_CASES, (FAST_STEPS,))
    log("peers, held-out mixtures")
    peers = peer_scores(peers_json)
    fast_all = held[FAST_METHOD][FAST_STEPS] + tuning[FAST_METHOD][FAST_STEPS]
    return {"held_out_cases": [c.name for c in HELD_OUT_CASES], "tuning_cases": [c.name for c in TUNING_CASES],
            "step_counts": list(COMPARE_STEPS), "peer_settings": len(peers),
            "rows": comparison_rows(held, peers),
            "held_out": {m: {str(n): v for n, v in per_n.items()} for m, per_n in held.items()},
            "fast": {"held_out_mean": statistics.mean(held[FAST_METHOD][FAST_STEPS]),
                     "held_out_min": min(held[FAST_METHOD][FAST_STEPS]),
                     "held_out_max": max(held[FAST_METHOD][FAST_STEPS]),
                     "all_min": min(fast_all), "all_max": max(fast_all)},
            "monotone_failures": monotone_failures(held, tuple(c.name for c in HELD_OUT_CASES)),
            "peers": {s: {str(n): v for n, v in per_n.items()} for s, per_n in peers.items()}}


def main(out_dir: str = "benchmarks/results", peers_json: str | None = None) -> None:
    import warnings

    from ccld_trt.benchmarks.machine import machine_info, machine_slug
    from ccld_trt.export.atomic import write_atomic

    warnings.filterwarnings("ignore", category=DeprecationWarning)  # diffusers' numpy copy= warning per call
    torch.set_num_threads(1)  # thousands of small float64 ops: thread barriers cost more than they give
    info = machine_info("cpu")
    result = {"machine": f"{info['cpu_model']}, {info['cores']} cores (shared with other sessions)",
              "date": info["date"], "machine_info": info,
              **measure(peers_json=Path(peers_json) if peers_json else None)}
    stem = Path(out_dir) / machine_slug(info) / ("solver-peers-" + info["date"].replace(":", "").replace("-", "")
                                                 .split("+")[0])
    stem.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(stem.with_suffix(".json"), json.dumps(result, indent=2) + "\n")
    write_atomic(stem.with_suffix(".md"), markdown(result))
    print(markdown(result))
    print(stem.with_suffix(".md"))


if __name__ == "__main__":
    main(*sys.argv[1:])

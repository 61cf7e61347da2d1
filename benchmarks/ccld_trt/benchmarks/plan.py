"""What a benchmark run measures: the backends and precisions it tries, the workload of each stage, the
variants (backend x precision) of one run, and the order in which their end-to-end repeats interleave."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import torch

from ccld_trt.backend_select import cuda_unavailable_reason
from ccld_trt.benchmarks.backend_names import BACKENDS
from ccld_trt.cpu_features import precision_problem
from ccld_trt.export.errors import UserError
from ccld_trt.pipeline import Request

PROFILED_GRAPHS = ("unet_cfg", "decoder")
GRAPH_BACKENDS = frozenset({"onnxruntime", "openvino", "tensorrt"})  # they run the exported graphs
# What to try per backend and device type (of what backend_select.PRECISIONS says each runs). A combination that
# cannot run here is still tried, so that the report says why it was skipped; one whose precision this CPU has no
# instructions for (cpu_features) is skipped without opening it (BenchConfig.cpu_skips), also with the reason.
PLANNED_PRECISIONS: dict[str, dict[str, tuple[str, ...]]] = {
    "torch": {"cpu": ("fp32", "bf16"), "cuda": ("fp32", "fp16", "bf16")},
    "torch-cudagraph": {"cpu": ("fp16",), "cuda": ("fp32", "fp16")},
    "onnxruntime": {"cpu": ("fp32", "fp16"), "cuda": ("fp32", "fp16")},
    "openvino": {"cpu": ("fp32", "bf16", "int8"), "cuda": ()},  # int8: quantised on first use (minutes, cached)
    "tensorrt": {"cpu": ("fp16",), "cuda": ("fp32", "fp16")},
}
FULL_BATCHES = (1, 4, 16)
FULL_END_TO_END = ((15, 1), (15, 4), (15, 16), (50, 1), (50, 4), (50, 16))
QUICK_BATCHES = (1,)
QUICK_END_TO_END = ((15, 1),)
PROMPT = ("a watercolor painting of a lighthouse at dawn", 3.0)
METHOD = "plms"
LATENT_SIZE = (32, 32)  # the published model's 256x256 images
PLMS_WARMUP_STEPS = 3  # PRK steps before PLMS has the history it needs
# An end-to-end warm-up runs this many steps (PRK and PLMS both run) at the measured n: the first run of a job
# pays for fresh memory (page faults on every new activation buffer, slow in VMs), which stage warm-ups at the
# same shapes do not cover, and a full-length warm-up of 50 steps at n 16 would take minutes on a CPU.
E2E_WARMUP_STEPS = 5


@dataclass(frozen=True)
class Variant:
    """One row group of the report: a backend opened at one precision."""

    backend: str
    precision: str

    @property
    def label(self) -> str:
        return f"{self.backend} {self.precision}"


REFERENCE = Variant("torch", "fp32")


@dataclass(frozen=True)
class BenchConfig:
    """What to measure. ``variants`` (when given) replaces the list derived from ``backends`` and ``device``."""

    backends: tuple[str, ...] = BACKENDS
    device: str = "cpu"
    models: Path | None = None          # None: $CCLD_TRT_MODELS or ./models
    demo_size: str = "full"             # demo weights written when the models directory lacks weights
    weights_cache: Path = Path("build/bench-weights")
    output: Path = Path("benchmarks/results")
    quick: bool = False
    batches: tuple[int, ...] = FULL_BATCHES
    end_to_end: tuple[tuple[int, int], ...] = FULL_END_TO_END  # (steps, n)
    repeats: int = 5
    warmup: int = 2
    e2e_repeats: int = 3                # end-to-end runs take minutes on a CPU; min(repeats, e2e_repeats)
    seed: int = 0
    gemm_seconds: float = 1.0
    variants: tuple[Variant, ...] | None = None
    engine_builds: bool = False         # also build the fp16 TensorRT engines (RTX without a GPU): time and size

    @classmethod
    def preset(cls, quick: bool = False, **overrides: Any) -> BenchConfig:
        """The full run, or with ``quick`` batch 1 and one end-to-end run (15 steps, 1 image) per variant, a
        few minutes on a small CPU. Overrides that are None keep the preset's value (CLI flags not given)."""
        base = cls(quick=True, batches=QUICK_BATCHES, end_to_end=QUICK_END_TO_END, repeats=3, warmup=1,
                   e2e_repeats=1, gemm_seconds=0.5) if quick else cls()
        return replace(base, **{k: v for k, v in overrides.items() if v is not None})

    def validate(self) -> None:
        """UserError naming the first invalid field."""
        if self.repeats < 1:
            raise UserError(f"--repeats must be >= 1, got {self.repeats}")
        if self.e2e_repeats < 1:
            raise UserError(f"--e2e-repeats must be >= 1, got {self.e2e_repeats}")
        if self.warmup < 0:
            raise UserError(f"--warmup must be >= 0, got {self.warmup}")
        if not self.backends and self.variants is None:
            raise UserError("--backends names none")
        unknown = [b for b in self.backends if b not in BACKENDS]
        if unknown:
            raise UserError(f"unknown backend(s) {', '.join(unknown)}; choose from {', '.join(BACKENDS)}")
        if not self.batches or any(b < 1 for b in self.batches):
            raise UserError(f"batches must be positive, got {self.batches}")
        if any(s < 1 or n < 1 for s, n in self.end_to_end):
            raise UserError(f"end-to-end steps and n must be positive, got {self.end_to_end}")
        try:
            device = torch.device(self.device)
        except RuntimeError as e:
            raise UserError(f"unknown device {self.device!r}: use cpu, cuda or cuda:N") from e
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"--device {self.device}: {cuda_unavailable_reason()}")
        if device.type not in ("cpu", "cuda"):
            raise UserError(f"unknown device {self.device!r}: use cpu, cuda or cuda:N")

    def _variants(self) -> tuple[Variant, ...]:
        if self.variants is not None:
            return self.variants
        device_type = torch.device(self.device).type
        return tuple(Variant(b, p) for b in self.backends for p in PLANNED_PRECISIONS[b][device_type])

    def cpu_skips(self) -> list[tuple[Variant, str]]:
        """The variants left out on the CPU because it lacks their precision's instructions (bf16 dot products,
        VNNI), each with why in one line; none on CUDA."""
        if torch.device(self.device).type != "cpu":
            return []
        problems = ((v, precision_problem(v.label, v.precision)) for v in self._variants())
        return [(v, why) for v, why in problems if why]

    def planned_variants(self) -> tuple[Variant, ...]:
        """The variants of ``backends`` on this device type (or the given ``variants``), less cpu_skips."""
        skipped = {v for v, _ in self.cpu_skips()}
        return tuple(v for v in self._variants() if v not in skipped)

    def run_order(self) -> list[Variant]:
        """The planned variants, the reference first (its outputs are what the others are compared with)."""
        return sorted(self.planned_variants(), key=lambda v: v != REFERENCE)

    @property
    def e2e_runs(self) -> int:
        """Timed runs of each end-to-end case per variant."""
        return min(self.repeats, self.e2e_repeats)

    @property
    def stage_measurements(self) -> int:
        """Single-network measurements per variant: both encoders once, U-Net and decoder at every batch."""
        return 2 * len(self.batches) + 2

    @property
    def measurements_per_variant(self) -> int:
        """Progress-bar units of one variant: its stage measurements and its timed end-to-end runs."""
        return self.stage_measurements + len(self.end_to_end) * self.e2e_runs


def bench_request(steps: int, n: int, seed: int) -> Request:
    """The text-only job every end-to-end run and stage input is made from."""
    return Request(prompts=[PROMPT], n=n, seed=seed, steps=steps, method=METHOD, latent_size=LATENT_SIZE)


T = TypeVar("T")


def rotated(order: Sequence[T], round_index: int) -> list[T]:
    """``order`` rotated left by ``round_index`` places (modulo its length): the order of round r of the
    interleaved end-to-end runs, so that a shared machine's slow and fast spells fall on all backends alike."""
    shift = round_index % max(len(order), 1)
    return [*order[shift:], *order[:shift]]

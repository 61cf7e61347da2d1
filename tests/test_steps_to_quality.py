"""``bench --steps-to-quality`` on the small random-weight network: rows, files, and the report's speed ratio."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import torch

from ccld_trt.benchmarks.steps_to_quality import QualityConfig, markdown, measure, write_results
from ccld_trt.sampler_names import FAST_METHOD, FAST_STEPS


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def test_rows_and_files(seed3_dir, tmp_path):
    from ccld_trt.backends.torch_backend import TorchBackend
    from ccld_trt.export.models import ModelFiles, load_networks

    backend = TorchBackend(load_networks(ModelFiles.resolve(seed3_dir)))
    config = QualityConfig(methods=("dpmpp-2m",), step_counts=(3, 12), reference_steps=40, latent_size=(8, 8),
                           extra_cells=(("plms", 3),))
    with torch.no_grad():
        rows, ref_seconds = measure(backend, config, log=lambda _: None)
    assert [(r["method"], r["steps"], r["evaluations"]) for r in rows] == \
        [("dpmpp-2m", 3, 3), ("dpmpp-2m", 12, 12), ("plms", 3, 3 * 4)]
    assert ref_seconds > 0 and all(r["seconds"] > r["sampling_seconds"] > 0 for r in rows)
    # the reference is the converged endpoint: more steps come closer to it
    assert rows[0]["latent_psnr_db"] < rows[1]["latent_psnr_db"]
    assert rows[0]["pixel_psnr_db"] < rows[1]["pixel_psnr_db"]
    result = {"machine": "test CPU", "date": "2026-01-02T03:04:05+00:00", "reference_seconds": ref_seconds,
              "setup": {"backend": "torch fp32 on cpu", "weights": "small random demo weights", "demo": True,
                        "prompt": config.prompt[0], "seed": 0, "reference_steps": 40, "threads": 1},
              "rows": rows}
    paths = write_results(result, tmp_path)
    assert [p.name for p in paths][:2] == ["steps-to-quality-20260102T030405.json",
                                           "steps-to-quality-20260102T030405.md"]
    assert json.loads(paths[0].read_text())["rows"] == rows
    assert "| dpmpp-2m | 12 | 12 |" in paths[1].read_text() and "weak proxy" in paths[1].read_text()


def test_markdown_reports_the_fast_preset_against_plms_50():
    rows = [{"method": m, "steps": k, "evaluations": e, "seconds": s, "sampling_seconds": s - 3.0,
             "latent_psnr_db": 30.0, "pixel_psnr_db": 40.0}
            for m, k, e, s in ((FAST_METHOD, FAST_STEPS, FAST_STEPS, 5.0), ("plms", 50, 59, 17.5))]
    result = {"machine": "m", "date": "d", "reference_seconds": 1.0, "rows": rows,
              "setup": {"backend": "b", "weights": "w", "demo": False, "prompt": "p", "seed": 0,
                        "reference_steps": 400, "threads": 2}}
    text = markdown(result)
    assert "3.50x faster end to end (5.00 s against 17.50 s)" in text and "weak proxy" not in text
    assert "Sampling alone: 7.25x (2.00 s against 14.50 s)" in text

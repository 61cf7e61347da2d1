"""scripts/gpu_check.py on the CPU: its token table, its report, and a short dry run of its steps."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest
import torch

from ccld_trt.image_prompt import parse_prompt
from ccld_trt.tokenizer import tokenize

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_token_table_is_the_tokenizer_on_every_e2e_prompt(gpu_check, e2e_cases):
    prompts = sorted({parse_prompt(p)[0] for case in e2e_cases.values() for p in case["prompt_list"]})
    assert prompts == sorted(gpu_check.TOKEN_IDS)
    assert torch.equal(gpu_check.table_tokenize(prompts), tokenize(prompts))


def test_pytest_junit_summary(gpu_check, tmp_path):
    xml = tmp_path / "pytest.xml"
    xml.write_text('<testsuites><testsuite tests="4" failures="1" errors="0" skipped="1">'
                   '<testcase classname="tests.test_x" name="test_a"><failure message="boom"/></testcase>'
                   '</testsuite></testsuites>')
    c = gpu_check.pytest_check(xml, 1, dry_run=False)
    assert c["status"] == "FAIL"
    assert c["summary"].startswith("2 passed, 1 failed, 0 errors, 1 skipped (exit status 1): tests.test_x.test_a")
    xml.write_text('<testsuites><testsuite tests="2" failures="0" errors="0" skipped="2"/></testsuites>')
    assert gpu_check.pytest_check(xml, 0, dry_run=False)["status"] == "FAIL"  # on a GPU, all skipped is wrong
    assert gpu_check.pytest_check(xml, 0, dry_run=True)["status"] == "PASS"
    assert gpu_check.pytest_check(xml, None, dry_run=False)["status"] == "SKIP"


def test_cpu_dry_run_reproduces_a_golden_case_and_reports(gpu_check, tmp_path, capsys):
    parts, out = tmp_path / "parts", tmp_path / "results"
    dry = ["--parts", str(parts), "--cpu-dry-run"]
    assert gpu_check.main(["e2e", *dry, "--cases", "e2e_ddpm", "--modes", "fp32,fp32-graph"]) == 0
    assert gpu_check.main(["latency", *dry, "--modes", "fp32"]) == 0
    # eager only: compiling takes CPU minutes (the compiled path has its own tests in test_compiled.py)
    assert gpu_check.main(["compiled", *dry, "--modes", "fp32,fp16-graph"]) == 0
    # the env step is left out: the report must say so, and fail
    assert gpu_check.main(["report", *dry, "--output", str(out), "--rc", "env=124"]) == 1
    printed = capsys.readouterr().out
    assert "FAIL env: the step wrote no results (timed out; see the log)" in printed
    assert "SKIP e2e fp32-graph: CUDA graphs need a GPU" in printed
    [json_path] = list(out.glob("*-cpu-dry-run/gpu-check-*.json"))
    result = json.loads(json_path.read_text())
    checks = {c["check"]: c for c in result["checks"]}
    assert [c["check"] for c in result["checks"]] == ["env", "pytest -m gpu", "e2e fp32", "e2e fp32-graph",
                                                      "latency", "compiled fp32"]
    [case] = checks["e2e fp32"]["cases"]
    assert checks["e2e fp32"]["status"] == "PASS" and case["case"] == "e2e_ddpm"
    assert case["latents_rel"] < 1e-5 and case["pixels_max_diff"] <= 1  # the CPU fp32 run is the golden run
    assert checks["latency"]["status"] == "PASS"
    rows = {(r["stage"], r["mode"]): r for r in result["latency"]["rows"]}
    assert set(rows) == {("unet_cfg", "fp32"), ("decoder", "fp32"), ("decoder", "bf16")}
    assert all(0 < r["min_ms"] <= r["median_ms"] for r in rows.values())
    assert checks["compiled fp32"]["status"] == "PASS"
    [row] = result["compiled"]["rows"]  # the reference mode: its own figures are exact
    assert row["mode"] == "fp32" and row["latents_rel"] == 0 and row["psnr_db"] == float("inf")
    assert set(row["plms"]) == {"conditioning", "sampling", "decoding", "total"}
    md = json_path.with_suffix(".md").read_text()
    assert "| e2e fp32 | PASS |" in md and "| unet_cfg | fp32 | 1 |" in md
    assert "## Eager, CUDA graph, torch.compile" in md and "| fp32 | " in md

"""heap.reuse_freed_memory: a torch process on the CPU reuses freed blocks instead of faulting them in again
(issue 30: a torch ``sample`` spent ~2 s of system time on page faults of its intermediate tensors)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ccld_trt.heap import is_glibc

# Runs a chain of four 3x3 convolutions on a [1, 64, 256, 256] tensor (16 MiB activations, as the decoder's) eight
# times and prints the page faults of the last three runs; with argv[1] == "reuse", after heap.reuse_freed_memory().
_PROBE = """
import json, resource, sys
import torch
if sys.argv[1] == "reuse":
    from ccld_trt.heap import reuse_freed_memory
    assert reuse_freed_memory()
weight = torch.ones(64, 64, 3, 3) / 576
faults = []
for _ in range(8):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.ones(1, 64, 256, 256)
    for _ in range(4):
        x = torch.nn.functional.conv2d(x, weight, padding=1)
    del x
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps(faults[-3:]))
"""


def _repeat_faults(mode: str) -> list[int]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}  # glibc's own switches for the same
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, env=env, timeout=120,
                         check=True).stdout
    faults: list[int] = json.loads(out)
    return faults


@pytest.mark.skipif(not is_glibc(), reason="the setting is glibc's mallopt")
def test_a_freed_block_is_reused_not_faulted_in_again() -> None:
    plain = _repeat_faults("plain")
    if min(plain) < 4096:  # a run's fresh 16 MiB blocks are 4096 pages each: huge pages fault 2 MiB at once
        pytest.skip(f"a run faulted only {min(plain)} times here (huge pages?): nothing to compare with")
    reused = _repeat_faults("reuse")
    assert max(reused) < 256, (plain, reused)  # the pages are mapped already: at most a few stray faults


def test_the_torch_backend_makes_the_setting_on_the_cpu(monkeypatch: pytest.MonkeyPatch, seed3_dir: Path) -> None:
    from ccld_trt.backends import torch_backend
    from ccld_trt.export.models import ModelFiles, load_networks

    calls: list[Any] = []
    monkeypatch.setattr(torch_backend, "reuse_freed_memory", lambda: calls.append(True))
    torch_backend.TorchBackend(load_networks(ModelFiles.resolve(seed3_dir)), "cpu", "fp32")
    assert calls == [True]

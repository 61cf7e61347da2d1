"""OpenVINO and ONNX Runtime are imported without their usage telemetry (export.quiet_imports): nothing written
under the home directory, no telemetry module loaded; NNCF imported afterwards stays quiet too."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ccld_trt.export.quiet_imports import import_onnxruntime

_PROBE = """
import json, sys
from ccld_trt.export import quiet_imports
module = getattr(quiet_imports, sys.argv[1])()
works = {"import_openvino": lambda m: "CPU" in m.Core().available_devices,
         "import_onnxruntime": lambda m: "CPUExecutionProvider" in m.get_available_providers()}[sys.argv[1]]
quiet = getattr(quiet_imports, sys.argv[1])() is module and works(module)
if sys.argv[1:] == ["import_openvino", "nncf"]:  # quantize's order: NNCF takes its telemetry stub too
    from nncf.telemetry import wrapper
    quiet = quiet and isinstance(wrapper.telemetry, wrapper.NNCFTelemetryStub)
print(json.dumps([quiet, sorted(name for name, m in sys.modules.items() if m is not None)]))
"""
# What each library's telemetry reads to stay quiet by itself (a CI machine, its own unit tests, the opt-out, which
# tests/conftest.py sets in the test process): not passed on, so that a run shows what the package's import does on
# a user's machine. A plain import there writes ~/intel/openvino_ga_cid or ~/.cache/Microsoft/DeveloperTools/
# .onnxruntime/deviceid and tries to upload (seen by hand; not done here, as a test must not phone home)
QUIETING = {"CI", "TF_BUILD", "JENKINS_URL", "GITHUB_ACTIONS", "GITLAB_CI", "CIRCLECI", "TRAVIS", "BUILDKITE",
            "TEAMCITY_VERSION", "CODEBUILD_BUILD_ID", "ORT_RUNNING_UNIT_TESTS", "ORT_DISABLE_TELEMETRY"}


def _home_after(code: list[str], tmp_path: Path) -> tuple[list[str], Path]:
    """Run ``python -c *code`` with a fresh home directory; (its stdout lines, the home directory)."""
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in QUIETING}
    done = subprocess.run([sys.executable, "-c", *code], env={**env, "HOME": str(home)}, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.splitlines(), home


@pytest.mark.parametrize("args", [["import_openvino"], ["import_openvino", "nncf"], ["import_onnxruntime"]])
def test_the_package_imports_it_without_telemetry(args: list[str], tmp_path: Path) -> None:
    out, home = _home_after([_PROBE, *args], tmp_path)
    quiet, modules = json.loads(out[-1])
    assert quiet
    assert not [m for m in modules if m.startswith("openvino_telemetry")]
    assert not any(home.iterdir())


def test_a_users_own_onnxruntime_setting_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ORT_DISABLE_TELEMETRY", "0")
    import_onnxruntime()
    assert os.environ["ORT_DISABLE_TELEMETRY"] == "0"
    monkeypatch.delenv("ORT_DISABLE_TELEMETRY")
    import_onnxruntime()
    assert os.environ["ORT_DISABLE_TELEMETRY"] == "1"


_PLAIN_AFTER_QUIET = """
import json, sys
from ccld_trt.export.quiet_imports import quiet_telemetry
quiet_telemetry()
import nncf, onnxruntime, openvino
print(json.dumps(sorted(name for name, m in sys.modules.items() if m is not None)))
"""


def test_plain_imports_after_quiet_telemetry_stay_quiet(tmp_path: Path) -> None:
    """What tests/conftest.py relies on: after ``quiet_telemetry()``, even plain imports of all three start nothing."""
    out, home = _home_after([_PLAIN_AFTER_QUIET], tmp_path)
    assert {"nncf", "onnxruntime", "openvino"} <= set(json.loads(out[-1]))
    assert not [m for m in json.loads(out[-1]) if m.startswith("openvino_telemetry")]
    assert not any(home.iterdir())

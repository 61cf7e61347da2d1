"""OpenVINO and ONNX Runtime, imported without the usage telemetry each starts on its own.

Both phone home from a plain import unless the user opted out: ``import openvino`` writes a client ID and a use
count under ``~/intel`` and forks a process that posts an event to Google Analytics; ``import onnxruntime`` (1.32,
Linux) writes a device ID and an event store under ``~/.cache/Microsoft/DeveloperTools`` and uploads a process
event. A local inference tool that says nothing of it should do neither, on every ``sample`` run, so the package
imports both through here (before NNCF, which imports openvino and the same telemetry itself).
"""

from __future__ import annotations

import os
import sys
from types import ModuleType

# The usage-telemetry package that OpenVINO's model-conversion API and NNCF import if they can (each falls back to a
# stub of its own when it cannot)
_OPENVINO_TELEMETRY = "openvino_telemetry"
# ONNX Runtime's full opt-out where set before its import: no uploader, device ID or event store; a value the
# user set is kept
_ORT_OPT_OUT = "ORT_DISABLE_TELEMETRY"


def quiet_telemetry() -> None:
    """Hold both libraries' telemetry off for this process (ONNX Runtime's for the processes it starts too), before
    either is imported: a None entry for ``openvino_telemetry`` in ``sys.modules`` (unless it was imported already)
    makes its import raise ImportError, the path OpenVINO's model-conversion API and NNCF take when it is not
    installed (they use their own stubs); ``ORT_DISABLE_TELEMETRY=1`` unless the environment sets it. Both importers
    below call it; the test suite calls it first, so that no test's plain import phones home."""
    if _OPENVINO_TELEMETRY not in sys.modules:
        sys.modules[_OPENVINO_TELEMETRY] = None  # type: ignore[assignment]  # the import system's "not importable"
    os.environ.setdefault(_ORT_OPT_OUT, "1")


def import_openvino() -> ModuleType:
    """The ``openvino`` module (ImportError where it is not installed), its telemetry held off (``quiet_telemetry``):
    ``import openvino`` imports its model-conversion API (``openvino.tools.ovc``), which starts the telemetry if
    ``openvino_telemetry`` imports; so does ``import nncf``. Nothing is written, forked or sent, and the rest of
    OpenVINO is as it was."""
    quiet_telemetry()
    import openvino

    return openvino


def import_onnxruntime() -> ModuleType:
    """The ``onnxruntime`` module (ImportError where it is not installed), its telemetry opted out
    (``ORT_DISABLE_TELEMETRY=1`` unless the environment says otherwise; it is read when the library loads, so an
    ONNX Runtime imported earlier by other code keeps whatever it started)."""
    quiet_telemetry()
    import onnxruntime

    return onnxruntime

"""Where an ONNX Runtime graph's time goes: kernel time per op type, from ONNX Runtime's own profiler.

Profiling is a session option, so the graph is opened once more in a profiling session with the backend's
options and providers; the profile file is read and deleted.
"""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ccld_trt.export.quiet_imports import import_onnxruntime


def op_type_times(onnx_file: Path, feed: Mapping[str, np.ndarray], options: Any, providers: Sequence[Any],
                  runs: int = 2) -> list[dict[str, Any]]:
    """Kernel time per op type over ``runs`` runs of ``onnx_file`` on ``feed``, after one warm-up run.

    ``options``: the backend's ``onnxruntime.SessionOptions`` (profiling is switched on here, then off again).
    Returns [{"op": type, "ms": mean kernel ms per run, "share": of all kernel time, "nodes": per run}], the
    most expensive first. Op types are ONNX Runtime's after its graph optimisations (e.g. fused ``QuickGelu``
    for x·sigmoid(x), NCHWc ``ReorderInput``/``ReorderOutput`` layout conversions).
    """
    ort = import_onnxruntime()

    with tempfile.TemporaryDirectory(prefix="ccld-trt-profile-") as tmp:
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "ort")
        try:
            session = ort.InferenceSession(str(onnx_file), options, providers=list(providers))
        finally:
            options.enable_profiling = False
        for _ in range(runs + 1):
            session.run(None, dict(feed))
        events = json.loads(Path(session.end_profiling()).read_text(encoding="utf-8"))
    # Node events carry their start time; only those inside the last ``runs`` model runs count (the first run
    # is the warm-up).
    intervals = sorted((r["ts"], r["ts"] + r["dur"]) for r in events if r.get("name") == "model_run")[-runs:]
    kernel_us: Counter[str] = Counter()
    nodes: Counter[str] = Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") \
                and any(start <= e["ts"] <= end for start, end in intervals):
            kernel_us[e["args"]["op_name"]] += e["dur"]
            nodes[e["args"]["op_name"]] += 1
    total = sum(kernel_us.values()) or 1
    return [{"op": op, "ms": us / runs / 1e3, "share": us / total, "nodes": nodes[op] // runs}
            for op, us in kernel_us.most_common()]

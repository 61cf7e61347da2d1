"""Timestamps of a run's stages, for ``ccld-trt bench --cold-start``: with ``$CCLD_TRT_STAGES`` naming a file,
``mark(stage)`` appends one line ``<stage>\\t<time.time()>`` to it; without it, ``mark`` does nothing.

Wall-clock seconds since the epoch (not ``perf_counter``) so that the parent process that started this one can
subtract the moment it called exec. Only the standard library is imported here: the module is loaded before the
stages it times.
"""

from __future__ import annotations

import os
import time

ENV = "CCLD_TRT_STAGES"


def mark(stage: str) -> None:
    """Record that ``stage`` ended now (a no-op unless $CCLD_TRT_STAGES is set). ``stage``: one line, no tab."""
    path = os.environ.get(ENV)
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(f"{stage}\t{time.time():.6f}\n")

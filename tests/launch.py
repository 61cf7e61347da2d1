"""Start a child with signals inherited as ignored, as a background job of a non-interactive shell passes them on.

A small launcher sets the dispositions, then execs the real command: an ignored signal stays ignored across exec.
(Not ``preexec_fn``: forking a parent that runs threads, as the whole suite's process does, and running Python
before exec crashed the suite once.)
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence

LAUNCH = """
import os, signal, sys
for signum in filter(None, sys.argv[1].split(",")):
    signal.signal(int(signum), signal.SIG_IGN)
os.execv(sys.argv[2], sys.argv[2:])
"""


def ignoring(signals: Iterable[int], argv: Sequence[str]) -> list[str]:
    """``argv`` (its first item a path to an executable) run with ``signals`` ignored from its first instruction."""
    return [sys.executable, "-c", LAUNCH, ",".join(str(int(s)) for s in signals), *argv]

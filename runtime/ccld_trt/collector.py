"""Python's cyclic garbage collector held off while a command starts.

A command's start-up (torch's and the backend's imports, Gradio's page) makes a million or so objects that live
until the process ends. The collector walked them again and again as they were made: 0.25-0.28 s of ``sample``'s
start on a 2-core AMD EPYC (gc.callbacks, openvino bf16), 0.44 s of Gradio's import, and a 0.12 s walk more at the
first collection after. Imports make no garbage worth that: reference counting frees what they drop.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator
from contextlib import contextmanager


@contextmanager
def start_up() -> Iterator[Callable[[], None]]:
    """Run a command's start-up with the collector off; call the yielded ``started()`` where its work begins.

    ``started()`` moves every object then alive into the permanent generation (gc.freeze), which later
    collections skip, and turns the collector back on. When the block ends, all is as before it (the freeze
    undone), so a process that goes on (a test, a library user) collects those objects again. A process whose
    collector was already off, or already frozen by its owner, is left alone.
    """
    ours = gc.isenabled() and gc.get_freeze_count() == 0
    frozen = False
    if ours:
        gc.disable()

    def started() -> None:
        nonlocal frozen
        if ours and not frozen:
            gc.freeze()
            frozen = True
            gc.enable()

    try:
        yield started
    finally:
        if frozen:
            gc.unfreeze()
        if ours:
            gc.enable()

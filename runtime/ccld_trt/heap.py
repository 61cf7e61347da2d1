"""The C heap of a process that runs torch on the CPU: freed blocks kept for later allocations, instead of
unmapped and faulted in again.

glibc's malloc serves every block past its mmap threshold (128 KiB, rising with use to at most 32 MiB) with a
fresh ``mmap`` and unmaps it on free. torch's CPU tensors are such blocks (a U-Net evaluation's activations, the
decoder's 32 MiB feature maps at 256x256), so every evaluation faulted its intermediate tensors in again, page
by page, zeroed by the kernel: a torch ``sample --fast`` took 740 thousand page faults (3 GB) and ~2 s of system
time. Served from the heap instead, they are reused: 190 thousand faults, 0.6 s, and a 12 % faster warm
image (docs/performance.md). OpenVINO and ONNX Runtime keep their own buffers and gain nothing.

This is a process-wide setting (glibc's ``mallopt``, what ``MALLOC_MMAP_MAX_`` and ``MALLOC_TRIM_THRESHOLD_`` set
at start-up); the torch backend makes it on the CPU. The price: freed memory stays with the process (none goes
back until 1 GiB is free at the heap's top), so a server holds about its peak, as it would with jemalloc or
tcmalloc, the allocators PyTorch's CPU tuning guide recommends for the same reason.
"""

from __future__ import annotations

import ctypes
import functools
import os

# glibc's <malloc.h> parameter numbers
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
TRIM_THRESHOLD = 1 << 30  # bytes free at the top of the heap past which it is returned to the system


@functools.cache  # once per process: the setting is the process's
def reuse_freed_memory() -> bool:
    """Make this process's malloc serve large blocks from its heap and keep what is freed (up to TRIM_THRESHOLD at
    its top) for later allocations; True where that was done, False where the C library is not glibc (nothing
    changes there)."""
    if not is_glibc():
        return False
    mallopt = ctypes.CDLL(None).mallopt  # the process's own C library
    # mallopt returns 1 on success
    return bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)) and bool(mallopt(_M_MMAP_MAX, 0))


def is_glibc() -> bool:
    """Whether this process's C library is glibc (whose ``mallopt`` takes these parameters)."""
    try:
        return (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
    except (AttributeError, ValueError, OSError):  # no confstr, or not a GNU system
        return False

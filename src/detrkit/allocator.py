"""glibc malloc settings for a process that allocates and frees large tensors all the time.

On a CPU, PyTorch takes every tensor from ``malloc``. glibc serves a large request with a
fresh ``mmap`` and gives it back to the kernel on ``free`` (or trims the heap top), so each
forward pass of a detector maps, faults in (one page fault per 4 KiB page, each page zeroed by
the kernel) and unmaps its activations again. On DETR-R50 that kernel work took a fifth to
nearly half of the CPU time and made the same forward pass vary by 50 % (docs/benchmarks.md).

The settings below keep freed memory in the process for reuse instead:

* ``M_MMAP_MAX = 0``: no separate mappings; large blocks come from the heap too;
* ``M_TRIM_THRESHOLD`` = 2 GiB (the largest value ``mallopt`` takes): free memory at the top
  of the heap is returned to the kernel only beyond that;
* ``M_TOP_PAD`` = 1 GiB: the heap grows in large steps (address space; pages count as
  resident only once used).

The cost: the process keeps its peak heap size until it exits, instead of shrinking after a
peak. :func:`tune_allocator` is called once when the ``detrkit`` command starts; it does
nothing outside Linux/glibc, and nothing when the user has set the same knobs through the
environment (``MALLOC_MMAP_MAX_``, ``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_TOP_PAD_`` or
``GLIBC_TUNABLES``), which also allows ``MALLOC_MMAP_MAX_=65536`` to restore glibc's default.
"""
from __future__ import annotations

import ctypes
import os
import platform
import sys

# mallopt parameter numbers (glibc malloc.h)
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_MAX = -4

SETTINGS = {  # parameter -> value; each mallopt value is a C int
    M_MMAP_MAX: 0,
    M_TRIM_THRESHOLD: 2**31 - 1,
    M_TOP_PAD: 2**30,
}
ENVIRONMENT = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "GLIBC_TUNABLES")


def tune_allocator() -> bool:
    """Apply :data:`SETTINGS` with glibc's ``mallopt``; True when they were applied."""
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    if any(name in os.environ for name in ENVIRONMENT):
        return False  # the user chose
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return all(mallopt(param, value) == 1 for param, value in SETTINGS.items())

"""Keep glibc from returning every large activation to the kernel between ops.

PyTorch's CPU allocator is plain malloc. A prefill step's activations are many MB each,
above glibc's mmap threshold, so each one is a fresh mmap whose pages fault in and are
zeroed on first touch, then unmapped again: measured at a fifth of a 2,048-token prefill
step of SmolLM2-135M on 2 cores. Raising the mmap and trim thresholds lets freed blocks
be reused from the heap instead.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 << 20  # glibc's upper limit for this setting on 64-bit
TRIM_THRESHOLD_BYTES = 1 << 30
_done = False


def keep_large_blocks() -> bool:
    """Raise glibc's thresholds once per process; False where libc is not glibc."""
    global _done
    if _done:
        return True
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    )
    if not ok:
        logger.debug("mallopt refused the allocator thresholds")
    _done = ok
    return ok

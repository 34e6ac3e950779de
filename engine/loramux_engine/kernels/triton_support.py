"""Whether the Triton kernels (triton_attention.py, triton_lora.py) are used.

Kept apart from the kernels so that deciding never imports triton on a CPU, where the
engine uses its C kernels and never pays for that import.
"""

from __future__ import annotations

import functools


@functools.cache
def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def use_triton(device_type: str) -> bool:
    """The Triton kernels serve CUDA devices, when triton is installed; nothing else."""
    return device_type == "cuda" and triton_importable()

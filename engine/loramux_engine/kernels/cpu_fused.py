"""RMSNorm (with the residual add) and RoPE as one C call each on the CPU (cpu_fused.c).

The runner binds the library to the model's norms and rotary table on a CPU in fp32
(``cpu_gemv_kernel``); the torch code in layers/ stays the reference and the path elsewhere.
"""

from __future__ import annotations

import ctypes

import torch

from loramux_engine.kernels.build import load_library


def _declare(library: ctypes.CDLL) -> None:
    c_ptr, c_int64 = ctypes.c_void_p, ctypes.c_int64
    norm = library.rms_norm
    norm.restype = ctypes.c_int
    norm.argtypes = [c_ptr, c_int64, c_ptr, c_int64, c_ptr, ctypes.c_float]
    norm.argtypes += [c_ptr, c_int64, c_ptr, c_int64, c_int64, c_int64, ctypes.c_int]
    rotary = library.rotary
    rotary.restype = ctypes.c_int
    rotary.argtypes = [c_ptr, c_ptr, c_int64, c_int64, c_int64, c_ptr, c_int64, c_int64]
    rotary.argtypes += [c_int64, c_ptr, c_int64, c_int64, c_int64, ctypes.c_int]


def load() -> ctypes.CDLL | None:
    """The compiled kernels, or None when they cannot be built here (logged once)."""
    return load_library("cpu_fused", _declare)


def _fp32_rows(x: torch.Tensor) -> bool:
    return x.is_cpu and x.dtype == torch.float32 and x.dim() == 2 and x.stride(1) == 1


def rms_norm(
    library: ctypes.CDLL,
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(norm(x + residual), x + residual), or (norm(x), None) without a residual.

    x, residual: [num_tokens, hidden] fp32 rows; weight: [hidden] contiguous.
    """
    num_tokens, hidden = x.shape
    if not _fp32_rows(x) or weight.shape != (hidden,):
        raise ValueError("rms_norm takes fp32 CPU rows of the weight's size")
    out = x.new_empty(num_tokens, hidden)
    if residual is None:
        summed = None
    elif _fp32_rows(residual) and residual.shape == x.shape:
        summed = x.new_empty(num_tokens, hidden)
    else:
        raise ValueError("rms_norm takes a residual of x's shape, fp32 CPU rows")
    status = library.rms_norm(
        x.data_ptr(), x.stride(0),
        None if residual is None else residual.data_ptr(),
        0 if residual is None else residual.stride(0),
        weight.data_ptr(), eps, out.data_ptr(), hidden,
        None if summed is None else summed.data_ptr(), hidden,
        num_tokens, hidden, torch.get_num_threads(),
    )  # fmt: skip
    if status != 0:
        raise RuntimeError(f"rms_norm kernel failed with status {status}")
    return out, summed


def rotary(
    library: ctypes.CDLL,
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    cos_sin: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, k) rotated by each token's position, in place.

    positions: [num_tokens] int64; q: [num_tokens, heads, dim]; k: [num_tokens, kv_heads,
    dim], contiguous heads; cos_sin: [max_positions, 2, dim // 2] fp32, contiguous.
    """
    num_tokens, num_heads, head_dim = q.shape
    if (
        q.dtype != torch.float32
        or k.dtype != torch.float32
        or q.stride(2) != 1
        or k.stride(2) != 1
        or not positions.is_contiguous()
        or positions.dtype != torch.int64
        or not cos_sin.is_contiguous()
        or cos_sin.shape[2] * 2 != head_dim
        or positions.shape[0] != num_tokens
        or k.shape[0] != num_tokens
    ):
        raise ValueError("rotary takes fp32 q and k with contiguous heads and int64 positions")
    status = library.rotary(
        positions.data_ptr(), q.data_ptr(), q.stride(0), q.stride(1), num_heads,
        k.data_ptr(), k.stride(0), k.stride(1), k.shape[1],
        cos_sin.data_ptr(), cos_sin.shape[0], head_dim // 2, num_tokens,
        torch.get_num_threads(),
    )  # fmt: skip
    if status != 0:
        raise RuntimeError(f"rotary kernel failed with status {status} (a position out of range)")
    return q, k

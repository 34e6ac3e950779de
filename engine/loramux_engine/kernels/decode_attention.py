"""The CPU attention kernel (decode_attention.c: decode and prompt tokens), via ctypes.

ctypes releases the GIL during the call. Without a C compiler the engine falls back to
per-sequence SDPA.
"""

from __future__ import annotations

import ctypes

import torch

from loramux_engine.kernels.build import load_library

MAX_GROUP = 16  # query heads per kv head, as in the C source
MAX_CHUNKS = 16  # head_dim / 16


def _declare(library: ctypes.CDLL) -> None:
    fn = library.decode_attention
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 5 + [ctypes.c_float, ctypes.c_int]


def load() -> ctypes.CDLL | None:
    """The compiled kernel, or None when it cannot be built here (logged once)."""
    return load_library("decode_attention", _declare)


def supports(num_heads: int, num_kv_heads: int, head_dim: int) -> bool:
    """Whether the kernel takes this attention shape (else the engine uses SDPA)."""
    if num_heads % num_kv_heads or num_heads // num_kv_heads > MAX_GROUP:
        return False
    return head_dim % 16 == 0 and head_dim // 16 <= MAX_CHUNKS


def decode_attention(
    library: ctypes.CDLL,
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    starts: torch.Tensor,
    lens: torch.Tensor,
    scale: float,
    out: torch.Tensor,
) -> None:
    # q, out: [num_seqs, heads, head_dim] fp32 contiguous;
    # k_cache, v_cache: [kv_heads, cache_rows, head_dim] contiguous; starts, lens: [num_seqs] int64
    tensors = (q, k_cache, v_cache, starts, lens, out)
    if not all(t.is_contiguous() and t.device.type == "cpu" for t in tensors):
        raise ValueError("decode_attention needs contiguous CPU tensors")
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads, cache_rows, _ = k_cache.shape
    status = library.decode_attention(
        q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), out.data_ptr(),
        starts.data_ptr(), lens.data_ptr(),
        num_seqs, num_heads, num_kv_heads, head_dim, cache_rows,
        scale, torch.get_num_threads(),
    )  # fmt: skip
    if status != 0:
        raise RuntimeError(f"decode_attention kernel failed with status {status}")

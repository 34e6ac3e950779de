"""The CPU paged attention kernel (decode_attention.c: decode and prompt tokens), via ctypes.

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
    fn.argtypes = [ctypes.c_void_p] * 7 + [ctypes.c_int64] * 6 + [ctypes.c_float, ctypes.c_int]


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
    block_ids: torch.Tensor,
    table_starts: torch.Tensor,
    lens: torch.Tensor,
    block_size: int,
    scale: float,
    out: torch.Tensor,
) -> None:
    """Each query token against the first ``lens[i]`` keys of its sequence, paged.

    q, out: [num_tokens, heads, head_dim] fp32 contiguous; k_cache, v_cache:
    [kv_heads, num_blocks * block_size, head_dim] contiguous; block_ids: the block
    tables concatenated, int64; table_starts, lens: [num_tokens] int64, token i's table
    is ``block_ids[table_starts[i]:]``. block_size is a power of two.
    """
    tensors = (q, k_cache, v_cache, block_ids, table_starts, lens, out)
    if not all(t.is_contiguous() and t.device.type == "cpu" for t in tensors):
        raise ValueError("decode_attention needs contiguous CPU tensors")
    if block_size < 1 or block_size & (block_size - 1):
        raise ValueError("decode_attention needs a power-of-two block size")
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads, cache_rows, _ = k_cache.shape
    status = library.decode_attention(
        q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), out.data_ptr(),
        block_ids.data_ptr(), table_starts.data_ptr(), lens.data_ptr(),
        num_seqs, num_heads, num_kv_heads, head_dim, cache_rows,
        block_size.bit_length() - 1, scale, torch.get_num_threads(),
    )  # fmt: skip
    if status != 0:
        raise RuntimeError(f"decode_attention kernel failed with status {status}")

"""Paged attention in Triton, for CUDA: every token of a step, prompt or decode, in one launch.

Semantics (those of the CPU kernel, decode_attention.c): for each token i and query
head h, with kv head h // G (G = num_heads / num_kv_heads), the token's block table
T = block_ids[table_starts[i]:] and row(l) = T[l // bs] * bs + l % bs::

    out[i, h] = softmax(scale * K[row(0 .. lens[i] - 1)] @ q[i, h]) @ V[row(0 .. lens[i] - 1)]

A prompt token's ``lens[i]`` is its position + 1, so a chunk is causal and may start
anywhere in its sequence; a decode token's is its sequence's length.

Shape::

    q, out: [num_tokens, num_heads, head_dim]
    k_cache, v_cache: [num_kv_heads, num_blocks * bs, head_dim]
    block_ids: the block tables concatenated; table_starts, lens: [num_tokens] (int64)

Any head_dim (padded to a power of two in registers) and any group size; ``bs`` a power
of two. The tokens of a sequence are consecutive in the step and share their table
start, and two sequences never share one (each has its own slice of ``block_ids``,
whatever blocks they share): the model runner builds the step that way.

Layout of the work: a program takes a tile of up to BLOCK_Q consecutive tokens of one
sequence for one kv head, with the G query heads of the group as rows of one matrix
(BLOCK_Q * G_PAD rows, as in vLLM's unified attention), so each K/V tile it reads
serves every query of the tile; one pass with an online softmax, K/V rows found through
the block table. Tiles start at a sequence's first token in the step and at every
position that is a multiple of BLOCK_Q. The grid has a program per (token, kv head) and
those whose token starts no tile return at once: the launch needs no metadata beyond
the CPU kernel's, no host sync, and its grid depends only on the number of tokens.

Not yet measured on a GPU: the tile sizes are the usual flash-attention starting point,
not tuned, and a long context decoded alone gets only num_kv_heads programs (no split
of the keys across programs).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

BLOCK_M = 64  # rows (tokens x query heads of a group) per program
BLOCK_N = 64  # keys per step of the online softmax
NEG_FLOOR: tl.constexpr = tl.constexpr(-1.0e30)  # masked scores, far below any real one


@triton.jit
def _paged_attention_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    out_ptr,
    block_ids_ptr,
    table_starts_ptr,
    lens_ptr,
    num_tokens,
    scale_log2,  # scale * log2(e): the softmax runs on exp2
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_kh,
    stride_kr,
    stride_vh,
    stride_vr,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
    KV_BLOCK_SIZE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    t = tl.program_id(0)
    kvh = tl.program_id(1)
    start = tl.load(table_starts_ptr + t)
    pos = tl.load(lens_ptr + t) - 1
    prev_start = tl.load(table_starts_ptr + t - 1, mask=t > 0, other=-1)
    if (prev_start == start) & (pos % BLOCK_Q != 0):  # inside a tile another program takes
        return

    # rows: (token t + m // GROUP_PAD, query head kvh * GROUP + m % GROUP_PAD)
    m = tl.arange(0, BLOCK_Q * GROUP_PAD)
    tok = t + m // GROUP_PAD
    g = m % GROUP_PAD
    # the tile: this sequence's tokens up to the next position that is a multiple of BLOCK_Q
    valid = (tok < num_tokens) & (pos % BLOCK_Q + m // GROUP_PAD < BLOCK_Q) & (g < GROUP)
    row_start = tl.load(table_starts_ptr + tok, mask=valid, other=-1)
    valid = valid & (row_start == start)
    row_len = tl.load(lens_ptr + tok, mask=valid, other=0)
    head = kvh * GROUP + g
    d = tl.arange(0, D_PAD)
    d_mask = d < HEAD_DIM
    io_mask = valid[:, None] & d_mask[None, :]
    q = tl.load(
        q_ptr + tok[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
        mask=io_mask,
        other=0.0,
    )
    max_len = tl.max(row_len, axis=0)

    # A finite floor, not -inf: rows with no key yet (pads) stay finite and never store.
    m_i = tl.full([BLOCK_Q * GROUP_PAD], NEG_FLOOR, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_Q * GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([BLOCK_Q * GROUP_PAD, D_PAD], dtype=tl.float32)
    k_base = k_ptr + kvh * stride_kh
    v_base = v_ptr + kvh * stride_vh
    for n0 in range(0, max_len, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_mask = n < max_len
        block = tl.load(block_ids_ptr + start + n // KV_BLOCK_SIZE, mask=n_mask, other=0)
        rows = block * KV_BLOCK_SIZE + n % KV_BLOCK_SIZE
        k = tl.load(  # [D_PAD, BLOCK_N]
            k_base + rows[None, :] * stride_kr + d[:, None],
            mask=n_mask[None, :] & d_mask[:, None],
            other=0.0,
        )
        s = tl.dot(q, k, input_precision=DOT_PRECISION) * scale_log2
        s = tl.where(n[None, :] < row_len[:, None], s, NEG_FLOOR)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(  # [BLOCK_N, D_PAD]
            v_base + rows[:, None] * stride_vr + d[None, :],
            mask=n_mask[:, None] & d_mask[None, :],
            other=0.0,
        )
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    out = acc / tl.maximum(l_i, 1e-30)[:, None]  # no key at all (lens 0): zeros
    tl.store(
        out_ptr + tok[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=io_mask,
    )


def launch_config(
    num_heads: int, num_kv_heads: int, head_dim: int, block_m: int = BLOCK_M
) -> dict[str, int]:
    """The kernel's shape constants: tl.dot wants every dimension at least 16."""
    if num_heads % num_kv_heads:
        raise ValueError("num_heads must be a multiple of num_kv_heads")
    if block_m < 16 or block_m & (block_m - 1):
        raise ValueError("block_m must be a power of two, at least 16")
    group = num_heads // num_kv_heads
    group_pad = triton.next_power_of_2(group)
    return {
        "HEAD_DIM": head_dim,
        "D_PAD": max(16, triton.next_power_of_2(head_dim)),
        "GROUP": group,
        "GROUP_PAD": group_pad,
        "BLOCK_Q": max(1, block_m // group_pad),
    }


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_ids: torch.Tensor,
    table_starts: torch.Tensor,
    lens: torch.Tensor,
    block_size: int,
    scale: float,
    out: torch.Tensor,
    block_m: int = BLOCK_M,
    block_n: int = BLOCK_N,
) -> None:
    """Each token against the first ``lens[i]`` keys of its sequence (module docstring)."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[0]
    if block_size < 1 or block_size & (block_size - 1):
        raise ValueError("paged_attention needs a power-of-two block size")
    if q.stride(-1) != 1:
        q = q.contiguous()
    if any(t.stride(-1) != 1 for t in (k_cache, v_cache, out)):
        raise ValueError("paged_attention needs head_dim contiguous in the cache and out")
    if num_tokens == 0:
        return
    config = launch_config(num_heads, num_kv_heads, head_dim, block_m)
    _paged_attention_kernel[(num_tokens, num_kv_heads)](
        q, k_cache, v_cache, out, block_ids, table_starts, lens,
        num_tokens, scale * math.log2(math.e),
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        BLOCK_N=block_n,
        KV_BLOCK_SIZE=block_size,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        **config,
    )  # fmt: skip


def paged_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_ids: torch.Tensor,
    table_starts: torch.Tensor,
    lens: torch.Tensor,
    block_size: int,
    scale: float,
) -> torch.Tensor:
    """The same semantics in plain torch, in fp32, returned in q's dtype."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[0]
    keys = torch.arange(int(lens.max()), device=q.device)
    attends = keys[None, :] < lens[:, None]  # [num_tokens, max_len]
    table_at = (table_starts[:, None] + keys[None, :] // block_size).clamp(max=len(block_ids) - 1)
    rows = block_ids[table_at] * block_size + keys[None, :] % block_size
    rows = torch.where(attends, rows, 0)
    unread = ~attends[None, :, :, None]  # row 0 stands in there, whatever it holds
    k = k_cache[:, rows].float().masked_fill(unread, 0.0)  # [kv_heads, tokens, max_len, dim]
    v = v_cache[:, rows].float().masked_fill(unread, 0.0)
    qg = q.float().view(num_tokens, num_kv_heads, num_heads // num_kv_heads, head_dim)
    s = torch.einsum("tkgd,ktld->tkgl", qg, k) * scale
    s = s.masked_fill(~attends[:, None, None, :], float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # a token with no key gets zeros
    o = torch.einsum("tkgl,ktld->tkgd", p, v)
    return o.reshape(num_tokens, num_heads, head_dim).to(q.dtype)

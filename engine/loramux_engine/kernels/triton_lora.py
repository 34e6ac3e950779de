"""Multi-LoRA shrink and expand in Triton, for CUDA: one launch of each per projection per step.

Semantics (lora/ops.py's)::

    y[i] += scale[s[i]] * (x[i] @ A[s[i]].T) @ B[s[i]].T     for every token i with s[i] != 0

Shape::

    x: [num_tokens, in]   y: [num_tokens, out]
    a: [num_slots, max_rank, in]   b_t: [num_slots, max_rank, out]   scale: [num_slots]
    ranks: [num_slots] int32, each slot's rank (0: the slot adapts nothing here)
    tiles: [num_tiles, 3] int32 (slot, start, end): the step's runs of one slot, cut into
    pieces of at most TILE_TOKENS tokens (``tiles``), built once per step

A tile's tokens share one slot, so a program reads that slot's A or B rows once for all
of them (punica's SGMV, vLLM's Triton port); slot 0 tokens are in no tile and cost
nothing. Shrink writes ``h = scale * x @ A[slot, :rank].T`` in fp32 for each tile's tokens,
rank blocks of 16 spread over programs; expand adds ``h @ b_t[slot, :rank]`` into y,
column blocks of y spread over programs. Each program reads its slot's own rank from
``ranks`` (on the device) and does nothing past it, so the grid depends only on the
number of tiles and the pool's max_rank, never on which adapters a step holds: a CUDA
graph captured once serves every mix (engine/cuda_graphs.py). For the same reason a tile
(0, 0, 0), or any tile of slot 0, returns at once: a graph's tile table is padded with
them. Rows of A and B past a slot's rank are zero (the pool's invariant) and are not
read. Deterministic: no atomics, each element of h and y written by one program.

Not yet measured on a GPU: tile sizes are a starting point, and the fused q/k/v and
gate/up launches the issue asks for wait on that measurement.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

TILE_TOKENS = 32  # tokens per tile (rows of each program's matmul; tl.dot wants >= 16)
RANK_BLOCK = 16
BLOCK_K = 64  # input features per step of the shrink
BLOCK_N = 64  # output features per expand program


@triton.jit
def _shrink_kernel(
    x_ptr,
    a_ptr,
    scale_ptr,
    h_ptr,
    tiles_ptr,
    ranks_ptr,
    in_features,
    stride_xt,
    stride_as,
    stride_ar,
    stride_ht,
    BLOCK_T: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    tile = tl.program_id(0)
    slot = tl.load(tiles_ptr + tile * 3).to(tl.int64)
    rank = tl.load(ranks_ptr + slot)
    r0 = tl.program_id(1) * BLOCK_R
    if r0 >= rank:  # slot 0, a padding tile, or ranks this slot does not have
        return
    start = tl.load(tiles_ptr + tile * 3 + 1)
    end = tl.load(tiles_ptr + tile * 3 + 2)
    t = start + tl.arange(0, BLOCK_T)
    t_mask = t < end
    r = r0 + tl.arange(0, BLOCK_R)
    r_mask = r < rank
    k = tl.arange(0, BLOCK_K)
    a_base = a_ptr + slot * stride_as
    acc = tl.zeros([BLOCK_T, BLOCK_R], dtype=tl.float32)
    for k0 in range(0, in_features, BLOCK_K):
        kk = k0 + k
        k_mask = kk < in_features
        xs = tl.load(  # [BLOCK_T, BLOCK_K]
            x_ptr + t[:, None] * stride_xt + kk[None, :],
            mask=t_mask[:, None] & k_mask[None, :],
            other=0.0,
        )
        a_t = tl.load(  # [BLOCK_K, BLOCK_R]
            a_base + r[None, :] * stride_ar + kk[:, None],
            mask=r_mask[None, :] & k_mask[:, None],
            other=0.0,
        )
        acc += tl.dot(xs, a_t, input_precision=DOT_PRECISION)
    acc = acc * tl.load(scale_ptr + slot).to(tl.float32)
    tl.store(
        h_ptr + t[:, None] * stride_ht + r[None, :], acc, mask=t_mask[:, None] & r_mask[None, :]
    )


@triton.jit
def _expand_kernel(
    h_ptr,
    b_ptr,
    y_ptr,
    tiles_ptr,
    ranks_ptr,
    out_features,
    stride_ht,
    stride_bs,
    stride_br,
    stride_yt,
    BLOCK_T: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    tile = tl.program_id(0)
    slot = tl.load(tiles_ptr + tile * 3).to(tl.int64)
    rank = tl.load(ranks_ptr + slot)
    if rank == 0:  # slot 0, a padding tile, or a slot that does not adapt this projection
        return
    start = tl.load(tiles_ptr + tile * 3 + 1)
    end = tl.load(tiles_ptr + tile * 3 + 2)
    t = start + tl.arange(0, BLOCK_T)
    t_mask = t < end
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < out_features
    b_base = b_ptr + slot * stride_bs
    acc = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
    for r0 in range(0, rank, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        r_mask = r < rank
        hs = tl.load(  # [BLOCK_T, BLOCK_R] fp32
            h_ptr + t[:, None] * stride_ht + r[None, :],
            mask=t_mask[:, None] & r_mask[None, :],
            other=0.0,
        )
        bs = tl.load(  # [BLOCK_R, BLOCK_N]
            b_base + r[:, None] * stride_br + n[None, :],
            mask=r_mask[:, None] & n_mask[None, :],
            other=0.0,
        )
        acc += tl.dot(hs.to(bs.dtype), bs, input_precision=DOT_PRECISION)
    y_ptrs = y_ptr + t[:, None] * stride_yt + n[None, :]
    y_mask = t_mask[:, None] & n_mask[None, :]
    ys = tl.load(y_ptrs, mask=y_mask, other=0.0)
    tl.store(y_ptrs, (ys.to(tl.float32) + acc).to(y_ptr.dtype.element_ty), mask=y_mask)


def tile_list(segments: Sequence[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """(slot, start, end) runs cut into pieces of at most TILE_TOKENS tokens."""
    return [
        (slot, lo, min(lo + TILE_TOKENS, end))
        for slot, start, end in segments
        for lo in range(start, end, TILE_TOKENS)
    ]


def tiles(segments: Sequence[tuple[int, int, int]], device: torch.device | str) -> torch.Tensor:
    """The kernels' work list [num_tiles, 3] int32 on the device (``tile_list``)."""
    return torch.tensor(tile_list(segments), dtype=torch.int32).view(-1, 3).to(device)


def add_lora(
    y: torch.Tensor,
    x: torch.Tensor,
    a: torch.Tensor,
    b_t: torch.Tensor,
    scale: torch.Tensor,
    ranks: torch.Tensor,
    work: torch.Tensor,
) -> None:
    """y += each tile's LoRA delta, in place (module docstring); ``work`` from ``tiles``.

    Launches depend on shapes only (tiles, max_rank, features): no host sync, capturable.
    """
    max_rank = a.shape[1]
    if max_rank == 0 or work.shape[0] == 0:
        return
    if x.stride(-1) != 1:
        x = x.contiguous()
    if any(t.stride(-1) != 1 for t in (y, a, b_t)):
        raise ValueError("add_lora needs the feature dimension of y, a and b_t contiguous")
    num_tiles = work.shape[0]
    in_features, out_features = x.shape[1], y.shape[1]
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    # Columns past a tile's slot rank are never written and never read.
    h = torch.empty(x.shape[0], max_rank, dtype=torch.float32, device=x.device)
    _shrink_kernel[(num_tiles, triton.cdiv(max_rank, RANK_BLOCK))](
        x, a, scale, h, work, ranks, in_features,
        x.stride(0), a.stride(0), a.stride(1), h.stride(0),
        BLOCK_T=TILE_TOKENS, BLOCK_R=RANK_BLOCK, BLOCK_K=BLOCK_K, DOT_PRECISION=precision,
    )  # fmt: skip
    _expand_kernel[(num_tiles, triton.cdiv(out_features, BLOCK_N))](
        h, b_t, y, work, ranks, out_features,
        h.stride(0), b_t.stride(0), b_t.stride(1), y.stride(0),
        BLOCK_T=TILE_TOKENS, BLOCK_R=RANK_BLOCK, BLOCK_N=BLOCK_N, DOT_PRECISION=precision,
    )  # fmt: skip

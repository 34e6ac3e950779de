"""Grouped-query attention over the paged KV cache.

The cache is blocks of rows (engine/kv_cache.py); a sequence's keys and values are the
rows its block table names. New keys/values are written by row first, then every
sequence attends over its own rows: on a CPU in fp32 every token in one call of the C
kernel, which follows the block tables itself (a prompt token is a query over its own
prefix; measured at a quarter of the time of per-prompt SDPA on 2,048-token prefill
steps); on CUDA every token in one launch of the Triton kernel
(kernels/triton_attention.py, same semantics), when triton is installed; else through
SDPA over each sequence's rows gathered by index.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from loramux_engine.kernels.decode_attention import decode_attention
from loramux_engine.kernels.triton_support import use_triton
from loramux_engine.utils.context import AttentionSegment, get_context

Backend = Literal["cpu_kernel", "triton", "sdpa"]


def attention_backend(device_type: str, cpu_kernel_loaded: bool) -> Backend:
    """The CPU kernel on a CPU when it loaded for this shape and dtype, Triton on CUDA when
    triton is installed, else SDPA. The first two read the per-token block tables."""
    if device_type == "cpu" and cpu_kernel_loaded:
        return "cpu_kernel"
    if use_triton(device_type):
        return "triton"
    return "sdpa"


class Attention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = head_dim**-0.5
        # k_cache, v_cache: [num_kv_heads, num_blocks * block_size, head_dim], bound by the
        # runner with the block size
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)
        self.block_size = 0
        self.decode_kernel: ctypes.CDLL | None = None  # bound by the runner on CPU, fp32
        # triton_attention.paged_attention, bound by the runner on CUDA
        self.triton_kernel: Callable[..., None] | None = None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # q: [num_tokens, heads, head_dim]; k, v: [num_tokens, kv_heads, head_dim]
        context = get_context()
        self.k_cache.index_copy_(1, context.cache_positions, k.transpose(0, 1))
        self.v_cache.index_copy_(1, context.cache_positions, v.transpose(0, 1))
        out = torch.empty_like(q)
        if self.decode_kernel is not None:  # every token, prompt or decode, in one call
            decode_attention(
                self.decode_kernel, q.contiguous(), self.k_cache, self.v_cache,
                context.block_ids, context.token_table_starts, context.token_kv_lens,
                self.block_size, self.scale, out,
            )  # fmt: skip
        elif self.triton_kernel is not None:  # the same, on CUDA, in one launch
            self.triton_kernel(
                q, self.k_cache, self.v_cache,
                context.block_ids, context.token_table_starts, context.token_kv_lens,
                self.block_size, self.scale, out,
            )  # fmt: skip
        else:
            for seg in context.segments:
                out[seg.query_start : seg.query_end] = self._sdpa(q, seg)
        # -> [num_tokens, heads * head_dim]
        return out.view(q.shape[0], self.num_heads * self.head_dim)

    def _sdpa(self, q: torch.Tensor, seg: AttentionSegment) -> torch.Tensor:
        num_queries = seg.query_end - seg.query_start
        num_keys = seg.kv_rows.numel()
        qs = q[seg.query_start : seg.query_end].transpose(0, 1).unsqueeze(0)
        ks = self.k_cache.index_select(1, seg.kv_rows).unsqueeze(0)
        vs = self.v_cache.index_select(1, seg.kv_rows).unsqueeze(0)
        gqa = self.num_heads != self.num_kv_heads
        if num_queries == 1:  # decode
            o = F.scaled_dot_product_attention(qs, ks, vs, scale=self.scale, enable_gqa=gqa)
        elif num_queries == num_keys:  # whole prompt
            o = F.scaled_dot_product_attention(
                qs, ks, vs, is_causal=True, scale=self.scale, enable_gqa=gqa
            )
        else:  # a later chunk of a prompt: causal, aligned to the last key
            mask = torch.ones(num_queries, num_keys, dtype=torch.bool, device=q.device).tril(
                num_keys - num_queries
            )
            o = F.scaled_dot_product_attention(
                qs, ks, vs, attn_mask=mask, scale=self.scale, enable_gqa=gqa
            )
        # [1, heads, num_queries, head_dim] -> [num_queries, heads, head_dim]
        return o.squeeze(0).transpose(0, 1)

"""Fused elementwise kernels in Triton, for CUDA: RMSNorm with the residual add, SiLU-and-
multiply, and RoPE, each one launch where torch takes several (RMSNorm alone is eight:
cast, square, mean, add, rsqrt, multiply, cast, multiply), each beside its torch reference.

Every kernel rounds where the torch code it replaces rounds (layers/layernorm.py,
activation.py, rotary_embedding.py), so the results differ from it only by the order of a
sum or a fused multiply-add in the last bits:

- ``rms_norm``: ``r = x + residual`` in x's dtype (the residual stream), then
  ``weight * (r * rsqrt(mean(r^2) + eps)).to(dtype)`` with the statistics in fp32;
- ``silu_and_mul``: ``silu(gate)`` in fp32, rounded to the dtype, times ``up``;
- ``rotary``: LLaMA's rotate-half RoPE in fp32 from the ``cos_sin`` table, rounded.

Shape::

    rms_norm: x, residual, out: [num_tokens, hidden]; weight: [hidden]
    silu_and_mul: gate, up, out: [num_tokens, intermediate]
    rotary: positions: [num_tokens]; q: [num_tokens, heads, head_dim];
            k: [num_tokens, kv_heads, head_dim]; cos_sin: [max_len, 2, head_dim // 2] fp32

One program per token (a row of up to 8,192 features fits one block; rotary takes every
head of a token at once), or per token and column block for SiLU. Grids depend on shapes
only: no host sync, capturable in a CUDA graph. Not yet measured on a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

SILU_BLOCK = 1024


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    residual_ptr,
    weight_ptr,
    out_ptr,
    residual_out_ptr,
    hidden,
    eps,
    stride_x,
    stride_r,
    stride_o,
    stride_ro,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(residual_out_ptr + row * stride_ro + cols, x, mask=mask)
    h = x.to(tl.float32)
    mean_square = tl.sum(h * h, axis=0) / hidden
    h = h * tl.rsqrt(mean_square + eps)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0)
    normed = h.to(x_ptr.dtype.element_ty).to(tl.float32)
    tl.store(
        out_ptr + row * stride_o + cols,
        (w.to(tl.float32) * normed).to(out_ptr.dtype.element_ty),
        mask=mask,
    )


@triton.jit
def _silu_and_mul_kernel(
    gate_ptr,
    up_ptr,
    out_ptr,
    width,
    stride_g,
    stride_u,
    stride_o,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < width
    g = tl.load(gate_ptr + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    silu = (g / (1.0 + tl.exp(-g))).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (silu * u).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotate(
    x_ptr,
    out_ptr,
    stride_xt,
    stride_xh,
    stride_ot,
    stride_oh,
    token,
    num_heads,
    cos,
    sin,
    HALF: tl.constexpr,
    HEADS_PAD: tl.constexpr,
    HALF_PAD: tl.constexpr,
):
    heads = tl.arange(0, HEADS_PAD)
    d = tl.arange(0, HALF_PAD)
    mask = (heads < num_heads)[:, None] & (d < HALF)[None, :]
    src = x_ptr + token * stride_xt + heads[:, None] * stride_xh + d[None, :]
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    dst = out_ptr + token * stride_ot + heads[:, None] * stride_oh + d[None, :]
    dtype = out_ptr.dtype.element_ty
    tl.store(dst, (x1 * cos[None, :] - x2 * sin[None, :]).to(dtype), mask=mask)
    tl.store(dst + HALF, (x2 * cos[None, :] + x1 * sin[None, :]).to(dtype), mask=mask)


@triton.jit
def _rotary_kernel(
    positions_ptr,
    cos_sin_ptr,
    q_ptr,
    k_ptr,
    q_out_ptr,
    k_out_ptr,
    num_heads,
    num_kv_heads,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_qot,
    stride_qoh,
    stride_kot,
    stride_koh,
    HALF: tl.constexpr,
    HALF_PAD: tl.constexpr,
    HEADS_PAD: tl.constexpr,
    KV_HEADS_PAD: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + token)
    d = tl.arange(0, HALF_PAD)
    table = cos_sin_ptr + pos * 2 * HALF + d
    cos = tl.load(table, mask=d < HALF, other=0.0)
    sin = tl.load(table + HALF, mask=d < HALF, other=0.0)
    _rotate(
        q_ptr, q_out_ptr, stride_qt, stride_qh, stride_qot, stride_qoh, token, num_heads,
        cos, sin, HALF, HEADS_PAD, HALF_PAD,
    )  # fmt: skip
    _rotate(
        k_ptr, k_out_ptr, stride_kt, stride_kh, stride_kot, stride_koh, token, num_kv_heads,
        cos, sin, HALF, KV_HEADS_PAD, HALF_PAD,
    )  # fmt: skip


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(normed, the residual stream): ``x + residual`` with a residual, else x itself."""
    x = _rows(x)
    num_tokens, hidden = x.shape
    out = torch.empty_like(x)
    residual_out = torch.empty_like(x) if residual is not None else x
    if num_tokens:
        res = _rows(residual) if residual is not None else x
        _rms_norm_kernel[(num_tokens,)](
            x, res, weight, out, residual_out, hidden, eps,
            x.stride(0), res.stride(0), out.stride(0), residual_out.stride(0),
            HAS_RESIDUAL=residual is not None,
            BLOCK=triton.next_power_of_2(hidden),
            num_warps=min(16, max(1, triton.next_power_of_2(hidden) // 256)),
        )  # fmt: skip
    return out, residual_out


def rms_norm_ref(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    if residual is not None:
        x = x + residual
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype), x


def silu_and_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    gate, up = _rows(gate), _rows(up)
    num_tokens, width = gate.shape
    out = torch.empty_like(gate)
    if num_tokens:
        _silu_and_mul_kernel[(num_tokens, triton.cdiv(width, SILU_BLOCK))](
            gate, up, out, width, gate.stride(0), up.stride(0), out.stride(0),
            BLOCK=SILU_BLOCK,
        )  # fmt: skip
    return out


def silu_and_mul_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.silu(gate).mul_(up)


def rotary(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, k) rotated by each token's position, as new tensors."""
    q, k = _rows(q), _rows(k)
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    half = head_dim // 2
    if cos_sin.dtype != torch.float32 or not cos_sin.is_contiguous():
        raise ValueError("rotary needs the contiguous fp32 cos_sin table")
    q_out, k_out = torch.empty_like(q), torch.empty_like(k)
    if num_tokens:
        _rotary_kernel[(num_tokens,)](
            positions, cos_sin, q, k, q_out, k_out, num_heads, num_kv_heads,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1),
            q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1),
            HALF=half,
            HALF_PAD=triton.next_power_of_2(half),
            HEADS_PAD=triton.next_power_of_2(num_heads),
            KV_HEADS_PAD=triton.next_power_of_2(num_kv_heads),
        )  # fmt: skip
    return q_out, k_out


def rotary_ref(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    table = cos_sin[positions].unsqueeze(2)
    cos, sin = table[:, 0], table[:, 1]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)

    return rotate(q), rotate(k)

"""The CPU kernels for few-token steps against their torch references: gemv.c (the
projections, LoRA added on top) and cpu_fused.c (RMSNorm with the residual add, RoPE)."""

from __future__ import annotations

import ctypes

import pytest
import torch
import torch.nn.functional as F

from loramux_engine.kernels import cpu_fused, gemv
from loramux_engine.kernels.triton_fused import rotary_ref
from loramux_engine.layers.layernorm import RMSNorm
from loramux_engine.layers.linear import Linear
from loramux_engine.lora.ops import LoRABatch, LoRAStack
from loramux_engine.utils.context import Context, reset_context, set_context


def _library(load: ctypes.CDLL | None) -> ctypes.CDLL:
    if load is None:
        pytest.skip("no C compiler here")
    return load


@pytest.fixture(scope="module")
def gemv_library() -> ctypes.CDLL:
    return _library(gemv.load())


@pytest.fixture(scope="module")
def fused_library() -> ctypes.CDLL:
    return _library(cpu_fused.load())


def _close(got: torch.Tensor, expected: torch.Tensor, in_features: int) -> None:
    # fp32 both ways, summed in another order: differences in the last bits only
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * in_features**0.5)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(("out_features", "in_features"), [(64, 64), (7, 19), (37, 576), (3, 5)])
@pytest.mark.parametrize("num_tokens", [1, 2, 3, 4, 5, 8, 33, 64])
def test_gemv_equals_f_linear(
    gemv_library: ctypes.CDLL, threads: int, out_features: int, in_features: int, num_tokens: int
) -> None:
    gen = torch.Generator().manual_seed(out_features * 100 + in_features + num_tokens)
    weight = torch.randn(out_features, in_features, generator=gen)
    bias = torch.randn(out_features, generator=gen)
    # rows of a wider tensor: the kernel follows x's row stride
    x = torch.randn(num_tokens, in_features + 3, generator=gen)[:, 1 : in_features + 1]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = gemv.gemv(gemv_library, x, weight, bias)
        got_no_bias = gemv.gemv(gemv_library, x, weight, None)
    finally:
        torch.set_num_threads(before)
    _close(got, F.linear(x, weight, bias), in_features)
    _close(got_no_bias, F.linear(x, weight), in_features)


def test_gemv_refuses_more_tokens_than_it_holds(gemv_library: ctypes.CDLL) -> None:
    x, weight = torch.randn(gemv.MAX_TOKENS + 1, 16), torch.randn(8, 16)
    assert not gemv.supports(x, weight)
    with pytest.raises(RuntimeError, match="gemv kernel failed"):
        gemv.gemv(gemv_library, x, weight, None)


def test_gemv_refuses_a_weight_of_another_width(gemv_library: ctypes.CDLL) -> None:
    with pytest.raises(ValueError, match="against a weight"):
        gemv.gemv(gemv_library, torch.randn(2, 16), torch.randn(8, 17), None)
    with pytest.raises(ValueError, match="against a weight"):
        gemv.gemv(gemv_library, torch.randn(2, 16), torch.randn(8, 16), torch.randn(7))


def test_read_sum_reads_every_float(gemv_library: ctypes.CDLL) -> None:
    x = torch.arange(1000, dtype=torch.float32) % 7  # exact in fp32 in any order
    assert gemv.read_sum(gemv_library, x, 2) == float(x.sum())


@pytest.mark.parametrize("cols", [1, 7, 8, 17, 49152])
def test_row_argmax_is_amax_and_argmax(gemv_library: ctypes.CDLL, cols: int) -> None:
    """Greedy sampling's one pass: the maximum as amax gives it (NaN where a row holds
    one), the index of its first occurrence as argmax, over rows with ties, infinities,
    NaN and widths around the vector width."""
    gen = torch.Generator().manual_seed(cols)
    x = torch.randn(8, cols, generator=gen)
    x[1] = torch.randint(0, 3, (cols,), generator=gen).float()  # ties: first occurrence
    x[2, cols // 2] = float("inf")
    x[3, cols - 1] = float("nan")
    x[4] = float("-inf")
    x[5, : cols // 2 + 1] = float("-inf")
    x[6, 0] = float("nan")
    x[7] = x[7].abs().neg()  # all at or below zero
    top, index = gemv.row_argmax(gemv_library, x)
    torch.testing.assert_close(top, x.amax(-1), equal_nan=True)
    finite = torch.isfinite(x.amax(-1))  # where greedy sampling reads the index
    assert index[finite].tolist() == x.argmax(-1)[finite].tolist()
    assert index[1].item() == x[1].argmax().item()
    assert index[2].item() == cols // 2


def _stack(in_features: int, out_features: int, gen: torch.Generator) -> LoRAStack:
    """Slots 1 and 2 with ranks 8 and 3 (slot 0: no adapter), zero-padded to rank 8."""
    a = torch.zeros(3, 8, in_features)
    b_t = torch.zeros(3, 8, out_features)
    stack = LoRAStack(a, b_t, torch.zeros(3))
    for slot, rank, scale in ((1, 8, 2.0), (2, 3, 0.5)):
        a[slot, :rank] = torch.randn(rank, in_features, generator=gen) * 0.1
        b_t[slot, :rank] = torch.randn(rank, out_features, generator=gen) * 0.1
        stack.set_slot(slot, rank, scale)
    return stack


@pytest.mark.parametrize("onednn", [True, False])
@pytest.mark.parametrize("num_tokens", [1, 64, 65, 130])
def test_linear_with_gemv_takes_larger_steps_on_the_same_plain_weight(
    gemv_library: ctypes.CDLL, onednn: bool, num_tokens: int
) -> None:
    gen = torch.Generator().manual_seed(num_tokens)
    layer = Linear(96, 40, True, "o_proj")
    layer.weight.data = torch.randn(40, 96, generator=gen)
    layer.bias.data = torch.randn(40, generator=gen)  # type: ignore[union-attr]
    x = torch.randn(num_tokens, 96, generator=gen)
    expected = F.linear(x, layer.weight, layer.bias)
    weight = layer.weight

    layer.use_gemv(gemv_library, onednn=onednn)
    assert layer.weight is weight and layer.onednn_weight is None  # one copy, kept as is
    _close(layer.matmul(x), expected, 96)


@pytest.mark.parametrize("num_tokens", [1, 3, 8])
def test_linear_through_gemv_adds_lora_on_top(gemv_library: ctypes.CDLL, num_tokens: int) -> None:
    gen = torch.Generator().manual_seed(num_tokens)
    in_features, out_features = 48, 80
    layer = Linear(in_features, out_features, True, "q_proj")
    layer.weight.data = torch.randn(out_features, in_features, generator=gen)
    layer.bias.data = torch.randn(out_features, generator=gen)  # type: ignore[union-attr]
    layer.lora_stack = stack = _stack(in_features, out_features, gen)
    x = torch.randn(num_tokens, in_features, generator=gen)
    slot_ids = [(0, 1, 2)[i % 3] for i in range(num_tokens)]
    expected = F.linear(x, layer.weight, layer.bias)
    for i, slot in enumerate(slot_ids):
        rank = stack.ranks[slot]
        if rank:
            delta = (x[i] @ stack.a[slot, :rank].T) @ stack.b_t[slot, :rank]
            expected[i] += stack.scales[slot] * delta

    layer.use_gemv(gemv_library, onednn=False)
    empty = torch.empty(0, dtype=torch.long)
    set_context(
        Context(
            cache_positions=empty,
            segments=[],
            block_ids=empty,
            token_table_starts=empty,
            token_kv_lens=empty,
            lora_batch=LoRABatch.build(slot_ids, "cpu") if any(slot_ids) else None,
        )
    )
    try:
        got = layer(x)
    finally:
        reset_context()
    assert layer.weight.shape == (out_features, in_features)  # the one plain copy it reads
    _close(got, expected, in_features)


@pytest.mark.parametrize("hidden", [64, 576, 19])
@pytest.mark.parametrize("num_tokens", [1, 2, 5, 40])
def test_fused_rms_norm_equals_torch(
    fused_library: ctypes.CDLL, hidden: int, num_tokens: int
) -> None:
    gen = torch.Generator().manual_seed(hidden + num_tokens)
    norm = RMSNorm(hidden, 1e-5)
    norm.weight.data = torch.randn(hidden, generator=gen)
    x = torch.randn(num_tokens, hidden, generator=gen) * 3
    residual = torch.randn(num_tokens, hidden, generator=gen)
    expected = norm(x)
    expected_added, expected_sum = norm.add_and_norm(x, residual)

    norm.cpu_kernel = fused_library
    torch.testing.assert_close(norm(x), expected, rtol=1e-5, atol=1e-5)
    got_added, got_sum = norm.add_and_norm(x, residual)
    torch.testing.assert_close(got_added, expected_added, rtol=1e-5, atol=1e-5)
    assert torch.equal(got_sum, expected_sum)  # one fp32 add per element, as torch's


def test_fused_rms_norm_refuses_mismatched_rows(fused_library: ctypes.CDLL) -> None:
    with pytest.raises(ValueError, match="residual of x's shape"):
        cpu_fused.rms_norm(
            fused_library, torch.randn(2, 16), torch.randn(16), 1e-5, torch.randn(3, 16)
        )
    with pytest.raises(ValueError, match="the weight's size"):
        cpu_fused.rms_norm(fused_library, torch.randn(2, 16), torch.randn(15), 1e-5)


@pytest.mark.parametrize("head_dim", [64, 38])
@pytest.mark.parametrize("num_tokens", [1, 4, 33])
def test_fused_rotary_equals_torch(
    fused_library: ctypes.CDLL, head_dim: int, num_tokens: int
) -> None:
    gen = torch.Generator().manual_seed(head_dim + num_tokens)
    half = head_dim // 2
    freqs = torch.outer(torch.arange(100, dtype=torch.float32), torch.rand(half, generator=gen))
    cos_sin = torch.stack([freqs.cos(), freqs.sin()], 1).contiguous()
    positions = torch.randint(0, 100, (num_tokens,), generator=gen)
    # q and k as the projections give them: views of [num_tokens, heads * head_dim] rows
    q = torch.randn(num_tokens, 9 * head_dim, generator=gen).view(num_tokens, 9, head_dim)
    k = torch.randn(num_tokens, 3 * head_dim, generator=gen).view(num_tokens, 3, head_dim)
    expected_q, expected_k = rotary_ref(positions, q, k, cos_sin)

    got_q, got_k = cpu_fused.rotary(fused_library, positions, q, k, cos_sin)
    assert got_q is q and got_k is k  # in place
    torch.testing.assert_close(got_q, expected_q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_k, expected_k, rtol=1e-5, atol=1e-5)


def test_fused_rotary_refuses_a_position_beyond_the_table(fused_library: ctypes.CDLL) -> None:
    cos_sin = torch.zeros(10, 2, 8)
    q, k = torch.zeros(1, 2, 16), torch.zeros(1, 1, 16)
    with pytest.raises(RuntimeError, match="out of range"):
        cpu_fused.rotary(fused_library, torch.tensor([10]), q, k, cos_sin)

"""The Triton kernels against their torch references, with or without a GPU.

Each case below runs a kernel and its reference on the same inputs and returns both;
the tests compare them. With CUDA the cases run here, on the compiled kernels. Without
it they run on CPU tensors through Triton's interpreter, which needs TRITON_INTERPRET=1
before triton.language is first imported (its own @jit helpers, tl.max and tl.sum,
are made then) and cannot share a process with compiled kernels: so one subprocess
with the variable set runs every case (``results``), and nothing else in the session
sees it. Whether the kernels compile for a Hopper GPU is checked without one too, in a
second subprocess (the last test).

Triton 3.7.1's interpreter gets bf16 ``tl.dot`` wrong (numpy has no bf16), so the
low-precision cases run in fp16 on CPU and in bf16 on CUDA.
"""

from __future__ import annotations

import functools
import json
import os
import random
import subprocess
import sys
import textwrap
import traceback
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from loramux_engine.kernels import triton_support  # noqa: E402
from loramux_engine.layers.attention import Attention, attention_backend  # noqa: E402
from loramux_engine.lora import ops  # noqa: E402
from loramux_engine.lora.ops import LoRABatch, LoRAStack  # noqa: E402
from loramux_engine.utils.context import Context, reset_context, set_context  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LOW_PRECISION = torch.bfloat16 if DEVICE == "cuda" else torch.float16
Result = dict[str, torch.Tensor]

# -- paged attention ----------------------------------------------------------------------

# (computed tokens, new tokens) per sequence: a whole prompt, decode tokens at 300, 1 and
# a block boundary, later chunks of prompts, and one whose first blocks are another's
STEP = [(0, 37), (299, 1), (0, 1), (100, 30), (16, 1), (5, 20), (64, 9)]
SHARE = {6: 0}  # a prefix-cache hit: sequence 6 holds sequence 0's full blocks


def make_step(
    seqs: list[tuple[int, int]], block_size: int, seed: int, share: dict[int, int] | None = None
) -> tuple[list[list[int]], int, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Block tables in shuffled block order (some shared), and the per-token metadata."""
    rng = random.Random(seed)
    lengths = [start + n for start, n in seqs]
    num_blocks = sum(-(-n // block_size) for n in lengths) + 5  # spare blocks nobody reads
    free = list(range(num_blocks))
    rng.shuffle(free)
    tables = [[free.pop() for _ in range(-(-n // block_size))] for n in lengths]
    for seq, owner in (share or {}).items():
        full = min(lengths[owner], seqs[seq][0]) // block_size
        tables[seq][:full] = tables[owner][:full]
    block_ids: list[int] = []
    table_starts: list[int] = []
    lens: list[int] = []
    for (start, n), table in zip(seqs, tables, strict=True):
        table_starts += [len(block_ids)] * n
        lens += range(start + 1, start + n + 1)
        block_ids += table
    as_tensor = functools.partial(torch.tensor, dtype=torch.long, device=DEVICE)
    return tables, num_blocks, as_tensor(block_ids), as_tensor(table_starts), as_tensor(lens)


def make_cache(
    tables: list[list[int]], lengths: list[int], num_kv_heads: int, head_dim: int,
    num_blocks: int, block_size: int, dtype: torch.dtype, seed: int,
) -> torch.Tensor:  # fmt: skip
    """[num_kv_heads, rows, head_dim]: random where a sequence has a key, NaN elsewhere,
    so that a kernel reading a row it should not turns its output NaN."""
    gen = torch.Generator().manual_seed(seed)
    cache = torch.full((num_kv_heads, num_blocks * block_size, head_dim), float("nan"))
    for table, n in zip(tables, lengths, strict=True):
        rows = [table[i // block_size] * block_size + i % block_size for i in range(n)]
        cache[:, rows] = torch.randn(num_kv_heads, len(rows), head_dim, generator=gen)
    return cache.to(dtype=dtype, device=DEVICE)


def attention_case(
    heads: int, kv_heads: int, head_dim: int, block_size: int, block_m: int, dtype: torch.dtype
) -> Result:
    from loramux_engine.kernels import triton_attention

    seed = heads * 1000 + head_dim + block_size
    tables, num_blocks, block_ids, starts, lens = make_step(STEP, block_size, seed, SHARE)
    lengths = [start + n for start, n in STEP]
    k_cache, v_cache = (
        make_cache(tables, lengths, kv_heads, head_dim, num_blocks, block_size, dtype, s)
        for s in (seed, seed + 1)
    )
    q = torch.randn(len(lens), heads, head_dim, generator=torch.Generator().manual_seed(seed))
    q = q.to(dtype=dtype, device=DEVICE)
    out = torch.full_like(q, float("nan"))
    scale = head_dim**-0.5
    triton_attention.paged_attention(
        q, k_cache, v_cache, block_ids, starts, lens, block_size, scale, out, block_m=block_m
    )
    expected = triton_attention.paged_attention_ref(
        q, k_cache, v_cache, block_ids, starts, lens, block_size, scale
    )
    return {"out": out, "expected": expected, "lens": lens}


def attention_layer_case() -> Result:
    """The layer's Triton branch: new keys/values go to their rows, then every token attends."""
    from loramux_engine.kernels import triton_attention

    heads, kv_heads, head_dim, block_size = 9, 3, 64, 4
    seqs = [(0, 6), (9, 1), (5, 3)]
    tables, num_blocks, block_ids, starts, lens = make_step(seqs, block_size, seed=3)
    lengths = [start + n for start, n in seqs]
    k_cache, v_cache = (
        make_cache(tables, lengths, kv_heads, head_dim, num_blocks, block_size, torch.float32, s)
        for s in (4, 5)
    )
    rows = [
        table[p // block_size] * block_size + p % block_size
        for (start, n), table in zip(seqs, tables, strict=True)
        for p in range(start, start + n)
    ]
    num_tokens = len(rows)
    q = torch.randn(num_tokens, heads, head_dim).to(DEVICE)
    k = torch.randn(num_tokens, kv_heads, head_dim).to(DEVICE)
    v = torch.randn(num_tokens, kv_heads, head_dim).to(DEVICE)
    layer = Attention(heads, kv_heads, head_dim)
    layer.k_cache, layer.v_cache = k_cache.clone(), v_cache.clone()
    layer.block_size = block_size
    layer.triton_kernel = triton_attention.paged_attention
    cache_positions = torch.tensor(rows, dtype=torch.long, device=DEVICE)
    set_context(Context(cache_positions, [], block_ids, starts, lens))
    try:
        out = layer(q, k, v)
    finally:
        reset_context()
    k_cache[:, cache_positions] = k.transpose(0, 1)
    v_cache[:, cache_positions] = v.transpose(0, 1)
    expected = triton_attention.paged_attention_ref(
        q, k_cache, v_cache, block_ids, starts, lens, block_size, head_dim**-0.5
    )
    return {"out": out, "expected": expected.view(num_tokens, -1)}


ATTENTION_CASES = [  # heads, kv_heads, head_dim, block_size, block_m
    (9, 3, 64, 16, 64),  # SmolLM2's shape
    (7, 7, 24, 1, 64),  # odd heads, no grouping, a head_dim that is no power of two
    (5, 1, 20, 4, 16),  # one kv head for five; one token per tile
    (6, 2, 40, 64, 32),
    (12, 4, 16, 2, 64),
    (15, 5, 48, 32, 64),
]

# -- multi-LoRA shrink and expand ---------------------------------------------------------

RANKS = [0, 1, 7, 16, 33, 64, 64]  # per slot; slot 0 is "no adapter"
MAX_RANK = 64
# (slot, tokens) runs: ragged, across the tile size, slot 0 between, slots repeated
RUNS = [(0, 3), (1, 1), (2, 31), (3, 32), (0, 2), (4, 33), (5, 70), (1, 5), (2, 1), (0, 1)]


def make_stack(in_features: int, out_features: int, dtype: torch.dtype) -> LoRAStack:
    gen = torch.Generator().manual_seed(in_features * out_features)
    num_slots = len(RANKS)
    stack = LoRAStack(
        a=torch.zeros(num_slots, MAX_RANK, in_features, dtype=dtype, device=DEVICE),
        b_t=torch.zeros(num_slots, MAX_RANK, out_features, dtype=dtype, device=DEVICE),
        scale=torch.zeros(num_slots, dtype=dtype, device=DEVICE),
    )
    for slot, rank in enumerate(RANKS):
        if rank:  # the pool's invariant: rows past the rank stay zero
            stack.a[slot, :rank] = (torch.randn(rank, in_features, generator=gen) / 4).to(dtype)
            stack.b_t[slot, :rank] = (torch.randn(rank, out_features, generator=gen) / 4).to(dtype)
            stack.set_slot(slot, rank, 0.5 + slot / 4)
    return stack


def as_float(stack: LoRAStack) -> LoRAStack:
    copy = LoRAStack(a=stack.a.float(), b_t=stack.b_t.float(), scale=stack.scale.float())
    for slot, rank in enumerate(stack.ranks):
        copy.set_slot(slot, rank, float(stack.scale[slot]))
    return copy


def lora_case(in_features: int, out_features: int, dtype: torch.dtype) -> Result:
    """lora/ops.py's "triton" branch against its sgmv, in fp32 on the same weights."""
    slot_ids = [slot for slot, n in RUNS for _ in range(n)]
    stack = make_stack(in_features, out_features, dtype)
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(len(slot_ids), in_features, generator=gen).to(dtype=dtype, device=DEVICE)
    y = torch.randn(len(slot_ids), out_features, generator=gen).to(dtype=dtype, device=DEVICE)
    expected = y.float().clone()
    segments = LoRABatch.build(slot_ids, DEVICE, "sgmv").segments
    ops.sgmv(expected, x.float(), as_float(stack), segments)
    before = y.clone()
    batch = LoRABatch.build(slot_ids, DEVICE, "triton", dtype)
    assert batch.kernel == "triton" and batch.tiles is not None
    ops.add_lora(y, x, stack, batch)
    base = torch.tensor([slot == 0 for slot in slot_ids], device=DEVICE)
    return {"out": y.float(), "expected": expected, "base_before": before[base], "base": y[base]}


def lora_hostile_case() -> Result:
    """Weights that overflow to inf in one slot, beside other slots' tokens."""
    slot_ids = [1] * 5 + [2] * 3 + [0] * 2 + [1] * 2
    stack = make_stack(32, 48, torch.float32)
    stack.a[2, :7] = 3e38
    stack.b_t[2, :7] = 3e38
    x = torch.randn(len(slot_ids), 32, device=DEVICE)
    y = torch.zeros(len(slot_ids), 48, device=DEVICE)
    expected = y.clone()
    ops.sgmv(expected, x, make_stack(32, 48, torch.float32), [(1, 0, 5), (1, 10, 12)])
    ops.add_lora(y, x, stack, LoRABatch.build(slot_ids, DEVICE, "triton"))
    others = [i for i, slot in enumerate(slot_ids) if slot != 2]
    return {"out": y[others], "expected": expected[others], "hostile": y[5:8]}


def lora_fixed_case() -> Result:
    """A CUDA graph's batch (engine/cuda_graphs.py): the tile table padded with (0, 0, 0)
    rows to a fixed length, padded tokens on slot 0, weights of slots not in the step."""
    from loramux_engine.kernels import triton_lora

    slot_ids = [3, 3, 0, 5, 1, 1, 1, 6] + [0] * 5  # 8 tokens, then 5 padding rows
    stack = make_stack(40, 72, torch.float32)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(len(slot_ids), 40, generator=gen).to(DEVICE)
    y = torch.randn(len(slot_ids), 72, generator=gen).to(DEVICE)
    expected = y.clone()
    segments = LoRABatch.build(slot_ids, DEVICE, "sgmv").segments
    ops.sgmv(expected, x, stack, segments)
    work = triton_lora.tile_list(segments)
    table = torch.tensor(work + [(0, 0, 0)] * (len(slot_ids) - len(work)), dtype=torch.int32)
    batch = LoRABatch.fixed(torch.tensor(slot_ids, device=DEVICE), table.to(DEVICE))
    assert not batch.empty
    ops.add_lora(y, x, stack, batch)
    return {"out": y, "expected": expected}


def attention_fixed_layout_case() -> Result:
    """A graph's decode rows: tables at a fixed stride, padding rows on a scratch block."""
    from loramux_engine.kernels import triton_attention

    heads, kv_heads, head_dim, block_size, stride = 8, 2, 32, 4, 6
    seqs = [(10, 1), (0, 1), (22, 1), (3, 1)]  # decode tokens at positions 10, 0, 22, 3
    tables, num_blocks, _, _, lens = make_step(seqs, block_size, seed=9)
    scratch = num_blocks  # one block past the others
    lengths = [start + n for start, n in seqs]
    k_cache, v_cache = (
        make_cache(
            tables, lengths, kv_heads, head_dim, num_blocks + 1, block_size, torch.float32, s
        )
        for s in (1, 2)
    )
    k_cache[:, scratch * block_size] = 0.5  # the padding rows' one key
    v_cache[:, scratch * block_size] = 0.25
    num_rows = 7  # 4 tokens, 3 padding rows
    block_ids = torch.full((num_rows, stride), scratch, dtype=torch.long)
    for i, table in enumerate(tables):
        block_ids[i, : len(table)] = torch.tensor(table)
    starts = torch.arange(num_rows) * stride
    all_lens = torch.cat([lens.cpu(), torch.ones(num_rows - len(seqs), dtype=torch.long)])
    block_ids, starts, all_lens = (t.to(DEVICE) for t in (block_ids.view(-1), starts, all_lens))
    q = torch.randn(num_rows, heads, head_dim, generator=torch.Generator().manual_seed(3))
    q = q.to(DEVICE)
    out = torch.full_like(q, float("nan"))
    scale = head_dim**-0.5
    triton_attention.paged_attention(
        q, k_cache, v_cache, block_ids, starts, all_lens, block_size, scale, out
    )
    expected = triton_attention.paged_attention_ref(
        q, k_cache, v_cache, block_ids, starts, all_lens, block_size, scale
    )
    return {"out": out, "expected": expected}


# -- fused elementwise kernels ------------------------------------------------------------


def rms_norm_case(num_tokens: int, hidden: int, residual: bool, dtype: torch.dtype) -> Result:
    from loramux_engine.kernels import triton_fused

    gen = torch.Generator().manual_seed(hidden)
    x = (torch.randn(num_tokens, hidden, generator=gen) * 3).to(dtype=dtype, device=DEVICE)
    res = torch.randn(num_tokens, hidden, generator=gen).to(dtype=dtype, device=DEVICE)
    weight = (torch.rand(hidden, generator=gen) + 0.5).to(dtype=dtype, device=DEVICE)
    args = (x, weight, 1e-5, res if residual else None)
    out, stream = triton_fused.rms_norm(*args)
    expected, expected_stream = triton_fused.rms_norm_ref(*args)
    return {"out": out, "expected": expected, "stream": stream, "expected_stream": expected_stream}


def silu_case(num_tokens: int, width: int, dtype: torch.dtype) -> Result:
    from loramux_engine.kernels import triton_fused

    gen = torch.Generator().manual_seed(width)
    gate = (torch.randn(num_tokens, width, generator=gen) * 4).to(dtype=dtype, device=DEVICE)
    up = torch.randn(num_tokens, width, generator=gen).to(dtype=dtype, device=DEVICE)
    out = triton_fused.silu_and_mul(gate, up)
    return {"out": out, "expected": triton_fused.silu_and_mul_ref(gate, up)}


def rotary_case(heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> Result:
    from loramux_engine.kernels import triton_fused
    from loramux_engine.layers.rotary_embedding import RotaryEmbedding, rope_inv_freq

    rope = RotaryEmbedding(rope_inv_freq(head_dim, 10000.0, {}, 300, 300), 300).to(DEVICE)
    gen = torch.Generator().manual_seed(head_dim)
    positions = torch.tensor([0, 1, 299, 17, 17, 5, 128], device=DEVICE)
    q = torch.randn(len(positions), heads * head_dim, generator=gen).to(dtype=dtype, device=DEVICE)
    kv = torch.randn(len(positions), 2 * kv_heads * head_dim, generator=gen)
    k = kv.to(dtype=dtype, device=DEVICE)[:, : kv_heads * head_dim]  # a strided view
    q, k = q.view(len(positions), heads, head_dim), k.view(len(positions), kv_heads, head_dim)
    q_out, k_out = triton_fused.rotary(positions, q, k, rope.cos_sin)
    q_ref, k_ref = triton_fused.rotary_ref(positions, q, k, rope.cos_sin)
    return {"out": torch.cat([q_out.flatten(), k_out.flatten()]),
            "expected": torch.cat([q_ref.flatten(), k_ref.flatten()])}  # fmt: skip


FUSED_CASES: dict[str, Callable[[], Result]] = {
    "rms-norm-37": functools.partial(rms_norm_case, 5, 37, False, torch.float32),
    "rms-norm-residual-100": functools.partial(rms_norm_case, 7, 100, True, torch.float32),
    "rms-norm-residual-576": functools.partial(rms_norm_case, 3, 576, True, torch.float32),
    "rms-norm-residual-low": functools.partial(rms_norm_case, 4, 96, True, LOW_PRECISION),
    "rms-norm-low": functools.partial(rms_norm_case, 4, 130, False, LOW_PRECISION),
    "silu-1500": functools.partial(silu_case, 3, 1500, torch.float32),
    "silu-low-77": functools.partial(silu_case, 5, 77, LOW_PRECISION),
    "rotary-9-3-64": functools.partial(rotary_case, 9, 3, 64, torch.float32),
    "rotary-5-1-24": functools.partial(rotary_case, 5, 1, 24, torch.float32),
    "rotary-7-7-40-low": functools.partial(rotary_case, 7, 7, 40, LOW_PRECISION),
}


CASES: dict[str, Callable[[], Result]] = {
    **{
        "attention-{}-{}-{}-bs{}-m{}".format(*c): functools.partial(
            attention_case, *c, dtype=torch.float32
        )
        for c in ATTENTION_CASES
    },
    "attention-low-precision": functools.partial(attention_case, 8, 2, 64, 16, 64, LOW_PRECISION),
    "attention-layer": attention_layer_case,
    "lora-40-72": functools.partial(lora_case, 40, 72, torch.float32),
    "lora-96-24": functools.partial(lora_case, 96, 24, torch.float32),
    "lora-low-precision": functools.partial(lora_case, 64, 80, LOW_PRECISION),
    "lora-hostile": lora_hostile_case,
    "lora-fixed-tiles": lora_fixed_case,
    "attention-fixed-layout": attention_fixed_layout_case,
    **FUSED_CASES,
}


def compute_all() -> dict[str, Result | str]:
    """Every case's tensors (on CPU), or the traceback of a case that raised."""
    results: dict[str, Result | str] = {}
    for name, case in CASES.items():
        try:
            results[name] = {key: value.cpu() for key, value in case().items()}
        except Exception:
            results[name] = traceback.format_exc()
    return results


_RUN_INTERPRETED = """
import importlib.util, sys, torch
spec = importlib.util.spec_from_file_location("_triton_kernel_cases", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
torch.save(module.compute_all(), sys.argv[2])
"""


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Result | str]:
    if DEVICE == "cuda":
        return compute_all()
    path = tmp_path_factory.mktemp("triton") / "results.pt"
    done = subprocess.run(
        [sys.executable, "-c", _RUN_INTERPRETED, __file__, str(path)],
        env={**os.environ, "TRITON_INTERPRET": "1"},
        cwd=Path(__file__).parents[2],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    loaded: dict[str, Result | str] = torch.load(path)
    return loaded


def result(results: dict[str, Result | str], name: str) -> Result:
    value = results[name]
    if isinstance(value, str):
        pytest.fail(f"case {name} raised:\n{value}")
    return value


@pytest.mark.parametrize("name", [name for name in CASES if name.startswith("attention-")])
def test_paged_attention_matches_reference(results: dict[str, Result | str], name: str) -> None:
    r = result(results, name)
    assert not r["expected"].isnan().any()
    if "lens" in r:  # the step reaches both ends of the lengths
        assert (int(r["lens"].min()), int(r["lens"].max())) == (1, 300)
    if r["out"].dtype == torch.float32:
        torch.testing.assert_close(r["out"], r["expected"], rtol=1e-4, atol=1e-5)
    else:
        torch.testing.assert_close(r["out"].float(), r["expected"].float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("name", ["lora-40-72", "lora-96-24", "lora-low-precision"])
def test_lora_matches_sgmv(results: dict[str, Result | str], name: str) -> None:
    r = result(results, name)
    assert torch.equal(r["base"], r["base_before"])  # slot 0 tokens are left alone
    fp32 = name != "lora-low-precision"
    rtol, atol = (1e-4, 1e-4) if fp32 else (3e-2, 5e-2)
    torch.testing.assert_close(r["out"], r["expected"], rtol=rtol, atol=atol)


def test_lora_fixed_tiles_match_sgmv(results: dict[str, Result | str]) -> None:
    r = result(results, "lora-fixed-tiles")
    torch.testing.assert_close(r["out"], r["expected"], rtol=1e-4, atol=1e-5)


def test_lora_hostile_slot_stays_in_its_tokens(results: dict[str, Result | str]) -> None:
    r = result(results, "lora-hostile")
    assert not r["hostile"].isfinite().all()  # the slot did overflow
    torch.testing.assert_close(r["out"], r["expected"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", list(FUSED_CASES))
def test_fused_kernel_matches_reference(results: dict[str, Result | str], name: str) -> None:
    r = result(results, name)
    if r["out"].dtype == torch.float32:
        torch.testing.assert_close(r["out"], r["expected"], rtol=1e-5, atol=1e-5)
    else:  # a last-bit difference before a rounding may move the result by one step
        torch.testing.assert_close(r["out"].float(), r["expected"].float(), rtol=1e-2, atol=1e-2)
    if "stream" in r:  # the residual stream is the same sum, rounded the same way
        assert torch.equal(r["stream"], r["expected_stream"])


def test_lora_tiles_cut_runs() -> None:
    from loramux_engine.kernels import triton_lora

    size = triton_lora.TILE_TOKENS
    tiles = triton_lora.tiles([(3, 0, 2 * size + 1), (1, 40 + 2 * size, 41 + 2 * size)], "cpu")
    assert tiles.tolist() == [
        [3, 0, size], [3, size, 2 * size], [3, 2 * size, 2 * size + 1],
        [1, 40 + 2 * size, 41 + 2 * size],
    ]  # fmt: skip
    assert triton_lora.tiles([], "cpu").shape == (0, 3)


# -- dispatch -----------------------------------------------------------------------------


def test_dispatch_takes_triton_on_cuda_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """The choice, by device type without a device: the C kernel on a CPU, Triton on CUDA."""
    assert attention_backend("cpu", cpu_kernel_loaded=True) == "cpu_kernel"
    assert attention_backend("cpu", cpu_kernel_loaded=False) == "sdpa"
    assert attention_backend("cuda", cpu_kernel_loaded=False) == "triton"
    assert attention_backend("mps", cpu_kernel_loaded=False) == "sdpa"
    segments = [(1, 0, 4), (2, 4, 5)]
    assert ops._choose(segments, "cuda", torch.bfloat16) == ("triton", ())
    assert ops._choose(segments, "cuda:1", torch.float32) == ("triton", ())
    assert ops._choose(segments, "cpu", torch.bfloat16)[0] != "triton"
    monkeypatch.setattr(triton_support, "triton_importable", lambda: False)
    assert attention_backend("cuda", cpu_kernel_loaded=False) == "sdpa"
    assert ops._choose(segments, "cuda", torch.bfloat16)[0] == "sgmv"


# -- compiled for a GPU, without one ------------------------------------------------------

_COMPILE = textwrap.dedent(
    """
    import inspect, json, sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from loramux_engine.kernels import triton_attention, triton_fused, triton_lora

    def build(fn, ptrs, constexprs):
        signature = {}
        for name in inspect.signature(fn.fn).parameters:
            if name in constexprs:
                signature[name] = "constexpr"
            elif name.endswith("_ptr"):
                signature[name] = ptrs[name]
            else:
                signature[name] = "fp32" if name in ("scale_log2", "eps") else "i32"
        source = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
        kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32))
        return {"name": fn.fn.__name__, "shared": kernel.metadata.shared,
                "cubin": len(kernel.asm["cubin"])}

    results = []
    for dtype, heads, kv_heads, head_dim, block_size in [
        ("bf16", 9, 3, 64, 16), ("bf16", 32, 8, 128, 16), ("fp32", 7, 7, 24, 1)
    ]:
        ptr = "*" + dtype
        config = triton_attention.launch_config(heads, kv_heads, head_dim)
        config.update(BLOCK_N=triton_attention.BLOCK_N, KV_BLOCK_SIZE=block_size,
                      DOT_PRECISION="ieee" if dtype == "fp32" else "tf32")
        ptrs = dict(q_ptr=ptr, k_ptr=ptr, v_ptr=ptr, out_ptr=ptr, block_ids_ptr="*i64",
                    table_starts_ptr="*i64", lens_ptr="*i64")
        results.append(build(triton_attention._paged_attention_kernel, ptrs, config))
    for dtype in ("bf16", "fp32"):
        ptr, precision = "*" + dtype, "ieee" if dtype == "fp32" else "tf32"
        common = dict(BLOCK_T=triton_lora.TILE_TOKENS, BLOCK_R=triton_lora.RANK_BLOCK,
                      DOT_PRECISION=precision)
        results.append(build(
            triton_lora._shrink_kernel,
            dict(x_ptr=ptr, a_ptr=ptr, scale_ptr=ptr, h_ptr="*fp32", tiles_ptr="*i32",
                 ranks_ptr="*i32"),
            dict(common, BLOCK_K=triton_lora.BLOCK_K),
        ))
        results.append(build(
            triton_lora._expand_kernel,
            dict(h_ptr="*fp32", b_ptr=ptr, y_ptr=ptr, tiles_ptr="*i32", ranks_ptr="*i32"),
            dict(common, BLOCK_N=triton_lora.BLOCK_N),
        ))
    bf16 = "*bf16"
    results.append(build(
        triton_fused._rms_norm_kernel,
        dict(x_ptr=bf16, residual_ptr=bf16, weight_ptr=bf16, out_ptr=bf16, residual_out_ptr=bf16),
        dict(HAS_RESIDUAL=True, BLOCK=4096),
    ))
    results.append(build(
        triton_fused._silu_and_mul_kernel, dict(gate_ptr=bf16, up_ptr=bf16, out_ptr=bf16),
        dict(BLOCK=triton_fused.SILU_BLOCK),
    ))
    results.append(build(
        triton_fused._rotary_kernel,
        dict(positions_ptr="*i64", cos_sin_ptr="*fp32", q_ptr=bf16, k_ptr=bf16, q_out_ptr=bf16,
             k_out_ptr=bf16),
        dict(HALF=64, HALF_PAD=64, HEADS_PAD=32, KV_HEADS_PAD=8),
    ))
    json.dump(results, sys.stdout)
    """
)
HOPPER_SHARED_BYTES = 232448  # the most shared memory one block may take on sm_90


def test_kernels_compile_for_hopper() -> None:
    """Every kernel goes through Triton's whole pipeline to an sm_90 cubin (ptxas included)
    on this CPU and fits a Hopper block's shared memory. Not a launch: the specialisation
    a GPU run picks (divisibility, constants) may differ from these signatures."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-c", _COMPILE],
        env=env,
        cwd=Path(__file__).parents[2],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    compiled = json.loads(done.stdout)
    assert len(compiled) == 10
    for kernel in compiled:
        assert kernel["cubin"] > 0, kernel
        assert kernel["shared"] <= HOPPER_SHARED_BYTES, kernel

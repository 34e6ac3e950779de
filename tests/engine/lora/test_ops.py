"""The multi-LoRA op against a per-token loop and against PEFT's own LoRA layers."""

from __future__ import annotations

import pytest
import torch

from loramux_engine.kernels import lora_runs
from loramux_engine.lora.adapter import LoRAAdapter, parse_adapter
from loramux_engine.lora.ops import SGMV_MIN_TOKENS, Kernel, LoRABatch, LoRAStack, add_lora
from loramux_engine.lora.pool import LoRASlotPool
from loramux_engine.lora.shape import PROJECTIONS
from tests.engine.lora.adapters import MAX_RANK, TINY, MakeAdapter, read_files

KERNELS: tuple[Kernel, ...] = ("sgmv", "bmm", "bgmv", "runs", "auto")


def naive(y: torch.Tensor, x: torch.Tensor, stack: LoRAStack, slot_ids: list[int]) -> None:
    for i, slot in enumerate(slot_ids):
        if slot:
            y[i] += stack.scale[slot] * (x[i] @ stack.a[slot].T) @ stack.b_t[slot]


@pytest.fixture
def adapters(make_adapter: MakeAdapter) -> list[LoRAAdapter]:
    configs = [
        {"r": 4, "target_modules": "all-linear"},
        {"r": 8, "lora_alpha": 3, "target_modules": ["q_proj", "down_proj"], "use_rslora": True},
        {"r": 2, "target_modules": ["v_proj", "up_proj"], "rank_pattern": {"up_proj": 5}},
    ]
    return [
        parse_adapter(*read_files(make_adapter(seed=i, **c)[0]), TINY, MAX_RANK)
        for i, c in enumerate(configs)
    ]


@pytest.fixture
def pool(adapters: list[LoRAAdapter]) -> LoRASlotPool:
    pool = LoRASlotPool(TINY, num_slots=5, max_rank=MAX_RANK)
    for slot, adapter in enumerate(adapters, start=1):
        pool.load(slot, adapter)
    return pool


SLOT_PATTERNS = [
    [1, 1, 1, 2, 2, 3, 0, 0],  # grouped, with base-model tokens
    [2, 0, 1, 3, 1, 2, 3, 0],  # interleaved
    [3, 3, 3, 3, 3, 3, 3, 3],  # one adapter
    [0, 4, 4, 1, 0, 0, 2, 2],  # slot 4 is empty: its tokens are unchanged
    [0, 0, 1, 1, 2, 2, 3, 3],  # dense: sorted, every slot with the same count (views, no pads)
    # a long prefill run (sgmv under "auto") beside short decode runs (bmm)
    [1, 2, 3, 1, 2, 3] + [2] * SGMV_MIN_TOKENS + [3, 0],
]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("slot_ids", SLOT_PATTERNS)
def test_kernels_match_naive_loop(pool: LoRASlotPool, kernel: Kernel, slot_ids: list[int]) -> None:
    generator = torch.Generator().manual_seed(1)
    batch = LoRABatch.build(slot_ids, "cpu", kernel)
    for layer in range(TINY.num_layers):
        for projection in PROJECTIONS:
            in_features, out_features = TINY.features(projection)
            x = torch.randn(len(slot_ids), in_features, generator=generator)
            y = torch.randn(len(slot_ids), out_features, generator=generator)
            expected = y.clone()
            naive(expected, x, pool.stack(layer, projection), slot_ids)
            add_lora(y, x, pool.stack(layer, projection), batch)
            torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel", KERNELS)
def test_no_adapter_tokens_are_untouched(pool: LoRASlotPool, kernel: Kernel) -> None:
    batch = LoRABatch.build([0, 0, 0], "cpu", kernel)
    assert batch.empty
    x, y = torch.randn(3, 32), torch.randn(3, 32)
    before = y.clone()
    add_lora(y, x, pool.stack(0, "q_proj"), batch)
    assert torch.equal(y, before)


def test_auto_splits_long_runs_from_short_ones() -> None:
    long = [2] * SGMV_MIN_TOKENS
    slot_ids = [1, 2, 3, 1, *long, 3, 2]
    batch = LoRABatch.build(slot_ids, "cpu")  # CPU fp32: the C kernel takes every run
    assert batch.kernel == "runs" and batch.sgmv_segments == ()
    assert batch.runs is not None and len(batch.runs) == len(batch.segments)
    other = LoRABatch.build(slot_ids, "cpu", dtype=torch.float64)  # as on an accelerator
    assert other.kernel == "bmm" and other.sgmv_segments == ((2, 4, 4 + SGMV_MIN_TOKENS),)
    assert other.groups is not None and other.groups.index.numel() == 2 * 3  # 3 slots x 2
    only_long = LoRABatch.build(long + [3] * SGMV_MIN_TOKENS, "cpu", dtype=torch.float64)
    assert only_long.kernel == "sgmv" and len(only_long.sgmv_segments) == 2


def test_runs_cut_long_runs_into_kernel_pieces() -> None:
    batch = LoRABatch.build([1] * 150 + [2] * 3, "cpu", "runs")
    assert batch.runs is not None
    assert batch.runs.tolist() == [[1, 0, 64], [1, 64, 128], [1, 128, 150], [2, 150, 153]]


def test_runs_kernel_takes_the_pools_stacks(pool: LoRASlotPool) -> None:
    """The "runs" cases above ran the C kernel itself, not its sgmv fallback."""
    if lora_runs.load() is None:
        pytest.skip("no C compiler")
    for projection in PROJECTIONS:
        stack = pool.stack(0, projection)
        in_features, out_features = TINY.features(projection)
        x, y = torch.randn(4, in_features), torch.zeros(4, out_features)
        assert lora_runs.supports(x, y, stack.a, stack.b_t)


def test_batch_segments() -> None:
    batch = LoRABatch.build([0, 2, 2, 1, 0, 1], "cpu")
    assert batch.segments == ((2, 1, 3), (1, 3, 4), (1, 5, 6))
    assert batch.slots == (1, 2)
    assert batch.slot_ids.tolist() == [0, 2, 2, 1, 0, 1]


@pytest.mark.parametrize("kernel", KERNELS)
def test_mixed_batch_matches_peft_layers(make_adapter: MakeAdapter, kernel: Kernel) -> None:
    """Each token's output equals PEFT's lora.Linear for that token's adapter alone."""
    loras = [
        {"r": 3, "lora_alpha": 7, "rank_pattern": {"layers.1.self_attn.o_proj": 9}},
        {"r": 16, "lora_alpha": 4, "use_rslora": True, "alpha_pattern": {"up_proj": 11}},
    ]
    made = [make_adapter(seed=10 + i, **lora) for i, lora in enumerate(loras)]
    pool = LoRASlotPool(TINY, num_slots=3, max_rank=MAX_RANK)
    for slot, (path, _) in enumerate(made, start=1):
        pool.load(slot, parse_adapter(*read_files(path), TINY, MAX_RANK))
    slot_ids = [1, 1, 2, 0, 2, 1]
    batch = LoRABatch.build(slot_ids, "cpu", kernel)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for layer, projection, key in TINY.projection_keys():
            modules = [model.get_submodule(f"base_model.model.{key}") for _, model in made]
            x = torch.randn(len(slot_ids), TINY.features(projection)[0], generator=generator)
            y = modules[0].get_base_layer()(x)
            add_lora(y, x, pool.stack(layer, projection), batch)
            base = modules[0].get_base_layer()
            for i, slot in enumerate(slot_ids):
                want = modules[slot - 1](x[i : i + 1]) if slot else base(x[i : i + 1])
                torch.testing.assert_close(y[i], want[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel", KERNELS)
def test_fused_projection_output_columns(pool: LoRASlotPool, kernel: Kernel) -> None:
    """A fused q/k/v projection applies each LoRA to its own column slice of one output."""
    slot_ids = [1, 1, 2, 3, 0]
    batch = LoRABatch.build(slot_ids, "cpu", kernel)
    x = torch.randn(len(slot_ids), TINY.hidden_size)
    widths = [TINY.features(p)[1] for p in ("q_proj", "k_proj", "v_proj")]
    y = torch.randn(len(slot_ids), sum(widths))
    expected = y.clone()
    start = 0
    for projection, width in zip(("q_proj", "k_proj", "v_proj"), widths, strict=True):
        stack = pool.stack(1, projection)
        naive(expected[:, start : start + width], x, stack, slot_ids)
        add_lora(y[:, start : start + width], x, stack, batch)
        start += width
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)

"""The slot pool: padding, zeroing and the bytes a slot costs."""

from __future__ import annotations

import pytest
import torch

from loramux_engine.lora.adapter import LoRAAdapter, parse_adapter
from loramux_engine.lora.pool import LoRASlotPool, bytes_per_slot
from tests.engine.lora.adapters import MAX_RANK, TINY, MakeAdapter, read_files


def parsed(make_adapter: MakeAdapter, **lora: object) -> LoRAAdapter:
    return parse_adapter(*read_files(make_adapter(**lora)[0]), TINY, MAX_RANK)


def test_load_pads_ranks_and_zeroes_untargeted(make_adapter: MakeAdapter) -> None:
    pool = LoRASlotPool(TINY, num_slots=3, max_rank=MAX_RANK)
    pool.load(2, parsed(make_adapter, r=16, lora_alpha=8))  # all-linear, fills the slot
    adapter = parsed(make_adapter, r=4, lora_alpha=2, target_modules=["k_proj"])
    pool.load(2, adapter)

    k = pool.stack(1, "k_proj")
    weights = adapter.weights[(1, "k_proj")]
    assert torch.equal(k.a[2, :4], weights.a) and not k.a[2, 4:].any()
    assert torch.equal(k.b_t[2, :4], weights.b.T) and not k.b_t[2, 4:].any()
    assert k.scale[2] == 0.5 and k.ranks[2] == 4 and k.scales[2] == 0.5
    q = pool.stack(1, "q_proj")
    assert not q.a[2].any() and not q.b_t[2].any() and q.scale[2] == 0 and q.shrink[2] is None
    assert all(not stack.a[0].any() and not stack.a[1].any() for stack in pool.stacks.values())


def test_clear(make_adapter: MakeAdapter) -> None:
    pool = LoRASlotPool(TINY, num_slots=2, max_rank=MAX_RANK)
    pool.load(1, parsed(make_adapter))
    pool.clear(1)
    for stack in pool.stacks.values():
        assert not stack.a.any() and not stack.b_t.any() and not stack.scale.any()
        assert stack.ranks == [0, 0]


def test_slot_zero_and_oversized_rank_refused(make_adapter: MakeAdapter) -> None:
    pool = LoRASlotPool(TINY, num_slots=2, max_rank=4)
    with pytest.raises(ValueError, match="slot must be in 1..1"):
        pool.load(0, parsed(make_adapter, r=4))
    with pytest.raises(ValueError, match="rank 8 > pool max 4"):
        pool.load(1, parsed(make_adapter, r=8))


def test_bytes_and_budget() -> None:
    per_layer = sum(8 * (i + o) + 1 for i, o in map(TINY.features, ("q_proj", "down_proj")))
    expected = TINY.num_layers * per_layer * 2
    assert bytes_per_slot(TINY, 8, torch.bfloat16, ("q_proj", "down_proj")) == expected
    full_slot = bytes_per_slot(TINY, 8, torch.float32)
    assert LoRASlotPool.slots_for_budget(TINY, 8, torch.float32, 10 * full_slot + 1) == 10
    pool = LoRASlotPool(TINY, num_slots=2, max_rank=8, dtype=torch.float16)
    assert pool.slot_bytes == sum(
        (s.a[0].numel() + s.b_t[0].numel() + 1) * 2 for s in pool.stacks.values()
    )

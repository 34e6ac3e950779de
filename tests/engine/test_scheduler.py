"""Scheduler and KV reservations without a model: budgets, fairness, priority, cache reuse."""

from __future__ import annotations

from loramux_engine.engine.kv_cache import KVCacheManager
from loramux_engine.engine.scheduler import Scheduler
from loramux_engine.engine.sequence import Sequence
from loramux_engine.sampling_params import SamplingParams


def _seq(request_id: str, key: str = "", prompt_len: int = 10, priority: int = 0) -> Sequence:
    return Sequence(
        request_id, list(range(prompt_len)), SamplingParams(), prompt_len + 2, key, priority
    )


def _admission_order(scheduler: Scheduler) -> list[str]:
    """Run one request at a time to completion (one generated token each)."""
    order = []
    while scheduler.has_unfinished():
        (seq,) = scheduler.schedule()
        order.append(seq.request_id)
        scheduler.postprocess([seq], [7])
        scheduler.finish(seq, "stop")
    return order


def test_least_served_key_goes_first() -> None:
    scheduler = Scheduler(max_num_seqs=1, max_num_batched_tokens=100, kv_cache=KVCacheManager(64))
    for i in range(4):
        scheduler.add(_seq(f"a{i}", key="flood"))
    for i in range(2):
        scheduler.add(_seq(f"b{i}", key="quiet"))
    assert _admission_order(scheduler) == ["a0", "b0", "a1", "b1", "a2", "a3"]
    assert scheduler.service == {"flood": 48.0, "quiet": 24.0}


def test_idle_key_reenters_at_the_least_active_service() -> None:
    scheduler = Scheduler(max_num_seqs=1, max_num_batched_tokens=100, kv_cache=KVCacheManager(64))
    scheduler.service = {"old": 0.0}
    scheduler.add(_seq("busy0", key="busy"))
    scheduler.add(_seq("busy1", key="busy"))
    (seq,) = scheduler.schedule()
    scheduler.postprocess([seq], [7])
    scheduler.finish(seq, "stop")
    scheduler.add(_seq("old0", key="old"))  # idle since long ago: no banked credit
    assert scheduler.service["old"] == scheduler.service["busy"] == 12.0
    assert _admission_order(scheduler) == ["busy1", "old0"]


def test_priority_class_beats_service() -> None:
    scheduler = Scheduler(max_num_seqs=1, max_num_batched_tokens=100, kv_cache=KVCacheManager(64))
    scheduler.add(_seq("batch", key="a", priority=1))
    scheduler.add(_seq("interactive", key="b", priority=0))
    assert _admission_order(scheduler) == ["interactive", "batch"]


def test_token_budget_chunks_prompts_and_keeps_decodes_first() -> None:
    scheduler = Scheduler(max_num_seqs=4, max_num_batched_tokens=8, kv_cache=KVCacheManager(64))
    scheduler.add(_seq("short", prompt_len=3))
    scheduler.add(_seq("long", prompt_len=20))
    step = scheduler.schedule()
    assert [(s.request_id, s.num_scheduled_tokens) for s in step] == [("short", 3), ("long", 5)]
    scheduler.postprocess(step, [7, None])
    step = scheduler.schedule()
    assert [(s.request_id, s.num_scheduled_tokens) for s in step] == [("short", 1), ("long", 7)]


def test_kv_reservations_merge_free_runs() -> None:
    cache = KVCacheManager(36)
    seqs = [_seq(str(i)) for i in range(3)]  # 12 rows each
    for seq in seqs:
        assert cache.can_allocate(seq)
        cache.allocate(seq)
    assert not cache.can_allocate(_seq("x")) and cache.usage == 1.0
    cache.deallocate(seqs[0])
    cache.deallocate(seqs[2])
    assert not cache.can_allocate(_seq("wide", prompt_len=22))  # two separate runs of 12
    cache.deallocate(seqs[1])
    assert cache.can_allocate(_seq("wide", prompt_len=34)) and cache.usage == 0.0

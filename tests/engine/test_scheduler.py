"""Scheduler and paged KV blocks without a model: budgets, fairness, priority, preemption,
prefix caching."""

from __future__ import annotations

import itertools

from loramux_engine.engine.kv_cache import BlockManager
from loramux_engine.engine.scheduler import Scheduler
from loramux_engine.engine.sequence import Sequence, SequenceStatus
from loramux_engine.lora.ref import AdapterRef
from loramux_engine.sampling_params import SamplingParams

_bases = itertools.count(1)


def _seq(
    request_id: str,
    key: str = "",
    prompt_len: int = 10,
    priority: int = 0,
    tokens: list[int] | None = None,
) -> Sequence:
    if tokens is None:  # distinct from every other sequence's: no prefix-cache hits
        base = next(_bases) * 1000
        tokens = list(range(base, base + prompt_len))
    return Sequence(request_id, tokens, SamplingParams(), len(tokens) + 2, key, priority)


def _step(scheduler: Scheduler, token: int = 7) -> list[Sequence]:
    """One step: schedule, and sample ``token`` for every sequence that reached its end."""
    step = scheduler.schedule()
    sampled = [
        token if s.num_computed_tokens + s.num_scheduled_tokens == len(s) else None for s in step
    ]
    scheduler.postprocess(step, sampled)
    return step


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
    scheduler = Scheduler(
        max_num_seqs=1, max_num_batched_tokens=100, kv_cache=BlockManager(64, 1, False)
    )
    for i in range(4):
        scheduler.add(_seq(f"a{i}", key="flood"))
    for i in range(2):
        scheduler.add(_seq(f"b{i}", key="quiet"))
    assert _admission_order(scheduler) == ["a0", "b0", "a1", "b1", "a2", "a3"]
    assert scheduler.service == {"flood": 48.0, "quiet": 24.0}


def test_idle_key_reenters_at_the_least_active_service() -> None:
    scheduler = Scheduler(
        max_num_seqs=1, max_num_batched_tokens=100, kv_cache=BlockManager(64, 1, False)
    )
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
    scheduler = Scheduler(
        max_num_seqs=1, max_num_batched_tokens=100, kv_cache=BlockManager(64, 1, False)
    )
    scheduler.add(_seq("batch", key="a", priority=1))
    scheduler.add(_seq("interactive", key="b", priority=0))
    assert _admission_order(scheduler) == ["interactive", "batch"]


def test_token_budget_chunks_prompts_and_keeps_decodes_first() -> None:
    scheduler = Scheduler(
        max_num_seqs=4, max_num_batched_tokens=8, kv_cache=BlockManager(64, 1, False)
    )
    scheduler.add(_seq("short", prompt_len=3))
    scheduler.add(_seq("long", prompt_len=20))
    step = scheduler.schedule()
    assert [(s.request_id, s.num_scheduled_tokens) for s in step] == [("short", 3), ("long", 5)]
    scheduler.postprocess(step, [7, None])
    step = scheduler.schedule()
    assert [(s.request_id, s.num_scheduled_tokens) for s in step] == [("short", 1), ("long", 7)]


def test_blocks_follow_the_tokens_not_max_tokens() -> None:
    cache = BlockManager(num_blocks=4, block_size=4)
    seq = _seq("a", prompt_len=5)
    seq.max_len = 10_000  # a huge max_tokens reserves nothing
    assert cache.allocate(seq, 5) and len(seq.block_table) == 2 and cache.num_free_blocks == 2
    seq.num_computed_tokens = 5
    assert cache.blocks_needed(seq, 3) == 0 and cache.blocks_needed(seq, 4) == 1
    assert not cache.allocate(seq, 12) and len(seq.block_table) == 2  # all or nothing
    cache.free(seq)
    assert seq.block_table == [] and cache.num_free_blocks == 4 and cache.usage == 0.0


def _computed(cache: BlockManager, seq: Sequence) -> None:
    """Pretend the sequence's tokens all went through the model."""
    hit = cache.take_cached_prefix(seq)
    assert cache.allocate(seq, len(seq) - hit)
    seq.num_computed_tokens = len(seq)
    cache.cache_full_blocks(seq)


def test_prefix_cache_hits_whole_blocks_of_the_same_tenant_and_adapter() -> None:
    cache = BlockManager(num_blocks=16, block_size=4)
    prefix = list(range(100, 110))  # two full blocks and two tokens
    first = _seq("first", key="t1", tokens=prefix + [1, 2, 3])
    _computed(cache, first)
    cache.free(first)  # its full blocks stay cached
    again = _seq("again", key="t1", tokens=prefix + [4, 5])
    assert cache.take_cached_prefix(again) == 8 and again.num_computed_tokens == 8
    cache.free(again)
    other_tenant = _seq("other", key="t2", tokens=prefix + [4, 5])
    assert cache.take_cached_prefix(other_tenant) == 0
    other_adapter = _seq("adapter", key="t1", tokens=prefix + [4, 5])
    other_adapter.adapter = AdapterRef("version-2", "0" * 64, namespace="t1")
    assert cache.take_cached_prefix(other_adapter) == 0
    exact = _seq("exact", key="t1", tokens=prefix[:8])  # the last token is always computed
    assert cache.take_cached_prefix(exact) == 4


def test_prefix_cache_off_never_hits() -> None:
    cache = BlockManager(num_blocks=16, block_size=4, enable_prefix_caching=False)
    first = _seq("first", tokens=list(range(12)))
    _computed(cache, first)
    cache.free(first)
    assert cache.take_cached_prefix(_seq("again", tokens=list(range(12)))) == 0


def test_empty_blocks_go_before_cached_ones_and_cached_ones_least_recent_first() -> None:
    cache = BlockManager(num_blocks=4, block_size=2)
    old = _seq("old", key="t", tokens=[1, 2, 3])  # one full block
    _computed(cache, old)
    cache.free(old)
    new = _seq("new", key="t", tokens=[5, 6, 7])
    _computed(cache, new)
    cache.free(new)
    filler = _seq("filler", tokens=[9, 9, 9])
    assert cache.allocate(filler, 3)  # the two empty blocks: both prefixes survive
    for tokens, hit in (([1, 2, 3], 2), ([5, 6, 7], 2)):
        probe = _seq("probe", key="t", tokens=tokens)
        assert cache.take_cached_prefix(probe) == hit
        cache.free(probe)
    grow = _seq("grow", tokens=[0])
    assert cache.allocate(grow, 1)  # evicts one cached block: the least recently freed
    assert cache.take_cached_prefix(_seq("p", key="t", tokens=[1, 2, 3])) == 0


def test_preemption_takes_the_batch_class_then_the_most_served_key_then_the_newest() -> None:
    # 6 blocks of 2 tokens; four 3-token prompts take 2 blocks each once decoding
    scheduler = Scheduler(
        max_num_seqs=8, max_num_batched_tokens=100, kv_cache=BlockManager(6, 2),
        watermark_blocks=0,
    )  # fmt: skip
    scheduler.service = {"heavy": 100.0, "light": 0.0}
    seqs = {
        "interactive-heavy": _seq("interactive-heavy", key="heavy", prompt_len=3),
        "batch-light-old": _seq("batch-light-old", key="light", prompt_len=3, priority=1),
        "batch-light-new": _seq("batch-light-new", key="light", prompt_len=3, priority=1),
    }
    for seq in seqs.values():
        scheduler.add(seq)
    scheduler.service["heavy"] = 100.0
    _step(scheduler)  # three prompts: 2 blocks each, all 6 used
    assert scheduler.kv_cache.num_free_blocks == 0
    _step(scheduler)  # decode: the 4th token fits in the second blocks
    assert scheduler.num_preemptions == 0
    _step(scheduler)  # the 5th token needs a third block each: preempt
    preempted = [s.request_id for s in seqs.values() if s.num_preemptions]
    assert preempted == ["batch-light-new"]  # batch before interactive, newest first
    waiting = scheduler.waiting[0]
    assert waiting.block_table == [] and waiting.num_computed_tokens == 0
    assert waiting.output_token_ids == [7, 7]  # keeps what it generated, to recompute


def test_a_request_that_does_not_fit_does_not_block_smaller_ones() -> None:
    scheduler = Scheduler(
        max_num_seqs=8, max_num_batched_tokens=100, kv_cache=BlockManager(10, 4),
        watermark_blocks=0,
    )  # fmt: skip
    scheduler.add(_seq("running", prompt_len=20))  # 5 blocks
    _step(scheduler)
    scheduler.add(_seq("large", prompt_len=30))  # needs 8 blocks, 5 free
    scheduler.add(_seq("small", prompt_len=6))  # needs 2
    admitted = {s.request_id for s in _step(scheduler)}
    assert admitted == {"running", "small"}
    assert [s.request_id for s in scheduler.waiting] == ["large"]


def test_a_large_request_is_admitted_once_others_stop_passing_it() -> None:
    """Small requests of a less-served tenant keep coming and keep the cache too full for
    a large one; once max_num_seqs of them have gone past it, it goes first and waits
    alone until the running ones free enough blocks."""
    scheduler = Scheduler(
        max_num_seqs=3, max_num_batched_tokens=100, kv_cache=BlockManager(12, 4),
        watermark_blocks=0,
    )  # fmt: skip
    large = _seq("large", key="big", prompt_len=40)  # 10 of the 12 blocks
    scheduler.add(large)
    arrivals = 0
    for step in range(200):
        while len(scheduler.waiting) < 5:  # a steady stream of small requests
            scheduler.add(_seq(f"small{arrivals}", key="small", prompt_len=6))
            arrivals += 1
        if step == 0:  # every small request is selected before it
            scheduler.service.update(big=1e9, small=0.0)
        ran = _step(scheduler)
        if large in ran:
            break
        for seq in list(scheduler.running):  # each small one runs 3 steps, staggered
            if seq.num_output_tokens >= 3:
                scheduler.finish(seq, "length")
    assert large.status is SequenceStatus.RUNNING
    assert large.num_bypassed >= scheduler.max_num_seqs


def test_rejected_drafts_are_service_received() -> None:
    """A verified step charges its accepted tokens as output and its rejected drafts as
    computed input: a tenant whose forced drafts always fail pays for them in its turn."""
    kv = BlockManager(64, 1, False)
    scheduler = Scheduler(max_num_seqs=2, max_num_batched_tokens=100, kv_cache=kv)
    seq = _seq("a", key="drafter")
    seq.max_len = 40
    scheduler.add(seq)
    _step(scheduler)  # the prompt, then its first token
    assert scheduler.service["drafter"] == 10 + 2
    for accepted, charged in [(0, 2 + 3), (2, 3 * 2 + 1)]:
        (decoding,) = scheduler.schedule()
        drafts = [11, 12, 13]
        assert kv.allocate(decoding, 1 + len(drafts))
        decoding.draft_token_ids = drafts
        decoding.num_scheduled_tokens += len(drafts)
        before = scheduler.service["drafter"]
        scheduler.postprocess([decoding], [drafts[:accepted] + [7]])
        assert scheduler.service["drafter"] - before == charged

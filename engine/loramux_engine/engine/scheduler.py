"""Admission, per-step batch selection and preemption over the paged KV cache.

Every step runs each running sequence's next tokens (one for decode, the next chunk for
a prompt still being filled) and then admits waiting sequences while the token budget,
the sequence limit and the free KV blocks allow.

Memory: a step takes KV blocks for the tokens it schedules, nothing more
(engine/kv_cache.py). Admission needs blocks for the chunk it schedules (after any
prefix-cache hit) plus a small watermark, kept for the running sequences' next tokens.
When a running sequence needs a block and none is free, a running sequence is
preempted: the one ranked lowest by the fairness policy (the batch class before the
interactive one; within a class the most-served key; the newest first), possibly the
one asking. Its blocks are freed (full ones stay in the prefix cache) and it waits
again with every token it has, to be recomputed as a prompt when readmitted; it keeps
its arrival, so it is readmitted ahead of newer requests, and its generator and
emitted tokens are untouched, so its output is as if it had never been preempted.
No one is admitted in a step that preempted: that would only preempt again the next.

No head-of-line blocking: a waiting sequence whose chunk does not fit is passed over
and smaller ones are admitted. No starvation: a waiting sequence past which
``max_num_seqs`` sequences of its class or a more urgent one have been admitted is
starving; a starving sequence goes first in its class, and when it does not fit,
admission stops at it until it does (running sequences finish and free their blocks).

Admission is fair across fairness keys (tenants): within a priority class the
key that has received the least service goes first. Service is a virtual token
counter, prompt tokens weighing 1 and generated tokens 2; a key coming back
from idle starts at the lowest counter among the active keys, so idling banks
no credit.

Speculative decoding (engine/spec_decode.py): once the running sequences have their
tokens, the speculator may give decoding ones drafts to verify in the same step, within
the token budget and only from blocks beyond the admission watermark, so that drafts
never preempt anyone; a sequence advances by the tokens it accepted, and a block taken
for rejected drafts stays with it for its next tokens.

A sequence for an adapter is admitted only once the adapter cache has pinned the
adapter in a device slot; while it loads, later sequences (other adapters, or none)
are admitted past it. The admitted batch is ordered by adapter slot, decode tokens
first, so that each slot's tokens are one or two contiguous runs for the LoRA op.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence as Seq

from loramux_engine.engine.kv_cache import BlockManager
from loramux_engine.engine.sequence import Sequence, SequenceStatus
from loramux_engine.engine.spec_decode import Speculator
from loramux_engine.lora.cache import AdapterCache
from loramux_engine.lora.errors import AdapterLoadError
from loramux_engine.lora.ref import AdapterRef


class Scheduler:
    def __init__(
        self,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        kv_cache: BlockManager,
        adapters: AdapterCache | None = None,
        watermark_blocks: int | None = None,
        speculator: Speculator | None = None,
    ):
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.kv_cache = kv_cache
        self.adapters = adapters
        self.speculator = speculator
        # Blocks admission leaves free for the running sequences' next tokens: 1%.
        self.watermark_blocks = (
            max(1, kv_cache.num_blocks // 100) if watermark_blocks is None else watermark_blocks
        )
        self.num_preemptions = 0
        # Sequences whose adapter failed to load; the engine reports and forgets them.
        self.failed: list[Sequence] = []
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.service: dict[str, float] = {}  # virtual tokens served, per fairness key
        self._num_active: Counter[str] = Counter()

    def add(self, seq: Sequence) -> None:
        key = seq.fairness_key
        if not self._num_active[key]:
            active = [self.service[k] for k, n in self._num_active.items() if n]
            floor = min(active) if active else 0.0
            self.service[key] = max(self.service.get(key, 0.0), floor)
        self._num_active[key] += 1
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _select_next(self, skipped: set[Sequence], charged: Counter[str]) -> Sequence | None:
        """Next to admit: lowest priority value, starving first, least served key, first come.

        ``charged`` holds the prompt tokens admitted earlier in this same step, so that
        one pass over a flooded queue already interleaves the keys.
        """
        candidates = [s for s in self.waiting if s not in skipped]
        if not candidates:
            return None
        return min(
            candidates,
            key=lambda s: (
                s.priority,
                not self._starving(s),
                self.service[s.fairness_key] + charged[s.fairness_key],
                s.arrival,
            ),
        )

    def _starving(self, seq: Sequence) -> bool:
        return seq.num_bypassed >= self.max_num_seqs

    def _pin_adapter(self, seq: Sequence) -> bool:
        """Pin the sequence's adapter in a slot; False while it loads (or if it failed)."""
        if not isinstance(seq.adapter, AdapterRef):
            return True
        assert self.adapters is not None, "the engine refuses adapters when it has no cache"
        try:
            slot = self.adapters.acquire(seq.adapter)
        except Exception as cause:
            # Whatever went wrong with this adapter fails its sequence, never the step.
            if not isinstance(cause, AdapterLoadError):
                cause = AdapterLoadError(seq.adapter.id, cause)
            seq.error = cause
            self.finish(seq, "error")
            self.failed.append(seq)
            return False
        if slot is None:
            return False
        seq.adapter_slot = slot
        return True

    def _unpin_adapter(self, seq: Sequence) -> None:
        slot, seq.adapter_slot = seq.adapter_slot, 0
        if slot:
            assert self.adapters is not None and isinstance(seq.adapter, AdapterRef)
            self.adapters.release(seq.adapter)

    def _victim_rank(self, seq: Sequence) -> tuple[int, float, int]:
        """Higher ranks are preempted first: batch class, most-served key, newest."""
        return (seq.priority, self.service[seq.fairness_key], seq.arrival)

    def _preempt(self, seq: Sequence) -> None:
        """Free a running sequence's blocks and adapter pin; it waits to be recomputed."""
        self.running.remove(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_scheduled_tokens = 0
        seq.draft_token_ids = []
        seq.num_preemptions += 1
        self.num_preemptions += 1
        try:
            self.kv_cache.free(seq)
        finally:
            self._unpin_adapter(seq)
        self.waiting.append(seq)

    def _grant(self, seq: Sequence, wanted: int, scheduled: list[Sequence]) -> int:
        """Blocks for up to ``wanted`` tokens of a running sequence, preempting if needed.

        A prompt chunk shrinks to what the free blocks hold before anyone is preempted.
        Returns the tokens granted; 0 when the sequence itself was preempted.
        """
        kv = self.kv_cache
        while True:
            n = wanted
            if wanted > 1 and kv.blocks_needed(seq, wanted) > kv.num_free_blocks:
                room = (len(seq.block_table) + kv.num_free_blocks) * kv.block_size
                n = room - seq.num_computed_tokens
            if n > 0 and kv.allocate(seq, n):
                return n
            victim = max(self.running, key=self._victim_rank)
            self._preempt(victim)
            if victim is seq:
                return 0
            if victim in scheduled:  # its tokens go back to the budget
                scheduled.remove(victim)

    def _admit(self, seq: Sequence, budget: int) -> int:
        """Blocks for the sequence's next chunk (after prefix-cache hits); 0 if it does not fit."""
        kv = self.kv_cache
        hit = kv.take_cached_prefix(seq)
        n = min(seq.num_uncomputed_tokens, budget)
        reserve = self.watermark_blocks if self.running else 0
        if kv.blocks_needed(seq, n) + reserve <= kv.num_free_blocks and kv.allocate(seq, n):
            kv.count_lookup(seq, hit)
            return n
        kv.free(seq)  # the prefix hit too: a waiting sequence holds no blocks
        return 0

    def schedule(self) -> list[Sequence]:
        budget = self.max_num_batched_tokens
        scheduled: list[Sequence] = []
        preemptions_before = self.num_preemptions
        # Decode first so long prompts never stall running sequences; within each, the
        # sequences preempted last go first, so that a preemption rarely undoes work
        # already scheduled in this step.
        for running in sorted(
            self.running, key=lambda s: (s.num_uncomputed_tokens > 1, self._victim_rank(s))
        ):
            budget = self.max_num_batched_tokens - sum(s.num_scheduled_tokens for s in scheduled)
            if budget == 0:
                break
            if running not in self.running:  # preempted for an earlier one in this loop
                continue
            granted = self._grant(running, min(running.num_uncomputed_tokens, budget), scheduled)
            if granted:
                running.num_scheduled_tokens = granted
                scheduled.append(running)
        budget = self.max_num_batched_tokens - sum(s.num_scheduled_tokens for s in scheduled)
        if self.num_preemptions > preemptions_before:
            budget = 0  # memory is short: admitting now would only preempt again next step
        elif self.speculator is not None and budget > 0:
            budget -= self._add_drafts(scheduled, budget)
        # admit
        skipped: set[Sequence] = set()
        charged: Counter[str] = Counter()
        admitted: Counter[int] = Counter()  # per priority class
        while budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self._select_next(skipped, charged)
            if seq is None:
                break
            if not self._pin_adapter(seq):
                skipped.add(seq)  # only this adapter's requests wait for its load
                continue
            try:
                granted = self._admit(seq, budget)
            except BaseException:
                self._unpin_adapter(seq)  # the pin must not outlive a failed admission
                raise
            if not granted:
                self._unpin_adapter(seq)
                if self._starving(seq):
                    break  # nobody else goes ahead until it fits
                skipped.add(seq)
                continue
            admitted[seq.priority] += 1
            charged[seq.fairness_key] += seq.num_prompt_tokens
            self.waiting.remove(seq)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            seq.num_scheduled_tokens = granted
            budget -= granted
            scheduled.append(seq)
        if admitted:
            for waiting in self.waiting:
                waiting.num_bypassed += sum(n for p, n in admitted.items() if p <= waiting.priority)
        scheduled.sort(key=lambda s: (s.num_scheduled_tokens > 1, s.adapter_slot))
        return scheduled

    def _add_drafts(self, scheduled: list[Sequence], budget: int) -> int:
        """Give decoding sequences speculative drafts; returns the tokens they add."""
        assert self.speculator is not None
        kv = self.kv_cache
        decoding = [s for s in scheduled if s.num_scheduled_tokens == 1 == s.num_uncomputed_tokens]
        num_step_tokens = self.max_num_batched_tokens - budget
        added = 0
        for seq, drafts in self.speculator.propose(decoding, budget, num_step_tokens):
            spare = kv.num_free_blocks - self.watermark_blocks
            room = (len(seq.block_table) + max(0, spare)) * kv.block_size
            drafts = drafts[: max(0, room - len(seq))]  # positions len(seq) .. len + k - 1
            if drafts and kv.allocate(seq, 1 + len(drafts)):
                seq.draft_token_ids = drafts
                seq.num_scheduled_tokens += len(drafts)
                added += len(drafts)
        return added

    def postprocess(self, seqs: list[Sequence], sampled: Seq[int | list[int] | None]) -> None:
        """Advance the scheduled sequences; append each one's new token (None for a prompt
        chunk short of its end), or after drafts the list of its accepted ones and the next;
        key full blocks."""
        for seq, new in zip(seqs, sampled, strict=True):
            token_ids = [] if new is None else [new] if isinstance(new, int) else new
            num_prompt = min(
                seq.num_scheduled_tokens, seq.num_prompt_tokens - seq.num_computed_tokens
            )
            served = max(num_prompt, 0) + 2 * len(token_ids)
            self.service[seq.fairness_key] += served
            num_drafts = len(seq.draft_token_ids)
            if num_drafts:
                # accepted drafts were computed with the right prefix; the rest are stale rows
                num_accepted = len(token_ids) - 1
                seq.num_scheduled_tokens -= num_drafts - num_accepted
                # a rejected draft was computed like a prompt token: it is service received,
                # so drafts that always fail ("speculative": true) cost their tenant's turn
                self.service[seq.fairness_key] += num_drafts - max(num_accepted, 0)
                if self.speculator is not None:
                    self.speculator.observe(seq, num_drafts, num_accepted)
                seq.draft_token_ids = []
            seq.num_computed_tokens += seq.num_scheduled_tokens
            seq.num_scheduled_tokens = 0
            seq.token_ids.extend(token_ids)
            self.kv_cache.cache_full_blocks(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Finish a sequence; its KV blocks and adapter pin are returned even if one raises."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        else:
            return
        self._num_active[seq.fairness_key] -= 1
        if not self._num_active[seq.fairness_key]:
            del self._num_active[seq.fairness_key]
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        seq.draft_token_ids = []
        try:
            self.kv_cache.free(seq)  # a no-op for a sequence that holds no blocks
        finally:
            self._unpin_adapter(seq)

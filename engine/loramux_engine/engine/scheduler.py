"""Admission and per-step batch selection under the token budget.

Every step runs each running sequence's next tokens (one for decode, the next
chunk for a prompt still being filled) and then admits waiting sequences while
the budget, the sequence limit and the KV cache allow.

Admission is fair across fairness keys (tenants): within a priority class the
key that has received the least service goes first. Service is a virtual token
counter, prompt tokens weighing 1 and generated tokens 2; a key coming back
from idle starts at the lowest counter among the active keys, so idling banks
no credit.

A sequence for an adapter is admitted only once the adapter cache has pinned the
adapter in a device slot; while it loads, later sequences (other adapters, or none)
are admitted past it. The admitted batch is ordered by adapter slot, decode tokens
first, so that each slot's tokens are one or two contiguous runs for the LoRA op.
"""

from __future__ import annotations

from collections import Counter

from loramux_engine.engine.kv_cache import KVCacheManager
from loramux_engine.engine.sequence import Sequence, SequenceStatus
from loramux_engine.lora.cache import AdapterCache
from loramux_engine.lora.errors import AdapterLoadError
from loramux_engine.lora.ref import AdapterRef


class Scheduler:
    def __init__(
        self,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        kv_cache: KVCacheManager,
        adapters: AdapterCache | None = None,
    ):
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.kv_cache = kv_cache
        self.adapters = adapters
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
        """Next to admit: lowest priority value, then least served key, then first come.

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
                self.service[s.fairness_key] + charged[s.fairness_key],
                s.arrival,
            ),
        )

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

    def schedule(self) -> list[Sequence]:
        budget = self.max_num_batched_tokens
        scheduled: list[Sequence] = []
        # decode first so long prompts never stall running sequences
        for running in sorted(self.running, key=lambda s: s.num_uncomputed_tokens > 1):
            if budget == 0:
                break
            running.num_scheduled_tokens = min(running.num_uncomputed_tokens, budget)
            budget -= running.num_scheduled_tokens
            scheduled.append(running)
        # admit
        skipped: set[Sequence] = set()
        charged: Counter[str] = Counter()
        while budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self._select_next(skipped, charged)
            if seq is None or not self.kv_cache.can_allocate(seq):
                break
            if not self._pin_adapter(seq):
                skipped.add(seq)  # only this adapter's requests wait for its load
                continue
            charged[seq.fairness_key] += seq.num_prompt_tokens
            try:
                self.kv_cache.allocate(seq)
            except BaseException:
                self._unpin_adapter(seq)  # the pin must not outlive a failed admission
                raise
            self.waiting.remove(seq)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            seq.num_scheduled_tokens = min(seq.num_uncomputed_tokens, budget)
            budget -= seq.num_scheduled_tokens
            scheduled.append(seq)
        scheduled.sort(key=lambda s: (s.num_scheduled_tokens > 1, s.adapter_slot))
        return scheduled

    def postprocess(self, seqs: list[Sequence], sampled: list[int | None]) -> None:
        """Advance the scheduled sequences; append each sampled token."""
        for seq, token_id in zip(seqs, sampled, strict=True):
            num_prompt = min(
                seq.num_scheduled_tokens, seq.num_prompt_tokens - seq.num_computed_tokens
            )
            served = max(num_prompt, 0) + (2 if token_id is not None else 0)
            self.service[seq.fairness_key] += served
            seq.num_computed_tokens += seq.num_scheduled_tokens
            seq.num_scheduled_tokens = 0
            if token_id is not None:
                seq.token_ids.append(token_id)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Finish a sequence; its KV rows and adapter pin are returned even if one raises."""
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
        try:
            self.kv_cache.deallocate(seq)  # a no-op for a sequence that holds no rows
        finally:
            self._unpin_adapter(seq)

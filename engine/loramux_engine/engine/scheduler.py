"""Admission and per-step batch selection under the token budget.

Every step runs each running sequence's next tokens (one for decode, the next
chunk for a prompt still being filled) and then admits waiting sequences while
the budget, the sequence limit and the KV cache allow.
"""

from __future__ import annotations

from loramux_engine.engine.kv_cache import KVCacheManager
from loramux_engine.engine.sequence import Sequence, SequenceStatus


class Scheduler:
    def __init__(self, max_num_seqs: int, max_num_batched_tokens: int, kv_cache: KVCacheManager):
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.kv_cache = kv_cache
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _select_next(self) -> Sequence:
        """The waiting sequence to admit next: lowest priority value, then first come."""
        return min(self.waiting, key=lambda s: (s.priority, s.arrival))

    def schedule(self) -> list[Sequence]:
        budget = self.max_num_batched_tokens
        scheduled: list[Sequence] = []
        # decode first so long prompts never stall running sequences
        for seq in sorted(self.running, key=lambda s: s.num_uncomputed_tokens > 1):
            if budget == 0:
                break
            seq.num_scheduled_tokens = min(seq.num_uncomputed_tokens, budget)
            budget -= seq.num_scheduled_tokens
            scheduled.append(seq)
        # admit
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self._select_next()
            if not self.kv_cache.can_allocate(seq):
                break
            self.kv_cache.allocate(seq)
            self.waiting.remove(seq)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            seq.num_scheduled_tokens = min(seq.num_uncomputed_tokens, budget)
            budget -= seq.num_scheduled_tokens
            scheduled.append(seq)
        return scheduled

    def postprocess(self, seqs: list[Sequence], sampled: list[int | None]) -> None:
        """Advance the scheduled sequences; append each sampled token."""
        for seq, token_id in zip(seqs, sampled, strict=True):
            seq.num_computed_tokens += seq.num_scheduled_tokens
            seq.num_scheduled_tokens = 0
            if token_id is not None:
                seq.token_ids.append(token_id)

    def finish(self, seq: Sequence, reason: str) -> None:
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
            self.kv_cache.deallocate(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

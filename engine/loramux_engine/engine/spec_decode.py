"""Speculative decoding by prompt lookup: n-gram drafts that the target verifies in one step.

Drafting: a decoding sequence looks up its last ``n`` tokens (n = 3, then 2, then 1)
among its earlier tokens, prompt and output alike, and proposes the ``k`` tokens that
followed their most recent earlier occurrence; when those run into the end of the text,
it is in a loop, and the drafts repeat the loop. Text that copies from the prompt
(edits, rewrites, code, quoting) continues such runs; free text rarely does. An index
of every n-gram's latest occurrence, updated as tokens arrive, makes a lookup O(1).

Verification: the step runs the sequence's last token and its drafts through the target
with the request's own adapter, as a short prompt chunk over its paged KV cache, and
the sampler (layers/sampler.py: ``verify``) keeps the longest run of drafts the target
would itself have produced, plus the target's own next token: between 1 and k + 1
tokens a step, the same tokens as plain decoding (see the sampler for sampling). The
rejected drafts' keys and values stay beyond the sequence's computed tokens, so they
never reach the prefix cache and are overwritten by the next step; a block taken for
them alone stays with the sequence for its next tokens.

Policy (``mode``): "off", "on", or "auto". A request's own ``speculative`` field
(True/False) overrides the mode. In "auto" a sequence drafts while its drafts pay: its
acceptance rate, an average over recent steps, must stay at or above
``min_acceptance``; below it the sequence stops drafting for a while (a back-off that
doubles each time, up to ``MAX_BACKOFF`` tokens) and then tries again. And "auto"
drafts only while a step stays small, at most ``max_batch_tokens`` tokens with the
drafts: a verifying step costs about a one-token step only while the step is bound by
reading the weights, not by computing on its tokens (the figures are in the README).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from loramux_engine.config import EngineConfig
from loramux_engine.engine.sequence import Sequence

SpecMode = Literal["off", "on", "auto"]
SPEC_MODES: tuple[SpecMode, ...] = ("off", "on", "auto")
MAX_NGRAM = 3
# auto: the running acceptance rate weighs each step's drafts this much against the past.
RATE_WEIGHT = 0.3
FIRST_BACKOFF = 16  # output tokens a sequence decodes plainly after its drafts stop paying
MAX_BACKOFF = 256
# auto: the most tokens (decode plus drafts) a step may run with drafts, by device type;
# up to there a step costs about what a one-token-per-sequence step does (README figures).
DEFAULT_MAX_BATCH_TOKENS = {"cpu": 32, "cuda": 256}


class NgramIndex:
    """The latest position after each n-gram (n <= ``MAX_NGRAM``) of a growing token list.

    ``follows[key]`` is the index of the token right after the n-gram's most recent
    occurrence that has a token after it; keys pack (n, tokens) into one int.
    """

    __slots__ = ("follows", "num_indexed", "radix")

    def __init__(self, vocab_size: int) -> None:
        self.radix = vocab_size + 1
        self.follows: dict[int, int] = {}
        self.num_indexed = 0  # n-grams ending before this index are in ``follows``

    def _key(self, tokens: list[int], end: int, n: int) -> int:
        key = n
        for t in tokens[end - n : end]:
            key = key * self.radix + t + 1
        return key

    def propose(self, tokens: list[int], max_tokens: int, min_n: int = 1) -> list[int]:
        """Up to ``max_tokens`` tokens that followed the latest earlier occurrence of the
        longest tail n-gram (``min_n`` <= n <= ``MAX_NGRAM``) seen before; [] if none."""
        last = len(tokens) - 1
        for end in range(max(self.num_indexed, 1), last + 1):  # n-grams ending at end - 1
            for n in range(1, min(MAX_NGRAM, end) + 1):
                self.follows[self._key(tokens, end, n)] = end
        self.num_indexed = max(self.num_indexed, last + 1)
        if max_tokens < 1:
            return []
        for n in range(min(MAX_NGRAM, len(tokens)), min_n - 1, -1):
            start = self.follows.get(self._key(tokens, len(tokens), n))
            if start is not None:
                drafts = tokens[start : start + max_tokens]
                period = len(drafts)
                while len(drafts) < max_tokens:  # it ran into the end: the loop repeats
                    drafts.append(drafts[-period])
                return drafts
        return []


@dataclass(slots=True)
class SpecState:
    """One sequence's drafting state."""

    index: NgramIndex
    rate: float = 1.0  # running acceptance rate (auto)
    resume_at: int = 0  # output length from which it drafts again after a back-off (auto)
    backoff: int = FIRST_BACKOFF
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0


@dataclass(slots=True)
class Speculator:
    mode: SpecMode = "auto"
    num_speculative_tokens: int = 5  # k: drafts per sequence and step at most
    min_ngram: int = 1
    min_acceptance: float = 0.3  # auto
    max_batch_tokens: int = 32  # auto: the most tokens (decode plus drafts) a drafting step runs
    vocab_size: int = 0
    num_draft_tokens_total: int = 0
    num_accepted_tokens_total: int = 0
    num_drafting_steps_total: int = 0  # sequence-steps that verified drafts
    _states: dict[int, SpecState] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mode not in SPEC_MODES:
            raise ValueError(f"speculative mode must be one of {SPEC_MODES}, not {self.mode!r}")

    def _forced(self, seq: Sequence) -> bool | None:
        """The request's own choice, or the mode's when it is "on"/"off"; None: auto."""
        asked = seq.params.speculative
        if asked is not None:
            return asked
        return None if self.mode == "auto" else self.mode == "on"

    def _state(self, seq: Sequence) -> SpecState:
        state = seq.spec
        if not isinstance(state, SpecState):
            state = seq.spec = SpecState(NgramIndex(self.vocab_size))
        return state

    def propose(
        self, decoding: list[Sequence], budget: int, num_step_tokens: int
    ) -> list[tuple[Sequence, list[int]]]:
        """Drafts for sequences scheduled for one plain decode token each, within ``budget``
        extra tokens, in a step of ``num_step_tokens`` so far; the caller cuts them further
        to the sequence's free blocks."""
        plans: list[tuple[Sequence, list[int]]] = []
        auto_room = self.max_batch_tokens - num_step_tokens
        for seq in decoding:
            forced = self._forced(seq)
            if forced is False or budget < 1:
                continue
            state = self._state(seq)
            most = min(self.num_speculative_tokens, budget, seq.max_len - len(seq) - 1)
            if forced is None:
                if seq.num_output_tokens < state.resume_at:
                    continue
                most = min(most, auto_room)
            drafts = state.index.propose(seq.token_ids, most, self.min_ngram)
            if drafts:
                plans.append((seq, drafts))
                budget -= len(drafts)
                if forced is None:
                    auto_room -= len(drafts)
        return plans

    def observe(self, seq: Sequence, num_drafts: int, num_accepted: int) -> None:
        """Count a verified step's drafts; in auto, back off a sequence whose drafts fail."""
        if not num_drafts:
            return
        state = self._state(seq)
        state.num_draft_tokens += num_drafts
        state.num_accepted_tokens += num_accepted
        self.num_draft_tokens_total += num_drafts
        self.num_accepted_tokens_total += num_accepted
        self.num_drafting_steps_total += 1
        state.rate += RATE_WEIGHT * (num_accepted / num_drafts - state.rate)
        if self._forced(seq) is None and state.rate < self.min_acceptance:
            state.resume_at = seq.num_output_tokens + state.backoff
            state.backoff = min(2 * state.backoff, MAX_BACKOFF)
            state.rate = self.min_acceptance  # one good step on resuming keeps it drafting


def build_speculator(config: EngineConfig, vocab_size: int, device: torch.device) -> Speculator:
    max_batch_tokens = config.speculative_max_batch_tokens or DEFAULT_MAX_BATCH_TOKENS.get(
        device.type, DEFAULT_MAX_BATCH_TOKENS["cpu"]
    )
    mode = config.speculative
    assert mode in SPEC_MODES, "EngineConfig checks it"
    return Speculator(
        mode=mode,  # type: ignore[arg-type]
        num_speculative_tokens=config.num_speculative_tokens,
        max_batch_tokens=max_batch_tokens,
        vocab_size=vocab_size,
    )

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

Policy (``mode``): "off", "on", or "auto"; a request's own ``speculative`` field
(True/False) overrides it. Each sequence keeps an estimate of the chance that its next
draft is accepted (recent steps weigh most), and drafts the k that maximizes tokens per
unit of step time: a step yields 1 + a + ... + a^k tokens and costs 1 + c k one-token
steps, c being a draft token's cost (``draft_cost``, by device: measured by ``bench
spec``'s step-cost sweep). "on" drafts at least one token whenever prompt lookup finds
one. "auto" drafts only where that gains at least 5%; where it does not, the sequence
decodes plainly for a while (a back-off that doubles each time, up to ``MAX_BACKOFF``
tokens) and then tries again. And "auto" drafts only while a step stays small, at most
``max_batch_tokens`` tokens with the drafts: past it a step is bound by computing on its
tokens, where a batch already pays for every token and drafts cost their full share
(the figures are in the README).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from loramux_engine.config import EngineConfig
from loramux_engine.engine.sequence import Sequence

SpecMode = Literal["off", "on", "auto"]
SPEC_MODES: tuple[SpecMode, ...] = ("off", "on", "auto")
MAX_NGRAM = 3
# auto: each step's drafts weigh this much against the past in the acceptance estimate.
RATE_WEIGHT = 0.2
MIN_GAIN = 1.05  # auto: the least gain in tokens per unit of step time that drafts must offer
FIRST_BACKOFF = 16  # output tokens a sequence decodes plainly after its drafts stop paying
MAX_BACKOFF = 256
# auto: the most tokens (decode plus drafts) a step may run with drafts, by device type;
# up to there a step costs about what a one-token-per-sequence step does (README figures).
DEFAULT_MAX_BATCH_TOKENS = {"cpu": 16, "cuda": 256}
# auto: a draft token's cost relative to a one-token step, by device type (bench spec's
# step-cost sweep; on CUDA a guess, not measured).
DEFAULT_DRAFT_COST = {"cpu": 0.07, "cuda": 0.02}


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
    # Recent drafts accepted and steps that ended in a rejected draft (decaying counts, a
    # prior of one each): their ratio estimates the chance that the next draft is accepted.
    accepted: float = 1.0
    rejected: float = 1.0
    resume_at: int = 0  # output length from which it drafts again after a back-off (auto)
    backoff: int = FIRST_BACKOFF

    @property
    def acceptance(self) -> float:
        return self.accepted / (self.accepted + self.rejected)


def best_num_drafts(acceptance: float, most: int, draft_cost: float) -> int:
    """The number of drafts k (0..most) that maximizes tokens per unit of step time, or 0
    when no k gains ``MIN_GAIN``.

    With each draft accepted with probability a after the ones before it, a step yields
    1 + a + ... + a^k tokens; it costs 1 + draft_cost * k one-token steps.
    """
    best, best_gain = 0, MIN_GAIN
    tokens, term = 1.0, 1.0
    for k in range(1, most + 1):
        term *= acceptance
        tokens += term
        gain = tokens / (1 + draft_cost * k)
        if gain > best_gain:
            best, best_gain = k, gain
    return best


@dataclass(slots=True)
class Speculator:
    mode: SpecMode = "auto"
    num_speculative_tokens: int = 8  # drafts per sequence and step at most
    min_ngram: int = 1
    # A draft token's cost in a step, relative to a one-token step (auto; by device).
    draft_cost: float = DEFAULT_DRAFT_COST["cpu"]
    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS["cpu"]  # auto: a drafting step's most tokens
    vocab_size: int = 0
    num_draft_tokens_total: int = 0
    num_accepted_tokens_total: int = 0
    num_drafting_steps_total: int = 0  # sequence-steps that verified drafts

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
            k = best_num_drafts(state.acceptance, most, self.draft_cost)
            if forced:
                k = max(k, min(1, most))
            else:
                if seq.num_output_tokens < state.resume_at:
                    continue
                if k == 0:  # drafts do not pay: plain decoding for a while, then try again
                    state.resume_at = seq.num_output_tokens + state.backoff
                    state.backoff = min(2 * state.backoff, MAX_BACKOFF)
                    state.accepted = state.rejected = 1.0
                    continue
                k = min(k, auto_room)
            drafts = state.index.propose(seq.token_ids, k, self.min_ngram)
            if drafts:
                plans.append((seq, drafts))
                budget -= len(drafts)
                if forced is None:
                    auto_room -= len(drafts)
        return plans

    def observe(self, seq: Sequence, num_drafts: int, num_accepted: int) -> None:
        """Count a verified step's drafts and update the sequence's acceptance estimate."""
        if not num_drafts:
            return
        state = self._state(seq)
        self.num_draft_tokens_total += num_drafts
        self.num_accepted_tokens_total += num_accepted
        self.num_drafting_steps_total += 1
        keep = 1 - RATE_WEIGHT
        state.accepted = keep * state.accepted + num_accepted
        state.rejected = keep * state.rejected + (num_accepted < num_drafts)


def build_speculator(config: EngineConfig, vocab_size: int, device: torch.device) -> Speculator:
    kind = device.type if device.type in DEFAULT_MAX_BATCH_TOKENS else "cpu"
    max_batch_tokens = config.speculative_max_batch_tokens or DEFAULT_MAX_BATCH_TOKENS[kind]
    mode = config.speculative
    assert mode in SPEC_MODES, "EngineConfig checks it"
    return Speculator(
        mode=mode,  # type: ignore[arg-type]
        num_speculative_tokens=config.num_speculative_tokens,
        draft_cost=DEFAULT_DRAFT_COST[kind],
        max_batch_tokens=max_batch_tokens,
        vocab_size=vocab_size,
    )

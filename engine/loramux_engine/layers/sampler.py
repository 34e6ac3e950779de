"""Token selection: greedy, or temperature / top-k / top-p with a per-request generator.

Each request draws from its own ``torch.Generator``, so a seeded request gets the
same tokens whatever else shares its batch.

Every row stands alone, because its sequence may be a hostile tenant's: a row whose
logits hold NaN or +inf, or no finite value at all (an adapter whose weights overflow),
gets an error instead of a token and fails its own sequence, never the batch. Scaling
by the temperature cannot overflow for any finite temperature: the row's maximum is
subtracted first and the division is done in float64, so every scaled logit is <= 0 or
-inf and the maximum is exactly 0, which keeps the softmax a distribution. Logprobs are
always finite (JSON has no -Infinity): floored at OpenAI's stand-in for -inf, -9999.0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loramux_engine.errors import NonFiniteLogitsError, SequenceFailedError
from loramux_engine.sampling_params import SamplingParams

NEG_INF_LOGPROB = -9999.0


@dataclass(slots=True)
class SampledToken:
    token_id: int
    logprob: float | None = None
    top_logprobs: dict[int, float] | None = None
    # Set, with token_id -1, when the row could not be sampled: its sequence fails alone.
    error: SequenceFailedError | None = None

    @classmethod
    def failed(cls, error: SequenceFailedError) -> SampledToken:
        return cls(-1, error=error)


def _filter(row: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    # row: [vocab] logits already divided by the temperature
    if 0 < params.top_k < row.shape[0]:
        kth = torch.topk(row, params.top_k).values[-1]
        row = row.masked_fill(row < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(row, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token once the tokens before it already reach top_p
        drop = (cumulative - sorted_logits.softmax(-1)) >= params.top_p
        row = row.scatter(0, order[drop], float("-inf"))
    return row


def _scale(row: torch.Tensor, row_max: torch.Tensor, temperature: float) -> torch.Tensor:
    # row: [vocab] finite or -inf, row_max finite. In float32 a temperature of 1.7e308 is
    # inf (and -inf / inf is NaN); in float64 it is not, and (row - max) / T is <= 0.
    return (row.double() - row_max.double()) / temperature


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
) -> list[SampledToken]:
    # logits: [num_sampled, vocab]
    logits = logits.float()
    # amax propagates NaN: a finite row maximum means no NaN, no +inf and one finite logit.
    row_max = logits.amax(-1)
    usable = torch.isfinite(row_max).tolist()
    token_ids = logits.argmax(-1)
    for i, p in enumerate(params):
        if p.greedy or not usable[i]:
            continue
        probs = _filter(_scale(logits[i], row_max[i], p.temperature), p).softmax(-1)
        token_ids[i] = torch.multinomial(probs, 1, generator=generators[i])[0]
    chosen = token_ids.tolist()
    results = [
        SampledToken(t)
        if ok
        else SampledToken.failed(
            NonFiniteLogitsError(
                "the model's logits for this request were not finite numbers (NaN or "
                "infinity), e.g. because its adapter's weights overflow"
            )
        )
        for t, ok in zip(chosen, usable, strict=True)
    ]
    wanted = [i for i, p in enumerate(params) if p.wants_logprobs and usable[i]]
    if wanted:
        # A floor rather than a swap of -inf alone, which would rank -inf above -1e5.
        logprobs = torch.log_softmax(logits[wanted], -1).clamp_min_(NEG_INF_LOGPROB)
        for row, i in enumerate(wanted):
            results[i].logprob = float(logprobs[row, chosen[i]])
            k = params[i].num_top_logprobs
            if k:
                top = torch.topk(logprobs[row], k)
                results[i].top_logprobs = dict(
                    zip(top.indices.tolist(), top.values.tolist(), strict=True)
                )
    return results

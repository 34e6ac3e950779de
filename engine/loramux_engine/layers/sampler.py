"""Token selection: greedy, or temperature / top-k / top-p with a per-request generator.

Each request draws from its own ``torch.Generator``, so a seeded request gets the
same tokens whatever else shares its batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loramux_engine.sampling_params import SamplingParams


@dataclass(slots=True)
class SampledToken:
    token_id: int
    logprob: float | None = None
    top_logprobs: dict[int, float] | None = None


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


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
) -> list[SampledToken]:
    # logits: [num_sampled, vocab]
    logits = logits.float()
    token_ids = logits.argmax(-1)
    for i, p in enumerate(params):
        if p.greedy:
            continue
        probs = _filter(logits[i] / p.temperature, p).softmax(-1)
        token_ids[i] = torch.multinomial(probs, 1, generator=generators[i])[0]
    chosen = token_ids.tolist()
    results = [SampledToken(t) for t in chosen]
    wanted = [i for i, p in enumerate(params) if p.wants_logprobs]
    if wanted:
        logprobs = torch.log_softmax(logits[wanted], -1)
        for row, i in enumerate(wanted):
            results[i].logprob = float(logprobs[row, chosen[i]])
            k = params[i].num_top_logprobs
            if k:
                top = torch.topk(logprobs[row], k)
                results[i].top_logprobs = dict(
                    zip(top.indices.tolist(), top.values.tolist(), strict=True)
                )
    return results

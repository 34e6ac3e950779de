"""Token selection: greedy, or temperature / top-k / top-p with a per-request generator.

Each request draws from its own ``torch.Generator``, one uniform per token, so a seeded
request gets the same tokens whatever else shares its batch, and whether or not its
step verifies speculative drafts (``sample`` with drafts; engine/spec_decode.py).

Every row stands alone, because its sequence may be a hostile tenant's: a row whose
logits hold NaN or +inf, or no finite value at all (an adapter whose weights overflow),
gets an error instead of a token and fails its own sequence, never the batch. Scaling
by the temperature cannot overflow for any finite temperature: the row's maximum is
subtracted first and the division is done in float64, so every scaled logit is <= 0 or
-inf and the maximum is exactly 0, which keeps the softmax a distribution. Logprobs are
always finite (JSON has no -Infinity): floored at OpenAI's stand-in for -inf, -9999.0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from loramux_engine.errors import NonFiniteLogitsError, SequenceFailedError
from loramux_engine.kernels import gemv
from loramux_engine.sampling_params import SamplingParams

NEG_INF_LOGPROB = -9999.0


@dataclass(slots=True)
class SampledToken:
    token_id: int
    logprob: float | None = None
    top_logprobs: dict[int, float] | None = None
    # Set, with token_id -1, when the row could not be sampled: its sequence fails alone.
    error: SequenceFailedError | None = None
    # Speculative decoding: the draft tokens accepted before this one, in order.
    accepted_drafts: tuple[SampledToken, ...] = ()

    @property
    def tokens(self) -> list[SampledToken]:
        """Every token this step gives its sequence: the accepted drafts, then this one."""
        return [*self.accepted_drafts, self]

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


def probabilities(row: torch.Tensor, row_max: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution a sampling request draws from: temperature, top-k, top-p applied.

    row: [vocab] logits with a finite maximum ``row_max`` -> [vocab] float64, sums to 1.
    """
    return _filter(_scale(row, row_max, params.temperature), params).softmax(-1)


def draw(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """One token from ``probs`` ([vocab], float64) by inverting its CDF at one uniform draw.

    Exactly one uniform per token, so that a speculative step (``verify``) consumes the
    generator as plain decoding does and a seeded request gets the same tokens either way.
    """
    device = generator.device if generator is not None else probs.device
    u = torch.rand((), dtype=torch.float64, generator=generator, device=device)
    cdf = probs.cumsum(-1)
    index = torch.searchsorted(cdf, (u.to(probs.device) * cdf[-1]).reshape(1), right=True)
    return min(int(index), probs.shape[0] - 1)


def accept_draft(
    probs: torch.Tensor, draft: int, generator: torch.Generator | None
) -> tuple[bool, int]:
    """Rejection sampling of one draft token against the target's distribution.

    The draft distribution is one-hot (prompt lookup proposes one token), so the draft is
    accepted with probability ``probs[draft]``, and on rejection the token comes from the
    residual, ``probs`` without the draft, renormalized: the result is distributed as
    ``probs`` exactly. It is done with the uniform ``draw`` uses: accepted when the token
    drawn is the draft (probability ``probs[draft]``); a rejected uniform lies outside the
    draft's interval of the CDF, uniformly, so the token drawn is the residual's sample.
    Returns (accepted, token).
    """
    token = draw(probs, generator)
    return token == draft, token


def _failed() -> SampledToken:
    return SampledToken.failed(
        NonFiniteLogitsError(
            "the model's logits for this request were not finite numbers (NaN or "
            "infinity), e.g. because its adapter's weights overflow"
        )
    )


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
    drafts: list[list[int]] | None = None,
) -> list[SampledToken]:
    """A token for each request, or with drafts the verified run of them plus one.

    logits: [num_rows, vocab], one row per request, or ``1 + len(drafts[i])`` consecutive
    rows for request i: row j holds the target's logits after its draft j - 1. Drafts are
    taken while the target's own choice (argmax, or its draw, ``accept_draft``) is the
    draft; the first row where it is not, or the row after the last draft, gives the
    next token. Rows past that point are never looked at, as in plain decoding, where they
    would not exist: a non-finite one fails nothing.
    """
    logits = logits.float()
    # amax propagates NaN: a finite row maximum means no NaN, no +inf and one finite logit.
    library = gemv.load() if logits.is_cpu and logits.dim() == 2 and logits.shape[1] else None
    if library is not None and logits.is_contiguous():
        row_max, argmax = gemv.row_argmax(library, logits)  # the two in one pass
    else:
        row_max, argmax = logits.amax(-1), logits.argmax(-1)
    usable = [math.isfinite(m) for m in row_max.tolist()]
    best = argmax.tolist()
    chosen: list[list[tuple[int, int]] | None] = []  # per request: (row, token) emitted
    row = 0
    for i, p in enumerate(params):
        proposed = drafts[i] if drafts is not None else []
        emitted: list[tuple[int, int]] = []
        for j in range(len(proposed) + 1):
            r = row + j
            if not usable[r]:
                emitted = []  # fails the request: no token before this row ends its step
                break
            if p.greedy:
                token = best[r]
            elif j < len(proposed):
                _, token = accept_draft(
                    probabilities(logits[r], row_max[r], p), proposed[j], generators[i]
                )
            else:
                token = draw(probabilities(logits[r], row_max[r], p), generators[i])
            emitted.append((r, token))
            if j == len(proposed) or token != proposed[j]:
                break
        chosen.append(emitted or None)
        row += len(proposed) + 1
    wanted = [
        (i, r, t) for i, p in enumerate(params) if p.wants_logprobs for r, t in chosen[i] or []
    ]
    logprob_of: dict[int, tuple[float, dict[int, float] | None]] = {}  # by row
    if wanted:
        # A floor rather than a swap of -inf alone, which would rank -inf above -1e5.
        logprobs = torch.log_softmax(logits[[r for _, r, _ in wanted]], -1)
        logprobs.clamp_min_(NEG_INF_LOGPROB)
        for n, (i, r, t) in enumerate(wanted):
            top = None
            if k := params[i].num_top_logprobs:
                values, indices = torch.topk(logprobs[n], k)
                top = dict(zip(indices.tolist(), values.tolist(), strict=True))
            logprob_of[r] = (float(logprobs[n, t]), top)
    results = []
    for run in chosen:
        if run is None:
            results.append(_failed())
            continue
        tokens = [SampledToken(t, *logprob_of.get(r, (None, None))) for r, t in run]
        last = tokens[-1]
        last.accepted_drafts = tuple(tokens[:-1])
        results.append(last)
    return results

"""A step whose failure stays with the sequences that cause it.

A step runs every scheduled sequence in one forward, so an exception anywhere in it
(the model, the LoRA op, the sampler) would otherwise be every tenant's failure. When
the whole step raises, it is run again in halves, and each half that still raises in
halves again, down to single sequences: a sequence that raises on its own fails with
a ``SequenceFailedError``; every other sequence gets the token it would have got alone.

Running a sequence again is idempotent: its scheduled tokens rewrite the same KV rows
from the same inputs, and its sampling generator is rewound to where it was before the
step, so a seeded request draws the same numbers. Nothing else a run touches outlives
it (the runner resets its context on every path). The snapshot of the generators costs
a copy of each sampling sequence's generator state per step (about 10 us on a CPU).

A sequence that fails alone never fails the others, even when every sequence of the
step fails alone: a tenant decides whether a step holds only its own sequences, and a
broken engine fails each request anyway, as its own. ``AsyncLLMEngine`` fails every
request in flight only when the engine's own bookkeeping raises. A hostile sequence
costs about 2 log2(n) extra runs of a smaller batch, once: then it is finished.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from loramux_engine.engine.sequence import Sequence
from loramux_engine.errors import SequenceFailedError
from loramux_engine.layers.sampler import SampledToken

logger = logging.getLogger(__name__)

RunStep = Callable[[list[Sequence]], list[SampledToken | None]]


def run_isolated(run: RunStep, seqs: list[Sequence]) -> list[SampledToken | None]:
    """``run(seqs)``; when it raises, each sequence's result from the smallest group that ran.

    A sequence that raises even alone gets ``SampledToken.failed`` (also one that would
    not have sampled this step, a prompt chunk): this never raises for a sequence's sake.
    """
    saved = {s: s.generator.get_state() for s in seqs if s.generator is not None}
    results: dict[Sequence, SampledToken | None] = {}

    def attempt(group: list[Sequence]) -> None:
        try:
            results.update(zip(group, run(group), strict=True))
            return
        except Exception as error:
            for seq in group:
                if seq.generator is not None:
                    seq.generator.set_state(saved[seq])
            if len(group) == 1:
                # With its traceback (never prompt text): an engine bug shows up here too.
                logger.warning(
                    "request %s failed alone in a step", group[0].request_id, exc_info=True
                )
                results[group[0]] = SampledToken.failed(
                    SequenceFailedError.caused_by(error, "compute this request's next tokens")
                )
                return
            if len(group) == len(seqs):
                logger.warning(
                    "a step of %d sequences failed (%s); running them in smaller groups",
                    len(seqs),
                    type(error).__name__,
                )
        half = len(group) // 2
        attempt(group[:half])
        attempt(group[half:])

    attempt(seqs)
    return [results[s] for s in seqs]

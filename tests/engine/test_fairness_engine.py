"""Fairness through LLMEngine: one tenant's flood does not hold back another's requests."""

from __future__ import annotations

from collections.abc import Callable

from loramux_engine import LLMEngine, SamplingParams

PARAMS = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


def test_quiet_tenant_is_served_within_the_first_steps(
    make_engine: Callable[..., LLMEngine],
) -> None:
    # One token a step (no speculative drafts), so that steps count tokens served.
    engine = make_engine(max_num_seqs=4, max_model_len=64, speculative="off")
    for i in range(48):
        engine.add_request(f"a{i}", [10 + i % 50] * 12, PARAMS, fairness_key="A")
    for i in range(4):
        engine.add_request(f"b{i}", [20 + i] * 12, PARAMS, fairness_key="B")
    first_step: dict[str, int] = {}
    step = 0
    while engine.has_unfinished():
        step += 1
        for out in engine.step():
            if out.new_token_ids:
                first_step.setdefault(out.request_id, step)
    b_steps = [first_step[f"b{i}"] for i in range(4)]
    a_last = max(first_step[f"a{i}"] for i in range(48))
    # Four running slots and 8 tokens per request: A's backlog alone is ~100 steps long.
    assert a_last > 90
    # B shares the first admission pass with A, and its last request the next free slots.
    assert min(b_steps) == 1
    assert max(b_steps) <= PARAMS.max_tokens + 2

"""LLMEngine behaviour on the tiny random LLaMA: batching, sampling, stops, limits, aborts."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from loramux_engine import (
    InvalidSamplingParamsError,
    LLMEngine,
    PromptTooLongError,
    SamplingParams,
)

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
PROMPTS = [[5 + (i * 7 + j * 13) % 250 for j in range(n)] for i, n in enumerate([3, 40, 17, 90])]


def test_greedy_equals_transformers_generate(
    device_engine: LLMEngine, tiny_llama_dir: Path
) -> None:
    reference = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    outputs = device_engine.generate(PROMPTS, GREEDY)
    for prompt, out in zip(PROMPTS, outputs, strict=True):
        with torch.no_grad():
            ids = reference.generate(
                torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None
            )
        assert out.new_token_ids == ids[0, len(prompt) :].tolist()
        assert out.finish_reason == "length"
        assert out.num_output_tokens == 12


def test_seeded_sampling_ignores_batch_composition(tiny_engine: LLMEngine) -> None:
    params = SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=7, max_tokens=10)
    alone = tiny_engine.generate([PROMPTS[1]], params)[0].new_token_ids
    others = SamplingParams(temperature=1.0, seed=99, max_tokens=10)
    batched = tiny_engine.generate(PROMPTS, [others, params, others, others])[1].new_token_ids
    assert alone == batched
    other_seed = SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=8, max_tokens=10)
    assert tiny_engine.generate([PROMPTS[1]], other_seed)[0].new_token_ids != alone


def test_stop_string_truncates_text(tiny_engine: LLMEngine) -> None:
    full = tiny_engine.generate([PROMPTS[2]], GREEDY)[0]
    stop = full.text[4:6]
    assert stop and full.text.find(stop) == 4
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, stop=[stop])
    out = tiny_engine.generate([PROMPTS[2]], params)[0]
    assert out.finish_reason == "stop"
    assert out.text == full.text[:4]


def test_stop_token_id_ends_with_that_token(tiny_engine: LLMEngine) -> None:
    full = tiny_engine.generate([PROMPTS[3]], GREEDY)[0].new_token_ids
    params = SamplingParams(
        temperature=0.0, max_tokens=12, ignore_eos=True, stop_token_ids=[full[3]]
    )
    out = tiny_engine.generate([PROMPTS[3]], params)[0]
    first = full.index(full[3])
    assert out.new_token_ids == full[: first + 1]
    assert out.finish_reason == "stop"


def test_logprobs_of_chosen_tokens(tiny_engine: LLMEngine) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True, logprobs=3)
    out = tiny_engine.generate([PROMPTS[0]], params)[0]
    assert out.logprobs is not None and out.top_logprobs is not None
    assert len(out.logprobs) == len(out.top_logprobs) == 5
    for token, logprob, top in zip(out.new_token_ids, out.logprobs, out.top_logprobs, strict=True):
        assert len(top) == 3 and logprob <= 0.0
        assert top[token] == pytest.approx(logprob) == pytest.approx(max(top.values()))


def test_text_deltas_concatenate_to_the_decoded_output(tiny_engine: LLMEngine) -> None:
    tiny_engine.add_request("deltas", PROMPTS[1], GREEDY)
    text, tokens = "", []
    while tiny_engine.has_unfinished():
        for out in tiny_engine.step():
            text += out.text
            tokens += out.new_token_ids
    assert text == tiny_engine.tokenizer.decode(tokens, skip_special_tokens=True)


def test_prompt_too_long_is_refused_before_scheduling(
    make_engine: Callable[..., LLMEngine],
) -> None:
    engine = make_engine(max_model_len=32)
    with pytest.raises(PromptTooLongError):
        engine.add_request("long", list(range(3, 35)), GREEDY)
    assert not engine.has_unfinished()
    out = engine.generate([list(range(3, 30))], GREEDY)[0]
    assert out.finish_reason == "length" and out.num_output_tokens == 32 - 27


@pytest.mark.parametrize(
    "kwargs",
    [{"temperature": -1.0}, {"top_p": 0.0}, {"top_k": -1}, {"max_tokens": 0}, {"stop": [""]}],
)
def test_bad_sampling_params_are_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(InvalidSamplingParamsError):
        SamplingParams(**kwargs)  # type: ignore[arg-type]


def test_full_cache_makes_requests_wait_not_fail(make_engine: Callable[..., LLMEngine]) -> None:
    roomy = make_engine()
    expected = [o.new_token_ids for o in roomy.generate(PROMPTS, GREEDY)]
    # room for about one of the longer requests at a time
    bytes_per_row = roomy.model_args.kv_bytes_per_token * 4
    engine = make_engine(kv_cache_bytes=112 * bytes_per_row, max_model_len=110)
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(str(i), prompt, GREEDY)
    got: dict[str, list[int]] = {str(i): [] for i in range(len(PROMPTS))}
    max_waiting = 0
    while engine.has_unfinished():
        for out in engine.step():
            got[out.request_id] += out.new_token_ids
        max_waiting = max(max_waiting, engine.stats().num_waiting)
    assert max_waiting > 0
    assert [got[str(i)] for i in range(len(PROMPTS))] == expected
    assert engine.stats().kv_cache_usage == 0.0


def test_abort_frees_the_request(tiny_engine: LLMEngine) -> None:
    tiny_engine.add_request("a", PROMPTS[1], GREEDY)
    tiny_engine.add_request("b", PROMPTS[2], GREEDY)
    tiny_engine.step()
    tiny_engine.abort("a")
    finals = {}
    while tiny_engine.has_unfinished():
        for out in tiny_engine.step():
            if out.finished:
                finals[out.request_id] = out.finish_reason
    assert finals == {"a": "abort", "b": "length"}
    assert tiny_engine.stats().kv_cache_usage == 0.0


def test_priority_admits_lower_values_first(make_engine: Callable[..., LLMEngine]) -> None:
    engine = make_engine(max_num_seqs=1)
    engine.add_request("batch", PROMPTS[0], GREEDY, priority=1)
    engine.add_request("interactive", PROMPTS[0], GREEDY, priority=0)
    first = engine.step()
    assert [o.request_id for o in first] == ["interactive"]
    stats = engine.stats()
    assert (stats.num_running, stats.num_waiting) == (1, 1)

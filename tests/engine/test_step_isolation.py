"""One request's numbers never break the shared step (DESIGN.md, "Tenants are hostile").

An attacker beside victims in one batch: extreme finite sampling parameters, NaN or
infinite logits (an adapter slot filled with the largest finite weight), a sampler or
a forward that raises for the attacker's sequence. Each victim gets exactly the tokens
it gets alone (seeded sampling included, so a rerun step must rewind its generator),
the attacker finishes with an error of its own or with ordinary tokens, and the engine
keeps serving.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from loramux_engine import AsyncLLMEngine, EngineConfig, LLMEngine, SamplingParams
from loramux_engine.engine import model_runner
from loramux_engine.errors import (
    InvalidSamplingParamsError,
    NonFiniteLogitsError,
    SequenceFailedError,
)
from loramux_engine.layers.sampler import NEG_INF_LOGPROB, SampledToken, sample
from loramux_engine.lora import AdapterRef, DirectorySource
from loramux_engine.lora.ops import LoRABatch, LoRAStack, add_lora
from loramux_engine.outputs import RequestOutput
from tests.engine.peft_reference import load_base, publish_dir, save_random_adapter

MARK = 250  # a token id only the attacker's prompts hold
VICTIM_PROMPTS = [[5 + (i * 7 + j * 13) % 240 for j in range(n)] for i, n in enumerate([3, 40, 17])]
VICTIM_PARAMS = [
    SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, logprobs=3),
    SamplingParams(temperature=0.8, top_p=0.9, top_k=40, seed=11, max_tokens=10, ignore_eos=True),
    SamplingParams(temperature=1.0, seed=5, max_tokens=10, ignore_eos=True),
]
ATTACKER_PROMPT = [MARK] + [7 + (j * 5) % 200 for j in range(89)]  # 90 tokens: chunked prefill
GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
EXTREMES: list[dict[str, float]] = [
    {"temperature": 1e-45},
    {"temperature": 1e-300},
    {"temperature": 5e-324},
    {"temperature": 1e-5},
    {"temperature": 1.7e308},
    {"top_p": 1e-300},
    {"top_p": 5e-324},
    {"temperature": 1.7e308, "top_p": 5e-324},
]


def _alone(engine: LLMEngine, adapters: list[AdapterRef | None] | None = None) -> list[list[int]]:
    adapters = adapters or [None] * len(VICTIM_PROMPTS)
    return [
        engine.generate([prompt], params, [adapter])[0].new_token_ids
        for prompt, params, adapter in zip(VICTIM_PROMPTS, VICTIM_PARAMS, adapters, strict=True)
    ]


def _beside(
    engine: LLMEngine,
    attacker: SamplingParams,
    attacker_adapter: AdapterRef | None = None,
    victim_adapters: list[AdapterRef | None] | None = None,
) -> tuple[list[RequestOutput], RequestOutput]:
    """The victims and the attacker in one batch; (victims' outputs, attacker's output).

    The victims' prompts (60 tokens) fit one step of 64, so the attacker's first chunk,
    which holds MARK, shares the first step with all three.
    """
    victim_adapters = victim_adapters or [None] * len(VICTIM_PROMPTS)
    outputs = engine.generate(
        [*VICTIM_PROMPTS, ATTACKER_PROMPT],
        [*VICTIM_PARAMS, attacker],
        [*victim_adapters, attacker_adapter],
    )
    return outputs[:-1], outputs[-1]


def _assert_confined(victims: list[RequestOutput], alone: list[list[int]]) -> None:
    assert [v.new_token_ids for v in victims] == alone
    for victim in victims:
        assert victim.finish_reason == "length" and victim.error is None
        for logprob in victim.logprobs or []:
            assert math.isfinite(logprob)


# -- SamplingParams and the sampler, without a model --------------------------------------


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_non_finite_temperature_and_top_p_are_refused(value: float) -> None:
    with pytest.raises(InvalidSamplingParamsError):
        SamplingParams(temperature=value)
    with pytest.raises(InvalidSamplingParamsError):
        SamplingParams(top_p=value)


def test_temperatures_below_the_epsilon_sample_greedily() -> None:
    for temperature in (0.0, 5e-324, 1e-45, 1e-300, 9.9e-6):
        assert SamplingParams(temperature=temperature).greedy
    assert not SamplingParams(temperature=1e-5).greedy


def test_extreme_finite_parameters_and_logits_sample_a_real_token() -> None:
    # Logits as far apart as float32 goes, and -inf: (row - max) / T overflows in float32.
    row = torch.tensor([3e38, -3e38, 0.0, float("-inf"), 1.0, -1.0])
    cases = [
        SamplingParams(temperature=1e-5, logprobs=5),
        SamplingParams(temperature=1.7e308, logprobs=5),
        SamplingParams(temperature=1.7e308, top_k=3, logprobs=5),
        SamplingParams(temperature=0.7, top_p=5e-324, logprobs=5),
        SamplingParams(temperature=1e-5, top_p=1e-300, top_k=2, logprobs=5),
        SamplingParams(temperature=2.0, top_p=0.5, logprobs=5),
    ]
    for seed in range(20):
        generators: list[torch.Generator | None] = [
            torch.Generator().manual_seed(seed) for _ in cases
        ]
        results = sample(row.expand(len(cases), -1), cases, generators)
        for params, result in zip(cases, results, strict=True):
            assert result.error is None
            assert result.token_id != 3, "a token of probability 0 was drawn"
            if params.temperature < 1.0:  # 1e-5 is a near-greedy temperature
                assert result.token_id == 0
            assert result.logprob is not None and result.top_logprobs is not None
            values = [result.logprob, *result.top_logprobs.values()]
            assert all(math.isfinite(v) and v >= NEG_INF_LOGPROB for v in values)


def test_non_finite_rows_fail_alone_and_the_others_draw_as_alone() -> None:
    torch.manual_seed(0)
    good = torch.randn(3, 50)
    nan_row = good[0].clone()
    nan_row[7] = float("nan")
    pos_inf_row = good[1].clone()
    pos_inf_row[3] = float("inf")
    all_neg_inf = torch.full((50,), float("-inf"))
    logits = torch.stack([good[0], nan_row, good[1], all_neg_inf, good[2], pos_inf_row])
    params = [
        SamplingParams(temperature=0.9, seed=0, logprobs=2),
        GREEDY,  # argmax over a NaN row picks the NaN: it must fail, not answer
        SamplingParams(temperature=1.3, top_k=10, seed=2),
        SamplingParams(temperature=0.9, seed=3),
        SamplingParams(temperature=0.0, logprobs=3),
        SamplingParams(temperature=0.9, seed=5, logprobs=1),
    ]
    results = sample(logits, params, [torch.Generator().manual_seed(i) for i in range(6)])
    for i in (1, 3, 5):
        assert results[i].token_id == -1 and isinstance(results[i].error, NonFiniteLogitsError)
    good_rows = (0, 2, 4)
    alone = sample(
        good,
        [params[i] for i in good_rows],
        [torch.Generator().manual_seed(i) for i in good_rows],
    )
    for i, expected in zip(good_rows, alone, strict=True):
        assert results[i].error is None
        assert results[i].token_id == expected.token_id
        assert results[i].logprob == pytest.approx(expected.logprob)
        assert results[i].top_logprobs == pytest.approx(expected.top_logprobs)


def test_bmm_pads_do_not_carry_a_hostile_slot_into_another_request() -> None:
    # The bmm kernel pads every slot's group to the busiest slot's width with row 0;
    # a pad's h is row 0 times the slot's A, which the largest finite weight makes inf.
    torch.manual_seed(0)
    num_slots, rank, features = 4, 4, 16
    stack = LoRAStack(
        a=torch.zeros(num_slots, rank, features),
        b_t=torch.zeros(num_slots, rank, features),
        scale=torch.zeros(num_slots),
    )
    for slot in (1, 2, 3):
        stack.a[slot].normal_()
        stack.b_t[slot].normal_()
        stack.set_slot(slot, rank, 1.0)
    x = torch.randn(6, features)
    slot_ids = [1, 1, 2, 3, 3, 3]  # row 0 is a victim on slot 1; slot 2's group is padded
    batch = LoRABatch.build(slot_ids, "cpu", kernel="bmm")
    clean = torch.zeros(6, features)
    add_lora(clean, x, stack, batch)
    stack.a[2].fill_(torch.finfo(torch.float32).max)
    poisoned = torch.zeros(6, features)
    add_lora(poisoned, x, stack, batch)
    assert not poisoned[2].isfinite().all()
    victims = [0, 1, 3, 4, 5]
    assert torch.equal(poisoned[victims], clean[victims])


# -- LLMEngine: an attacker in the victims' batch -------------------------------------------


@pytest.fixture(scope="module")
def alone(tiny_engine: LLMEngine) -> list[list[int]]:
    return _alone(tiny_engine)


@pytest.mark.parametrize(
    "extreme", EXTREMES, ids=lambda e: ",".join(f"{k}={v}" for k, v in e.items())
)
def test_extreme_sampling_parameters_are_confined_to_their_request(
    tiny_engine: LLMEngine, alone: list[list[int]], extreme: dict[str, float]
) -> None:
    attacker = SamplingParams(
        temperature=extreme.get("temperature", 1.0),
        top_p=extreme.get("top_p", 1.0),
        max_tokens=10,
        ignore_eos=True,
        logprobs=5,
    )
    victims, attack = _beside(tiny_engine, attacker)
    _assert_confined(victims, alone)
    assert attack.finish_reason == "length" and attack.error is None
    assert len(attack.new_token_ids) == 10
    assert attack.logprobs is not None and all(math.isfinite(v) for v in attack.logprobs)
    if attacker.greedy:
        greedy = tiny_engine.generate([ATTACKER_PROMPT], GREEDY)[0].new_token_ids
        assert attack.new_token_ids == greedy


def test_a_sampler_failing_for_one_row_fails_that_request_only(
    tiny_engine: LLMEngine, alone: list[list[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    attacker = SamplingParams(temperature=0.5, seed=3, max_tokens=10, ignore_eos=True)
    real_sample = model_runner.sample

    def sample_then_fail(
        logits: torch.Tensor,
        params: list[SamplingParams],
        generators: list[torch.Generator | None],
        drafts: list[list[int]] | None = None,
    ) -> list[SampledToken]:
        # Every row draws first, so the victims' generators have moved when it raises.
        results = real_sample(logits, params, generators, drafts)
        if any(p is attacker for p in params):
            raise RuntimeError("probability tensor contains either inf, nan or element < 0")
        return results

    monkeypatch.setattr(model_runner, "sample", sample_then_fail)
    victims, attack = _beside(tiny_engine, attacker)
    _assert_confined(victims, alone)
    assert attack.finish_reason == "error" and attack.new_token_ids == []
    assert isinstance(attack.error, SequenceFailedError)
    assert isinstance(attack.error.__cause__, RuntimeError)
    monkeypatch.undo()
    assert _alone(tiny_engine) == alone
    assert not tiny_engine.has_unfinished()


def _refuse_marked_tokens(engine: LLMEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    """The model's forward raises for any batch holding MARK, as a kernel bug would."""
    model = engine.runner.model
    forward = model.forward

    def forward_unless_marked(input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if bool((input_ids == MARK).any()):
            raise IndexError("a kernel refused this sequence's tokens")
        return forward(input_ids, positions)

    monkeypatch.setattr(model, "forward", forward_unless_marked)


def test_a_forward_failing_on_one_prompt_chunk_fails_that_request_only(
    tiny_engine: LLMEngine, alone: list[list[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    _refuse_marked_tokens(tiny_engine, monkeypatch)
    # MARK must reach the forward: not served from blocks an earlier test cached
    monkeypatch.setattr(tiny_engine.scheduler.kv_cache, "enable_prefix_caching", False)
    victims, attack = _beside(tiny_engine, GREEDY)
    _assert_confined(victims, alone)
    # It failed in its first prompt chunk, a step in which it would not have sampled.
    assert attack.finish_reason == "error" and attack.new_token_ids == []
    assert isinstance(attack.error, SequenceFailedError)
    assert tiny_engine.scheduler.kv_cache.num_used_blocks == 0
    monkeypatch.undo()
    assert _alone(tiny_engine) == alone


@pytest.fixture(scope="module")
def adapter_refs(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("hostile")
    base = load_base(tiny_llama_dir)
    refs = {}
    for name, seed in (("friendly", 1), ("hostile", 2)):
        path, base = save_random_adapter(
            base, tmp / name, seed=seed, std=0.3, r=8, lora_alpha=16, target_modules="all-linear"
        )
        refs[name] = publish_dir(tmp / "source", path, name)
    return {"root": tmp / "source", **refs}


def test_an_adapter_slot_with_huge_weights_fails_only_its_requests(
    make_engine: Callable[..., LLMEngine], adapter_refs: dict[str, Any], tmp_path: Path
) -> None:
    engine = make_engine(
        max_model_len=128,
        max_num_batched_tokens=64,
        adapter_source=DirectorySource(adapter_refs["root"]),
        adapter_cache_dir=str(tmp_path / "cache"),
    )
    friendly, hostile = adapter_refs["friendly"], adapter_refs["hostile"]
    victim_adapters: list[AdapterRef | None] = [None, friendly, None]
    alone = _alone(engine, victim_adapters)
    # Load the hostile adapter normally, then fill its resident slot with the largest finite
    # weight: loads refuse such values (lora/values.py), but the step must not rely on that.
    assert engine.generate([ATTACKER_PROMPT], GREEDY, [hostile])[0].error is None
    assert engine.adapters is not None
    slot = engine.adapters._slots[hostile.sha256]
    for stack in engine.adapters.pool.stacks.values():
        rank = stack.ranks[slot]
        stack.a[slot, :rank].fill_(torch.finfo(stack.a.dtype).max)
        stack.b_t[slot, :rank].fill_(torch.finfo(stack.b_t.dtype).max)
    for attacker in (GREEDY, SamplingParams(temperature=0.9, max_tokens=10, logprobs=2)):
        victims, attack = _beside(engine, attacker, hostile, victim_adapters)
        _assert_confined(victims, alone)
        assert attack.finish_reason == "error" and attack.new_token_ids == []
        assert isinstance(attack.error, NonFiniteLogitsError)
    assert engine.scheduler.kv_cache.num_used_blocks == 0
    assert engine.adapters.stats()["device"]["pinned"] == 0
    assert _alone(engine, victim_adapters) == alone


# -- AsyncLLMEngine: the attacker's stream fails, the victim's does not ------------------------


async def test_async_engine_fails_only_the_attackers_stream(
    tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    attacker = SamplingParams(temperature=0.5, max_tokens=10, ignore_eos=True)
    real_sample = model_runner.sample

    def sample_or_fail(
        logits: torch.Tensor,
        params: list[SamplingParams],
        generators: list[torch.Generator | None],
        drafts: list[list[int]] | None = None,
    ) -> list[SampledToken]:
        if any(p is attacker for p in params):
            raise RuntimeError("multinomial: invalid distribution")
        return real_sample(logits, params, generators, drafts)

    monkeypatch.setattr(model_runner, "sample", sample_or_fail)
    engine = LLMEngine(EngineConfig(str(tiny_llama_dir), max_model_len=128))
    alone = _alone(engine)
    async_engine = AsyncLLMEngine(engine)

    async def collect(request_id: str, prompt: list[int], params: SamplingParams) -> list[int]:
        tokens: list[int] = []
        async for out in async_engine.generate(request_id, prompt, params):
            tokens += out.new_token_ids
        return tokens

    try:
        results = await asyncio.gather(
            collect("attacker", ATTACKER_PROMPT, attacker),
            *(
                collect(f"victim-{i}", prompt, params)
                for i, (prompt, params) in enumerate(
                    zip(VICTIM_PROMPTS, VICTIM_PARAMS, strict=True)
                )
            ),
            return_exceptions=True,
        )
        assert isinstance(results[0], SequenceFailedError)
        assert results[1:] == alone
        assert await collect("after", VICTIM_PROMPTS[0], VICTIM_PARAMS[0]) == alone[0]
    finally:
        async_engine.shutdown()


def test_a_failed_prompt_chunk_leaves_nothing_in_the_prefix_cache(
    make_engine: Callable[..., LLMEngine], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The blocks of a chunk whose forward raised hold keys and values never written:
    the same prompt afterwards must compute them, not find them cached."""
    engine = make_engine(max_num_batched_tokens=64)
    prompt = [MARK, *range(3, 90)]  # the first chunk fills four whole blocks
    _refuse_marked_tokens(engine, monkeypatch)
    (failed,) = engine.generate([prompt], GREEDY)
    assert failed.finish_reason == "error"
    monkeypatch.undo()
    before = engine.stats().prefix_cache_hits_tokens_total
    (again,) = engine.generate([prompt], GREEDY)
    assert engine.stats().prefix_cache_hits_tokens_total == before
    uncached = make_engine(max_num_batched_tokens=64, enable_prefix_caching=False)
    assert again.new_token_ids == uncached.generate([prompt], GREEDY)[0].new_token_ids

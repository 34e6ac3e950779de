"""Speculative decoding by prompt lookup (engine/spec_decode.py): exact for greedy decoding,
the same distribution for sampling, inside mixed-adapter batches over the paged KV cache.

Tiny random LLaMAs (tests/fixtures/models.py) at a smaller initializer range fall into
loops of repeated tokens, which prompt lookup drafts and the model accepts, and break out
of them, where drafts are rejected: each check below asserts that both happened.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from loramux.errors import InvalidRequest
from loramux.inference.request import parse_chat, parse_completion
from loramux.settings import Settings
from loramux_engine import EngineConfig, LLMEngine, SamplingParams
from loramux_engine.engine.spec_decode import NgramIndex
from loramux_engine.errors import InvalidSamplingParamsError
from loramux_engine.layers.sampler import accept_draft, probabilities
from loramux_engine.lora import AdapterRef, DirectorySource
from loramux_engine.outputs import RequestOutput
from tests.engine.peft_reference import load_base, publish_dir, save_random_adapter
from tests.fixtures.models import byte_level_tokenizer

GREEDY = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)


@pytest.fixture(scope="module")
def looping_dir(make_tiny_llama: Callable[..., Path]) -> Path:
    """Greedy output in runs of one token (drafts accepted) broken now and then (rejected)."""
    return make_tiny_llama(initializer_range=0.1, max_position_embeddings=1024)


@pytest.fixture(scope="module")
def adapters(looping_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("spec-adapters")
    base = load_base(looping_dir)
    refs: dict[str, Any] = {"root": tmp / "source"}
    for name, seed in (("a", 1), ("b", 2)):
        path, base = save_random_adapter(
            base, tmp / name, seed=seed, std=0.1, r=8, lora_alpha=16, target_modules="all-linear"
        )
        refs[name] = publish_dir(refs["root"], path, f"{name}-v1")
    return refs


def _engine(model_dir: Path, speculative: str, **overrides: Any) -> LLMEngine:
    overrides.setdefault("kv_cache_bytes", 16 << 20)  # 16k tokens of the tiny model, not 1 GiB
    return LLMEngine(
        EngineConfig(str(model_dir), dtype="float32", speculative=speculative, **overrides)
    )


def _prompts(n: int, seed: int, lengths: tuple[int, int] = (8, 40)) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 259) for _ in range(rng.randint(*lengths))] for _ in range(n)]


def _run(
    engine: LLMEngine,
    prompts: list[list[int]],
    params: SamplingParams | list[SamplingParams],
    adapters: list[AdapterRef | None] | None = None,
) -> list[RequestOutput]:
    outs = engine.generate(prompts, params, adapters)
    assert all(o.error is None for o in outs)
    assert engine.stats().kv_blocks_used == 0  # every block came back, rejected rows' too
    return outs


def _drafts(engine: LLMEngine) -> tuple[int, int]:
    stats = engine.stats()
    return stats.spec_decode_num_draft_tokens_total, stats.spec_decode_num_accepted_tokens_total


# -- drafting -----------------------------------------------------------------------------


def test_ngram_index_proposes_what_followed_the_latest_longest_match() -> None:
    index = NgramIndex(vocab_size=100)
    tokens = [1, 2, 3, 9, 1, 2, 3, 7, 8, 5, 2, 3]
    # (2, 3) last came before 7 (the 3-gram (5, 2, 3) never did)
    assert index.propose(tokens, 3) == [7, 8, 5]
    tokens += [7, 4]
    assert index.propose(tokens, 2) == []  # (7, 4) and 4 are new
    tokens += [1, 2, 3]
    # the longest match wins: (1, 2, 3) last came before 7, 8; the later (2, 3) before 7, 4
    assert index.propose(tokens, 2) == [7, 8]
    assert index.propose(tokens, 0) == []
    # a run into the end of the text is a loop: the drafts go round it
    assert NgramIndex(100).propose([5, 6, 6, 6], 4) == [6, 6, 6, 6]
    assert NgramIndex(100).propose([1, 2, 1, 2], 5) == [1, 2, 1, 2, 1]
    assert NgramIndex(100).propose([1, 2, 3], 3) == []
    assert NgramIndex(100).propose([4, 4], 2, min_n=2) == []


# -- rejection sampling -------------------------------------------------------------------


def _chi2_sf(statistic: float, df: int) -> float:
    """P(X >= statistic) for X ~ chi-square(df): the regularized upper incomplete gamma."""
    return float(torch.special.gammaincc(torch.tensor(df / 2.0), torch.tensor(statistic / 2.0)))


def _goodness_of_fit(counts: list[int], probs: list[float]) -> float:
    """The p-value of observed ``counts`` under ``probs`` (categories with p > 0)."""
    total = sum(counts)
    cells = [(c, p * total) for c, p in zip(counts, probs, strict=True) if p > 0]
    assert sum(c for c, _ in cells) == total, "a count where the probability is 0"
    statistic = sum((c - e) ** 2 / e for c, e in cells)
    return _chi2_sf(statistic, len(cells) - 1)


def _homogeneity(a: Counter[Any], b: Counter[Any]) -> float:
    """The p-value of two samples drawn from one categorical distribution."""
    cats = sorted(set(a) | set(b))
    na, nb = sum(a.values()), sum(b.values())
    statistic = 0.0
    for cat in cats:
        total = a[cat] + b[cat]
        for observed, n in ((a[cat], na), (b[cat], nb)):
            expected = total * n / (na + nb)
            statistic += (observed - expected) ** 2 / expected
    return _chi2_sf(statistic, len(cats) - 1)


@pytest.mark.parametrize("draft", [0, 2, 4])
def test_accept_draft_is_rejection_sampling_with_the_exact_probabilities(draft: int) -> None:
    """Accepted with probability p(draft); a rejected draft gives the residual (p without
    the draft, renormalized); the token is distributed as p, whatever the draft."""
    params = SamplingParams(temperature=0.7, top_k=4)
    logits = torch.tensor([2.0, 1.5, 1.0, 0.2, -1.0])
    probs = probabilities(logits, logits.max(), params)
    assert probs[4] == 0  # top_k cuts the last: a draft there is always rejected
    p = probs.tolist()
    generator = torch.Generator().manual_seed(draft)
    n = 10_000
    tokens: list[int] = []
    rejected: list[int] = []
    for _ in range(n):
        accepted, token = accept_draft(probs, draft, generator)
        assert accepted == (token == draft)
        tokens.append(token)
        if not accepted:
            rejected.append(token)
    rate = 1 - len(rejected) / n
    assert abs(rate - p[draft]) <= 5 * math.sqrt(p[draft] * (1 - p[draft]) / n)
    counts = Counter(tokens)
    assert _goodness_of_fit([counts[t] for t in range(5)], p) > 1e-3
    residual = [0.0 if t == draft else q / (1 - p[draft]) for t, q in enumerate(p)]
    counts = Counter(rejected)
    assert _goodness_of_fit([counts[t] for t in range(5)], residual) > 1e-3
    # a draft the filters removed is rejected every time, and the token drawn as usual
    assert not any(accept_draft(probs, 4, generator)[0] for _ in range(100))


@pytest.fixture(scope="module")
def small_vocab_dir(make_tiny_llama: Callable[..., Path]) -> Path:
    """Eight tokens: sampled text repeats n-grams, so drafts come every step."""
    return make_tiny_llama(vocab_size=8, initializer_range=0.2)


def test_seeded_sampling_is_the_distribution_and_the_tokens_of_plain_sampling(
    small_vocab_dir: Path,
) -> None:
    prompt = [3, 4, 5, 3, 4, 5, 6, 7]
    n = 300

    def sampled(engine: LLMEngine, seeds: range) -> list[list[int]]:
        params = [
            SamplingParams(temperature=1.0, max_tokens=6, ignore_eos=True, seed=s) for s in seeds
        ]
        return [o.new_token_ids for o in _run(engine, [prompt] * len(seeds), params)]

    spec = _engine(small_vocab_dir, "on", max_num_seqs=n)
    plain = _engine(small_vocab_dir, "off", max_num_seqs=n)
    with_drafts = sampled(spec, range(n))
    drafted, accepted = _drafts(spec)
    assert drafted > n and 0 < accepted < drafted
    # each seeded request draws one uniform per token either way: the same tokens
    assert with_drafts == sampled(plain, range(n))
    # and against plain sampling on other seeds, the same distribution at each position
    others = sampled(plain, range(n, 2 * n))
    for position in range(1, 6):
        p_value = _homogeneity(
            Counter(t[position] for t in with_drafts), Counter(t[position] for t in others)
        )
        assert p_value > 1e-3, (position, p_value)


# -- greedy exactness ---------------------------------------------------------------------


def test_greedy_is_token_identical_in_a_mixed_adapter_batch(
    looping_dir: Path, adapters: dict[str, Any], tmp_path: Path
) -> None:
    prompts = _prompts(6, seed=1)
    mix = [None, adapters["a"], adapters["b"]] * 2
    params = [GREEDY] * 5 + [SamplingParams(temperature=0.0, max_tokens=64, logprobs=2)]
    outs = {}
    engines = {}
    for mode in ("off", "on"):
        source = DirectorySource(adapters["root"])
        engines[mode] = engine = _engine(
            looping_dir, mode, adapter_source=source, adapter_cache_dir=str(tmp_path / mode)
        )
        outs[mode] = _run(engine, prompts, params, mix)
    assert [o.new_token_ids for o in outs["on"]] == [o.new_token_ids for o in outs["off"]]
    assert [o.finish_reason for o in outs["on"]] == [o.finish_reason for o in outs["off"]]
    on, off = outs["on"][-1], outs["off"][-1]
    assert on.logprobs == pytest.approx(off.logprobs, abs=1e-4)
    assert [list(t) for t in on.top_logprobs or []] == [list(t) for t in off.top_logprobs or []]
    drafted, accepted = _drafts(engines["on"])
    assert 0 < accepted < drafted  # drafts were accepted and rejected
    assert _drafts(engines["off"]) == (0, 0)
    # adapter requests draft and accept too, alone
    alone = _engine(
        looping_dir, "on", adapter_source=DirectorySource(adapters["root"]),
        adapter_cache_dir=str(tmp_path / "alone"),
    )  # fmt: skip
    out = _run(alone, prompts[1:2], GREEDY, [adapters["a"]])[0]
    assert out.new_token_ids == outs["off"][1].new_token_ids
    assert _drafts(alone)[1] > 0


def test_greedy_is_exact_under_preemption(
    looping_dir: Path, adapters: dict[str, Any], tmp_path: Path
) -> None:
    """Eight requests that together need several times the cache: preempted, recomputed,
    drafting again after it, and every stream equal to plain decoding's."""
    prompts = _prompts(8, seed=2, lengths=(10, 30))
    mix = [None, adapters["a"], adapters["b"], adapters["a"]] * 2
    params = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True)
    source = {"adapter_source": DirectorySource(adapters["root"])}
    plain = _engine(looping_dir, "off", adapter_cache_dir=str(tmp_path / "roomy"), **source)
    expected = [o.new_token_ids for o in _run(plain, prompts, params, mix)]
    per_token = plain.model_args.kv_bytes_per_token * 4
    tight = _engine(
        looping_dir, "on", kv_cache_bytes=128 * per_token, max_model_len=128, kv_block_size=8,
        adapter_cache_dir=str(tmp_path / "tight"), **source,
    )  # fmt: skip
    assert [o.new_token_ids for o in _run(tight, prompts, params, mix)] == expected
    assert tight.stats().num_preemptions_total > 0
    drafted, accepted = _drafts(tight)
    assert 0 < accepted < drafted


def test_prefix_cache_holds_only_verified_tokens(looping_dir: Path) -> None:
    """A request that speculated (rejected drafts included) leaves its blocks in the prefix
    cache; a later request reusing them answers as with no prefix cache at all."""
    engine = _engine(looping_dir, "on", kv_block_size=4)
    uncached = _engine(looping_dir, "off", enable_prefix_caching=False)
    (prompt,) = _prompts(1, seed=3, lengths=(30, 30))
    first = _run(engine, [prompt], GREEDY)[0].new_token_ids
    drafted, accepted = _drafts(engine)
    assert 0 < accepted < drafted
    follow_up = prompt + first[:60] + [7, 8, 9]
    before = engine.stats().prefix_cache_hits_tokens_total
    again = _run(engine, [follow_up], GREEDY)[0].new_token_ids
    assert engine.stats().prefix_cache_hits_tokens_total - before >= 80
    assert again == _run(uncached, [follow_up], GREEDY)[0].new_token_ids


# -- stopping -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def repeating(make_tiny_llama: Callable[..., Path]) -> tuple[Path, list[int], str]:
    """A model, a prompt and the character its greedy output repeats (a run of 24)."""
    model_dir = make_tiny_llama(initializer_range=0.05)
    engine = _engine(model_dir, "off")
    for prompt in _prompts(12, seed=5, lengths=(12, 12)):
        text = _run(engine, [prompt], SamplingParams(temperature=0.0, max_tokens=24))[0].text
        if len(text) == 24 and text == text[0] * 24 and text[0].isalnum():
            return model_dir, prompt, text[0]
    raise AssertionError("no prompt with a repeating greedy output")


def test_stop_strings_and_max_tokens_cut_accepted_drafts(
    repeating: tuple[Path, list[int], str],
) -> None:
    model_dir, prompt, char = repeating
    cases = [
        SamplingParams(temperature=0.0, max_tokens=40, stop=["zz", char * n], logprobs=n % 2 == 0)
        for n in range(8, 12)
    ]
    cases += [
        SamplingParams(temperature=0.0, max_tokens=11),
        SamplingParams(temperature=0.0, max_tokens=40, stop_token_ids=[0, 1]),  # never met
    ]
    plain = _engine(model_dir, "off")
    spec = _engine(model_dir, "on")
    num_cut = 0
    for params in cases:
        expected = _run(plain, [prompt], params)[0]
        before = _drafts(spec)[1]
        got = _run(spec, [prompt], params)[0]
        assert got.new_token_ids == expected.new_token_ids
        assert (got.text, got.finish_reason) == (expected.text, expected.finish_reason)
        assert got.num_output_tokens == expected.num_output_tokens
        if params.logprobs:
            assert got.logprobs == pytest.approx(expected.logprobs, abs=1e-4)
            assert len(got.logprobs or []) == len(got.new_token_ids)
        accepted = _drafts(spec)[1] - before
        assert accepted > 0
        # the stop came inside a verified run: accepted drafts were dropped after it
        num_cut += 1 + accepted > len(got.new_token_ids)
    assert num_cut >= 2
    assert [len(o.new_token_ids) for o in _run(spec, [prompt] * 2, cases[-2:])] == [11, 40]


def test_streamed_tokens_come_once_each(looping_dir: Path) -> None:
    engine = _engine(looping_dir, "on")
    prompts = _prompts(4, seed=6)
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, GREEDY)
    streamed: list[list[int]] = [[] for _ in prompts]
    most_per_step = 0
    while engine.has_unfinished():
        for out in engine.step():
            streamed[int(out.request_id)] += out.new_token_ids
            most_per_step = max(most_per_step, len(out.new_token_ids))
    assert most_per_step > 1
    plain = _run(_engine(looping_dir, "off"), prompts, GREEDY)
    assert streamed == [o.new_token_ids for o in plain]


# -- the switch ---------------------------------------------------------------------------


def test_request_field_overrides_the_engine_mode_and_auto_backs_off(
    looping_dir: Path, tiny_llama_dir: Path
) -> None:
    prompts = _prompts(4, seed=7)
    asked = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True, speculative=True)
    refused = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True, speculative=False)
    off = _engine(looping_dir, "off")
    expected = [o.new_token_ids for o in _run(off, prompts, GREEDY)]
    assert [o.new_token_ids for o in _run(off, prompts, asked)] == expected
    assert _drafts(off)[1] > 0
    on = _engine(looping_dir, "on")
    assert [o.new_token_ids for o in _run(on, prompts, refused)] == expected
    assert _drafts(on) == (0, 0)
    # on the default tiny model drafts nearly always fail: "on" keeps drafting (one token
    # a step), "auto" backs off, drafting in few steps
    params = SamplingParams(temperature=0.0, max_tokens=160, ignore_eos=True)
    counts = {}
    outs = {}
    for mode in ("on", "auto"):
        engine = _engine(tiny_llama_dir, mode)
        outs[mode] = [o.new_token_ids for o in _run(engine, prompts, params)]
        counts[mode] = (*_drafts(engine), engine.stats().spec_decode_num_drafting_steps_total)
    assert outs["on"] == outs["auto"]
    assert counts["on"][1] < counts["on"][0] / 4  # drafts fail
    assert 0 < counts["auto"][2] < counts["on"][2] / 3
    # and it drafts in full where drafts pay
    auto = _engine(looping_dir, "auto")
    assert [o.new_token_ids for o in _run(auto, prompts, GREEDY)] == expected
    drafted, accepted = _drafts(auto)
    assert accepted > drafted / 2


def test_a_non_finite_row_fails_only_its_sequence(
    looping_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from loramux_engine.engine import model_runner

    real_sample = model_runner.sample
    victim = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True)

    def nan_on_a_draft_row(
        logits: torch.Tensor,
        params: list[SamplingParams],
        generators: list[torch.Generator | None],
        drafts: list[list[int]] | None = None,
    ) -> Any:
        logits = logits.clone()
        row = 0
        for i, p in enumerate(params):
            num_rows = 1 + len(drafts[i]) if drafts is not None else 1
            if p is victim and num_rows > 1:
                logits[row : row + num_rows] = float("nan")
            row += num_rows
        return real_sample(logits, params, generators, drafts)

    prompts = _prompts(3, seed=8)
    expected = [o.new_token_ids for o in _run(_engine(looping_dir, "off"), prompts, GREEDY)]
    monkeypatch.setattr(model_runner, "sample", nan_on_a_draft_row)
    engine = _engine(looping_dir, "on")
    outs = engine.generate(prompts, [GREEDY, victim, GREEDY])
    assert outs[1].finish_reason == "error" and outs[1].error is not None
    assert [outs[0].new_token_ids, outs[2].new_token_ids] == [expected[0], expected[2]]
    assert engine.stats().kv_blocks_used == 0


def test_sampling_params_and_the_api_field() -> None:
    with pytest.raises(InvalidSamplingParamsError):
        SamplingParams(speculative=1)  # type: ignore[arg-type]
    tokenizer = byte_level_tokenizer()
    settings = Settings()
    for parse, body in [
        (parse_completion, {"model": "m", "prompt": "x"}),
        (parse_chat, {"model": "m", "messages": [{"role": "user", "content": "x"}]}),
    ]:
        assert parse(body, settings, tokenizer).params.speculative is None
        for value in (True, False, None):
            parsed = parse({**body, "speculative": value}, settings, tokenizer)
            assert parsed.params.speculative is value
        for bad in ("true", 1, 0, [], {}):
            with pytest.raises(InvalidRequest) as caught:
                parse({**body, "speculative": bad}, settings, tokenizer)
            assert caught.value.param == "speculative"


def test_metrics_count_draft_tokens_proposed_and_accepted(looping_dir: Path) -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from loramux.metrics import EngineCollector

    engine = _engine(looping_dir, "on")
    _run(engine, _prompts(2, seed=9), GREEDY)
    drafted, accepted = _drafts(engine)
    assert 0 < accepted <= drafted
    registry = CollectorRegistry()
    registry.register(EngineCollector(lambda: engine))
    exposed = generate_latest(registry).decode()
    assert f"loramux:spec_decode_num_draft_tokens_total {float(drafted)}" in exposed
    assert f"loramux:spec_decode_num_accepted_tokens_total {float(accepted)}" in exposed

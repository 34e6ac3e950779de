"""The paged KV cache through the engine: memory follows the tokens, preemption by
recompute, prefix caching per tenant and adapter version.

Every check compares greedy tokens (and a seeded sampled request) with the same request
run alone in a roomy engine, on the tiny random LLaMA. Stopping at EOS is played by
``stop_token_ids``: each request stops at a token its own output holds for the first
time, picked from its output alone, so the workload has the ragged lengths of real
chat traffic while ``max_tokens`` stays large.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from loramux_engine import EngineConfig, LLMEngine, SamplingParams
from loramux_engine.lora import AdapterRef, DirectorySource
from loramux_engine.models.config import load_model_args
from loramux_engine.outputs import RequestOutput
from tests.engine.lora.adapters import publish, read_files
from tests.engine.peft_reference import load_base, publish_dir, save_random_adapter

VOCAB = 259
GREEDY_LONG = SamplingParams(temperature=0.0, max_tokens=2048)


@pytest.fixture(scope="module")
def long_llama_dir(make_tiny_llama: Callable[..., Path]) -> Path:
    """The tiny LLaMA with room for a prompt plus 4,096 generated tokens."""
    return make_tiny_llama(max_position_embeddings=8192)


@pytest.fixture(scope="module")
def adapters(long_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Two adapters on every projection (k_proj and v_proj change the keys and values),
    and a second version of the first: the same bytes under another version id."""
    tmp = tmp_path_factory.mktemp("paged")
    base = load_base(long_llama_dir)
    refs: dict[str, Any] = {"root": tmp / "source"}
    for name, seed in (("a", 1), ("b", 2)):
        path, base = save_random_adapter(
            base, tmp / name, seed=seed, std=0.2, r=8, lora_alpha=16, target_modules="all-linear"
        )
        refs[name] = publish_dir(refs["root"], path, f"{name}-v1")
    refs["a2"] = publish(refs["root"], *read_files(tmp / "a"), "a-v2")
    return refs


def _engine(model_dir: Path, tokens: int, **overrides: Any) -> LLMEngine:
    """An fp32 engine whose KV cache holds ``tokens`` tokens."""
    per_token = load_model_args(str(model_dir)).kv_bytes_per_token * 4
    return LLMEngine(
        EngineConfig(
            str(model_dir), dtype="float32", kv_cache_bytes=tokens * per_token, **overrides
        )
    )


def _run(
    engine: LLMEngine, requests: list[tuple[list[int], SamplingParams, AdapterRef | None]]
) -> tuple[list[list[int]], int]:
    """Submit all at once; (each request's streamed tokens, the most requests running at
    once). Each token must come exactly once: the final count says how many there are."""
    for i, (prompt, params, adapter) in enumerate(requests):
        engine.add_request(str(i), prompt, params, fairness_key="t", adapter=adapter)
    deltas: list[list[list[int]]] = [[] for _ in requests]
    final: dict[int, RequestOutput] = {}
    most_running = 0
    while engine.has_unfinished():
        for out in engine.step():
            i = int(out.request_id)
            assert i not in final, "an output after the request finished"
            deltas[i].append(out.new_token_ids)
            if out.finished:
                assert out.error is None and out.finish_reason in ("stop", "length")
                final[i] = out
        most_running = max(most_running, engine.stats().num_running)
    streamed = [[t for delta in d for t in delta] for d in deltas]
    assert [len(s) for s in streamed] == [final[i].num_output_tokens for i in range(len(deltas))]
    assert engine.stats().kv_blocks_used == 0  # every block came back
    return streamed, most_running


def _alone(
    engine: LLMEngine, requests: list[tuple[list[int], SamplingParams, AdapterRef | None]]
) -> list[list[int]]:
    return [engine.generate([p], params, [a])[0].new_token_ids for p, params, a in requests]


def _prompts(n: int, seed: int, lengths: tuple[int, int] = (8, 40)) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, VOCAB) for _ in range(rng.randint(*lengths))] for _ in range(n)]


def _stop_at_eos(roomy: LLMEngine, prompts: list[list[int]], seed: int) -> list[SamplingParams]:
    """Per prompt: max_tokens 2048 and a stop token its greedy output first holds after
    about 10 to 70 tokens (the EOS of this workload)."""
    rng = random.Random(seed)
    probe = roomy.generate(prompts, SamplingParams(temperature=0.0, max_tokens=80))
    params = []
    for out in probe:
        tokens = out.new_token_ids
        firsts = [i for i, t in enumerate(tokens) if t not in tokens[:i]]
        target = rng.randint(10, 70)
        at = min(firsts, key=lambda i: abs(i - target))
        params.append(SamplingParams(temperature=0.0, max_tokens=2048, stop_token_ids=[tokens[at]]))
    return params


def test_memory_follows_the_tokens_not_max_tokens(long_llama_dir: Path) -> None:
    """A budget that reserves 6 sequences' prompt plus max_tokens holds all 48 at once,
    because each takes blocks only for the tokens it has."""
    roomy = _engine(long_llama_dir, 16384, max_num_seqs=64)
    prompts = _prompts(48, seed=1)
    params = _stop_at_eos(roomy, prompts, seed=1)
    requests = [(p, sp, None) for p, sp in zip(prompts, params, strict=True)]
    alone = _alone(roomy, requests)
    assert min(len(t) for t in alone) < 40 < max(len(t) for t in alone) < 2048
    six = 6 * (40 + 2048)
    engine = _engine(long_llama_dir, six, max_num_seqs=64, max_model_len=40 + 2048)
    streamed, most_running = _run(engine, requests)
    assert streamed == alone
    assert most_running > 6 and most_running == 48
    assert engine.stats().num_preemptions_total == 0


def test_preemption_mid_decode_keeps_every_stream_exact(
    long_llama_dir: Path, adapters: dict[str, Any], tmp_path: Path
) -> None:
    """Eight requests that together need four times the cache: preempted, recomputed,
    and every stream gets each token once, equal to its tokens alone."""
    source = {"adapter_source": DirectorySource(adapters["root"])}
    roomy = _engine(long_llama_dir, 4096, adapter_cache_dir=str(tmp_path / "roomy"), **source)
    mix = [None, adapters["a"], adapters["b"], adapters["a"]] * 2
    prompts = _prompts(8, seed=2, lengths=(10, 30))
    requests = [
        (p, SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True), a)
        for p, a in zip(prompts, mix, strict=True)
    ]
    requests[5] = (prompts[5], SamplingParams(temperature=0.8, seed=7, max_tokens=48), mix[5])
    alone = _alone(roomy, requests)
    engine = _engine(
        long_llama_dir, 128, max_model_len=128, kv_block_size=8,
        adapter_cache_dir=str(tmp_path / "tight"), **source,
    )  # fmt: skip
    streamed, _ = _run(engine, requests)
    assert streamed == alone
    assert engine.stats().num_preemptions_total > 0


def _complete(
    engine: LLMEngine, prompt: list[int], tenant: str, adapter: AdapterRef | None = None
) -> tuple[list[int], int, int]:
    """One request run to the end: (its tokens, prefix-cache hit tokens, prompt tokens
    computed)."""
    before = engine.stats()
    engine.add_request(
        "prefix", prompt, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True),
        fairness_key=tenant, adapter=adapter,
    )  # fmt: skip
    tokens: list[int] = []
    while engine.has_unfinished():
        for out in engine.step():
            tokens += out.new_token_ids
    after = engine.stats()
    hits = after.prefix_cache_hits_tokens_total - before.prefix_cache_hits_tokens_total
    computed = after.num_prompt_tokens_total - before.num_prompt_tokens_total
    return tokens, hits, computed


def test_prefix_cache_reuses_a_tenants_prefix_and_no_one_elses(
    long_llama_dir: Path, adapters: dict[str, Any], tmp_path: Path
) -> None:
    source = {"adapter_source": DirectorySource(adapters["root"])}
    cached = _engine(long_llama_dir, 4096, adapter_cache_dir=str(tmp_path / "on"), **source)
    uncached = _engine(
        long_llama_dir, 4096, enable_prefix_caching=False,
        adapter_cache_dir=str(tmp_path / "off"), **source,
    )  # fmt: skip
    (prefix,) = _prompts(1, seed=3, lengths=(1000, 1000))
    first, second, third = (prefix + q for q in _prompts(3, seed=4, lengths=(20, 30)))
    for adapter in (None, adapters["a"]):
        tokens, hits, computed = _complete(cached, first, "t1", adapter)
        assert hits == 0 and computed == len(first)
        assert tokens == _complete(uncached, first, "t1", adapter)[0]
        tokens, hits, computed = _complete(cached, second, "t1", adapter)
        assert hits == 992 and computed == len(second) - 992  # 62 full blocks of 16
        assert tokens == _complete(uncached, second, "t1", adapter)[0]
        # another tenant: the same tokens, no hit (nor its timing)
        tokens, hits, computed = _complete(cached, third, "t2", adapter)
        assert hits == 0 and computed == len(third)
        assert tokens == _complete(uncached, third, "t2", adapter)[0]
    # the same tenant with another adapter version, even of the same bytes: no hit
    for other in (adapters["a2"], adapters["b"]):
        tokens, hits, _ = _complete(cached, third, "t1", other)
        assert hits == 0
        assert tokens == _complete(uncached, third, "t1", other)[0]
    assert uncached.stats().prefix_cache_hits_tokens_total == 0
    stats = cached.stats()
    assert stats.prefix_cache_queries_tokens_total > stats.prefix_cache_hits_tokens_total > 0


def test_a_request_with_max_tokens_4096_leaves_the_others_room(long_llama_dir: Path) -> None:
    """With room for 4,400 tokens, a 4,096-token reservation would leave space for two
    of the twelve others; blocks taken as tokens come leave them all running."""
    prompts = _prompts(13, seed=5, lengths=(20, 20))
    short = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    long = SamplingParams(temperature=0.0, max_tokens=4096, ignore_eos=True)
    others = [(p, short, None) for p in prompts[1:]]

    def most_others_running(with_long: bool) -> tuple[int, list[list[int]]]:
        engine = _engine(long_llama_dir, 4400, max_model_len=4400)
        if with_long:  # first in line
            engine.add_request("long", prompts[0], long, fairness_key="t")
        for i, (prompt, params, _) in enumerate(others):
            engine.add_request(str(i), prompt, params, fairness_key="t")
        tokens: list[list[int]] = [[] for _ in others]
        most = 0
        while any(str(i) in engine.unfinished_request_ids() for i in range(len(others))):
            for out in engine.step():
                if out.request_id != "long":
                    tokens[int(out.request_id)] += out.new_token_ids
            running = engine.stats().num_running - int("long" in engine.unfinished_request_ids())
            most = max(most, running)
        return most, tokens

    alone_most, alone_tokens = most_others_running(with_long=False)
    beside_most, beside_tokens = most_others_running(with_long=True)
    assert alone_most == beside_most == len(others)
    assert beside_tokens == alone_tokens

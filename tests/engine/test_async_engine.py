"""AsyncLLMEngine: streaming from a background thread, refusals, cancellation."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from loramux_engine import (
    AsyncLLMEngine,
    EngineConfig,
    EngineConfigError,
    LLMEngine,
    PromptTooLongError,
    SamplingParams,
)

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
PROMPTS = [[5 + (i * 11 + j * 3) % 250 for j in range(n)] for i, n in enumerate([4, 30, 12])]


@pytest.fixture(scope="module")
def engine(tiny_llama_dir: Path) -> Iterator[AsyncLLMEngine]:
    engine = AsyncLLMEngine(LLMEngine(EngineConfig(str(tiny_llama_dir), max_model_len=64)))
    engine.start()
    yield engine
    engine.shutdown()


async def _collect(stream: AsyncIterator[object]) -> list[int]:
    tokens: list[int] = []
    async for out in stream:
        tokens += out.new_token_ids  # type: ignore[attr-defined]
    return tokens


async def test_concurrent_streams_match_sync_generate(
    engine: AsyncLLMEngine, tiny_llama_dir: Path
) -> None:
    results = await asyncio.gather(
        *(_collect(engine.generate(f"s{i}", p, GREEDY)) for i, p in enumerate(PROMPTS))
    )
    sync = LLMEngine(EngineConfig(str(tiny_llama_dir), max_model_len=64))
    assert results == [o.new_token_ids for o in sync.generate(PROMPTS, GREEDY)]
    assert engine.stats().num_generation_tokens_total >= 3 * 8


async def test_too_long_prompt_raises_before_streaming(engine: AsyncLLMEngine) -> None:
    with pytest.raises(PromptTooLongError):
        await _collect(engine.generate("long", list(range(3, 70)), GREEDY))


async def test_cancelling_the_consumer_aborts_the_request(engine: AsyncLLMEngine) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True)
    first = asyncio.Event()

    async def consume() -> None:
        async for _ in engine.generate("cancel-me", PROMPTS[0], params):
            first.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(first.wait(), timeout=30)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(300):
        stats = engine.stats()
        if stats.num_running == 0 and stats.kv_cache_usage == 0.0:
            break
        await asyncio.sleep(0.01)
    assert engine.stats().num_running == 0
    # the id is free again once the abort went through
    assert len(await _collect(engine.generate("cancel-me", PROMPTS[0], GREEDY))) == 8


def test_from_config_builds_on_another_thread_and_raises_its_errors(
    tiny_llama_dir: Path,
) -> None:
    with pytest.raises(EngineConfigError, match="kv_cache_bytes"):
        AsyncLLMEngine.from_config(
            EngineConfig(str(tiny_llama_dir), max_model_len=64, kv_cache_bytes=4096)
        )
    engine = AsyncLLMEngine.from_config(EngineConfig(str(tiny_llama_dir), max_model_len=64))
    engine.start()
    try:
        tokens = asyncio.run(_collect(engine.generate("built", PROMPTS[0], GREEDY)))
    finally:
        engine.shutdown()
    assert len(tokens) == GREEDY.max_tokens
    assert "loramux-engine-build" not in {t.name for t in threading.enumerate()}

"""The remote EngineClient (what a Celery worker uses) against a live server's engine."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from loramux.remote_engine import RemoteEngineClient, RemoteEngineError
from loramux_engine.sampling_params import SamplingParams
from tests.e2e.conftest import ADMIN_KEY, LiveServer


def test_remote_generation_matches_the_http_api(
    live_server: LiveServer, tiny_llama_dir: Path
) -> None:
    _, key = live_server.make_tenant("remote")
    remote = RemoteEngineClient(live_server.base_url, ADMIN_KEY, tiny_llama_dir)
    prompt = remote.tokenizer.encode("Once upon", add_special_tokens=False)
    params = SamplingParams(temperature=0, max_tokens=6, logprobs=2)

    async def collect() -> tuple[str, int]:
        text, tokens = "", 0
        async for out in remote.generate("remote-1", prompt, params, fairness_key="t", priority=1):
            text += out.text
            tokens += len(out.new_token_ids)
            assert out.top_logprobs is None or all(
                isinstance(t, int) for top in out.top_logprobs for t in top
            )
        return text, tokens

    text, tokens = asyncio.run(collect())
    assert tokens == 6
    import httpx

    expected = httpx.post(
        f"{live_server.base_url}/v1/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={
            "model": remote.base_model_id,
            "prompt": "Once upon",
            "max_tokens": 6,
            "temperature": 0,
        },
        timeout=30,
    ).json()["choices"][0]["text"]
    assert text == expected
    assert remote.stats().num_finished_total >= 2

    async def too_long() -> None:
        async for _ in remote.generate("remote-2", [5] * 10_000, params, fairness_key="t"):
            pass

    with pytest.raises(RemoteEngineError, match="400"):
        asyncio.run(too_long())

"""Many concurrent streams across tenants; usage matches what clients received."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
from sqlalchemy import func, select

from loramux.db.models import UsageRecord
from loramux.db.session import make_engine, make_session_factory
from tests.e2e.conftest import ADMIN_KEY, LiveServer


async def stream_chat(client: httpx.AsyncClient, key: str, model: str, i: int) -> int:
    """One streamed chat; returns how many tokens the client received (one logprob each)."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": f"Tell story {i}"}],
        "max_tokens": 8 + i % 5,
        "temperature": 0.7,
        "seed": i,
        "stream": True,
        "logprobs": True,
    }
    received = 0
    async with client.stream(
        "POST", "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}
    ) as response:
        assert response.status_code == 200, await response.aread()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: ") :])
            for choice in chunk["choices"]:
                received += len((choice.get("logprobs") or {}).get("content") or [])
    return received


def usage_totals(server: LiveServer) -> tuple[int, int]:
    engine = make_engine(server.env["LORAMUX_DATABASE_URL"])
    with make_session_factory(engine)() as session:
        count, tokens = session.execute(
            select(func.count(UsageRecord.id), func.sum(UsageRecord.completion_tokens))
        ).one()
    engine.dispose()
    return int(count), int(tokens or 0)


def test_32_concurrent_streams_across_4_tenants(live_server: LiveServer) -> None:
    keys = [live_server.make_tenant(f"tenant-{i}")[1] for i in range(4)]
    model = httpx.get(
        f"{live_server.base_url}/v1/models", headers={"Authorization": f"Bearer {keys[0]}"}
    ).json()["data"][0]["id"]
    before_count, before_tokens = usage_totals(live_server)

    async def run_all() -> list[int]:
        async with httpx.AsyncClient(base_url=live_server.base_url, timeout=120) as client:
            return await asyncio.gather(
                *(stream_chat(client, keys[i % 4], model, i) for i in range(32))
            )

    received = asyncio.run(run_all())
    assert all(n > 0 for n in received)
    count, tokens = usage_totals(live_server)
    assert count - before_count == 32
    assert tokens - before_tokens == sum(received)


def test_client_disconnect_aborts_and_is_still_metered(live_server: LiveServer) -> None:
    _, key = live_server.make_tenant("leaver")
    headers = {"Authorization": f"Bearer {key}"}
    model = httpx.get(f"{live_server.base_url}/v1/models", headers=headers).json()["data"][0]["id"]
    before_count, before_tokens = usage_totals(live_server)
    body = {
        "model": model,
        "prompt": "Go on forever",
        "max_tokens": 400,
        "stream": True,
        "temperature": 0.9,
    }
    with httpx.stream(
        "POST", f"{live_server.base_url}/v1/completions", json=body, headers=headers, timeout=60
    ) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                break  # leave after the first chunk
    deadline = time.monotonic() + 30
    while usage_totals(live_server)[0] == before_count and time.monotonic() < deadline:
        time.sleep(0.2)
    count, tokens = usage_totals(live_server)
    assert count == before_count + 1
    assert 0 < tokens - before_tokens < 400
    engine = make_engine(live_server.env["LORAMUX_DATABASE_URL"])
    with make_session_factory(engine)() as session:
        last = session.scalars(select(UsageRecord).order_by(UsageRecord.id.desc())).first()
        assert last is not None and last.status == "cancelled"
    engine.dispose()
    info = httpx.get(
        f"{live_server.base_url}/internal/engine/info",
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
    ).json()
    assert info["stats"]["num_running"] == 0

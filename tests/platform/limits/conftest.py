"""Both rate limiters, in-process and on a real Redis, behind one fixture."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable

import pytest
import redis.asyncio as aioredis

from loramux.limits.base import RateLimiter
from loramux.limits.memory import MemoryRateLimiter
from loramux.limits.redis_limiter import RedisRateLimiter

WINDOW_S = 1.5

Factory = Callable[[], RateLimiter]


@pytest.fixture(params=["memory", "redis"])
async def make_limiter(request: pytest.FixtureRequest) -> AsyncIterator[Factory]:
    if request.param == "memory":
        shared = MemoryRateLimiter(window_s=WINDOW_S)
        yield lambda: shared
        return
    url = request.getfixturevalue("redis_url")
    prefix = f"loramux-test:{uuid.uuid4().hex}"
    clients: list[aioredis.Redis] = []

    def make() -> RateLimiter:  # each call is another API replica with its own connection
        client = aioredis.Redis.from_url(url)
        clients.append(client)
        return RedisRateLimiter(client, window_s=WINDOW_S, key_prefix=prefix)

    yield make
    for client in clients:
        await client.aclose()


def rid() -> str:
    return uuid.uuid4().hex

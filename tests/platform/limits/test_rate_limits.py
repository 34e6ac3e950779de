"""One contract for both rate limiters, run in-process and on a real Redis."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable

import pytest
import redis.asyncio as aioredis

from loramux.errors import RateLimited
from loramux.limits.base import Limits, RateLimiter
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


async def test_burst_admits_exactly_the_limit_then_recovers(make_limiter: Factory) -> None:
    limiter, limits = make_limiter(), Limits(requests_per_minute=5)
    admitted, refused = 0, []
    for _ in range(6):
        try:
            admission = await limiter.admit("t1", rid(), limits, tokens=1)
            await limiter.finish(admission, 1)
            admitted += 1
        except RateLimited as error:
            refused.append(error)
    assert admitted == 5 and len(refused) == 1
    headers = refused[0].headers
    assert int(headers["retry-after"]) >= 1
    assert headers["x-ratelimit-limit-requests"] == "5"
    assert headers["x-ratelimit-remaining-requests"] == "0"
    await asyncio.sleep(int(headers["retry-after"]))
    admission = await limiter.admit("t1", rid(), limits, tokens=1)
    assert admission.headers["x-ratelimit-remaining-requests"] == "4"


async def test_two_replicas_never_admit_twice_the_limit(make_limiter: Factory) -> None:
    replicas = [make_limiter(), make_limiter()]
    limits = Limits(requests_per_minute=10)

    async def attempt(i: int) -> bool:
        try:
            await replicas[i % 2].admit("t1", rid(), limits, tokens=1)
            return True
        except RateLimited:
            return False

    results = await asyncio.gather(*(attempt(i) for i in range(30)))
    assert sum(results) == 10


async def test_tokens_are_reserved_then_unused_part_returned(make_limiter: Factory) -> None:
    limiter, limits = make_limiter(), Limits(tokens_per_minute=100)
    first = await limiter.admit("t1", rid(), limits, tokens=80)
    assert first.headers["x-ratelimit-remaining-tokens"] == "20"
    with pytest.raises(RateLimited) as refused:
        await limiter.admit("t1", rid(), limits, tokens=30)
    assert "tokens per minute" in refused.value.message
    await limiter.finish(first, used_tokens=50)
    second = await limiter.admit("t1", rid(), limits, tokens=30)
    assert second.headers["x-ratelimit-remaining-tokens"] == "20"
    with pytest.raises(RateLimited) as never_fits:
        await limiter.admit("t1", rid(), limits, tokens=101)
    assert never_fits.value.code == "tokens_exceed_limit"


async def test_concurrency_slot_released_on_finish(make_limiter: Factory) -> None:
    limiter, limits = make_limiter(), Limits(max_concurrent_requests=2)
    a = await limiter.admit("t1", rid(), limits, tokens=1)
    await limiter.admit("t1", rid(), limits, tokens=1)
    with pytest.raises(RateLimited) as refused:
        await limiter.admit("t1", rid(), limits, tokens=1)
    assert "concurrent" in refused.value.message
    await limiter.finish(a, 1)
    await limiter.admit("t1", rid(), limits, tokens=1)


async def test_tenants_are_independent(make_limiter: Factory) -> None:
    limiter, limits = make_limiter(), Limits(requests_per_minute=1)
    await limiter.admit("t1", rid(), limits, tokens=1)
    await limiter.admit("t2", rid(), limits, tokens=1)
    with pytest.raises(RateLimited):
        await limiter.admit("t1", rid(), limits, tokens=1)

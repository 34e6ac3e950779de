"""One contract for both rate limiters, run in-process and on a real Redis."""

from __future__ import annotations

import asyncio

import pytest

from loramux.errors import RateLimited
from loramux.limits.base import Limits
from tests.platform.limits.conftest import Factory, rid


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

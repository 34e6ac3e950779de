"""Pick the rate limiter the settings ask for."""

from __future__ import annotations

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from loramux.limits.base import RateLimiter
from loramux.limits.memory import MemoryRateLimiter
from loramux.limits.redis_limiter import RedisRateLimiter
from loramux.settings import Settings


def rate_limiter_from_settings(settings: Settings) -> RateLimiter:
    window = settings.rate_limit_window_s
    if settings.redis_url:
        client = aioredis.Redis.from_url(
            settings.redis_url,
            socket_connect_timeout=settings.redis_connect_timeout_s,
            socket_timeout=settings.redis_timeout_s,
            # One immediate retry: it replaces a pooled connection a restarted Redis reset;
            # more (the default backs off for seconds) would outlast an interactive request.
            retry=Retry(NoBackoff(), 1),
        )
        return RedisRateLimiter(client, window_s=window, fail_open=settings.rate_limit_fail_open)
    return MemoryRateLimiter(window_s=window)

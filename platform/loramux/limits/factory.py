"""Pick the rate limiter the settings ask for."""

from __future__ import annotations

import redis.asyncio as aioredis

from loramux.limits.base import RateLimiter
from loramux.limits.memory import MemoryRateLimiter
from loramux.limits.redis_limiter import RedisRateLimiter
from loramux.settings import Settings


def rate_limiter_from_settings(settings: Settings) -> RateLimiter:
    window = settings.rate_limit_window_s
    if settings.redis_url:
        return RedisRateLimiter(aioredis.Redis.from_url(settings.redis_url), window_s=window)
    return MemoryRateLimiter(window_s=window)

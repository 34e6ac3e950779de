"""In-process rate limits for the embedded default (one API process)."""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from loramux.limits.base import Limits, RateLimiter, WindowState


@dataclass(frozen=True, slots=True)
class _InFlight:
    admitted_at: float
    sequences: int
    tokens: int  # reserved, for the monthly quota


@dataclass
class _TenantWindow:
    requests: OrderedDict[str, float] = field(default_factory=OrderedDict)  # id -> admitted at
    tokens: OrderedDict[str, tuple[float, int]] = field(default_factory=OrderedDict)
    in_flight: dict[str, _InFlight] = field(default_factory=dict)


class MemoryRateLimiter(RateLimiter):
    def __init__(self, window_s: float = 60.0, max_request_s: float = 900.0) -> None:
        super().__init__(window_s, max_request_s)
        self._tenants: dict[str, _TenantWindow] = {}
        self._lock = asyncio.Lock()

    def _expire(self, window: _TenantWindow, now: float) -> None:
        cutoff = now - self.window_s
        while window.requests and next(iter(window.requests.values())) <= cutoff:
            window.requests.popitem(last=False)
        while window.tokens and next(iter(window.tokens.values()))[0] <= cutoff:
            window.tokens.popitem(last=False)
        stale = [
            rid
            for rid, request in window.in_flight.items()
            if request.admitted_at <= now - self.max_request_s
        ]
        for rid in stale:
            del window.in_flight[rid]

    async def _admit(
        self, tenant_id: str, request_id: str, limits: Limits, tokens: int, sequences: int
    ) -> WindowState:
        async with self._lock:
            now = time.time()
            window = self._tenants.setdefault(tenant_id, _TenantWindow())
            self._expire(window, now)
            used = sum(amount for _, amount in window.tokens.values())
            in_flight = window.in_flight.values()
            reason, retry = None, 0.0
            if (
                limits.max_concurrent_requests is not None
                and sum(r.sequences for r in in_flight) + sequences > limits.max_concurrent_requests
            ):
                reason, retry = "concurrency", 1.0
            elif (
                limits.requests_per_minute is not None
                and len(window.requests) >= limits.requests_per_minute
            ):
                reason = "requests"
                retry = next(iter(window.requests.values())) + self.window_s - now
            elif limits.tokens_per_minute is not None and used + tokens > limits.tokens_per_minute:
                reason = "tokens"
                freed = 0
                for at, amount in window.tokens.values():
                    freed += amount
                    if used - freed + tokens <= limits.tokens_per_minute:
                        retry = at + self.window_s - now
                        break
            elif (
                limits.monthly_tokens_left is not None
                and sum(r.tokens for r in in_flight) + tokens > limits.monthly_tokens_left
            ):
                reason, retry = "quota", 1.0
            if reason is None:
                window.requests[request_id] = now
                window.tokens[request_id] = (now, tokens)
                window.in_flight[request_id] = _InFlight(now, sequences, tokens)
                used += tokens
            oldest_request = next(iter(window.requests.values()), now)
            oldest_tokens = next(iter(window.tokens.values()), (now, 0))[0]
            return WindowState(
                reason=reason,
                retry_after_s=retry,
                num_requests=len(window.requests),
                num_tokens=used,
                reset_requests_s=oldest_request + self.window_s - now,
                reset_tokens_s=oldest_tokens + self.window_s - now,
            )

    async def _finish(self, tenant_id: str, request_id: str, used_tokens: int) -> None:
        async with self._lock:
            window = self._tenants.get(tenant_id)
            if window is None:
                return
            window.in_flight.pop(request_id, None)
            if request_id in window.tokens:
                at, _ = window.tokens[request_id]
                window.tokens[request_id] = (at, used_tokens)

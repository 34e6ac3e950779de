"""The rate-limit contract, shared by the in-process and the Redis implementations.

Requests and tokens are counted over a sliding window (a minute by default): a tenant
with ``requests_per_minute = N`` is admitted at most N requests in any window, exactly.
Tokens are reserved at admission (prompt tokens plus the most the request may generate)
and the unused part is handed back when the request finishes. Concurrency counts requests
admitted and not yet finished.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from loramux.errors import RateLimited


@dataclass(frozen=True, slots=True)
class Limits:
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    max_concurrent_requests: int | None = None

    @property
    def unlimited(self) -> bool:
        return (
            self.requests_per_minute is None
            and self.tokens_per_minute is None
            and self.max_concurrent_requests is None
        )


@dataclass(frozen=True, slots=True)
class WindowState:
    """What a limiter saw at its decision, after admitting (or not) this request."""

    reason: str | None  # None = admitted; else "requests" | "tokens" | "concurrency"
    retry_after_s: float
    num_requests: int
    num_tokens: int
    reset_requests_s: float
    reset_tokens_s: float


@dataclass(slots=True)
class Admission:
    tenant_id: str
    request_id: str
    reserved_tokens: int
    headers: dict[str, str] = field(default_factory=dict)


def _duration(seconds: float) -> str:
    return f"{max(seconds, 0.0):.3f}s"


def ratelimit_headers(limits: Limits, state: WindowState) -> dict[str, str]:
    headers: dict[str, str] = {}
    if limits.requests_per_minute is not None:
        headers["x-ratelimit-limit-requests"] = str(limits.requests_per_minute)
        headers["x-ratelimit-remaining-requests"] = str(
            max(limits.requests_per_minute - state.num_requests, 0)
        )
        headers["x-ratelimit-reset-requests"] = _duration(state.reset_requests_s)
    if limits.tokens_per_minute is not None:
        headers["x-ratelimit-limit-tokens"] = str(limits.tokens_per_minute)
        headers["x-ratelimit-remaining-tokens"] = str(
            max(limits.tokens_per_minute - state.num_tokens, 0)
        )
        headers["x-ratelimit-reset-tokens"] = _duration(state.reset_tokens_s)
    return headers


_REASONS = {
    "requests": "requests per minute",
    "tokens": "tokens per minute",
    "concurrency": "concurrent requests",
}


class RateLimiter(ABC):
    def __init__(self, window_s: float = 60.0, max_request_s: float = 900.0) -> None:
        self.window_s = window_s
        # A request still "in flight" after this long is assumed lost (a crashed replica).
        self.max_request_s = max_request_s

    @abstractmethod
    async def _admit(
        self, tenant_id: str, request_id: str, limits: Limits, tokens: int
    ) -> WindowState: ...

    @abstractmethod
    async def _finish(self, tenant_id: str, request_id: str, used_tokens: int) -> None: ...

    async def admit(
        self, tenant_id: str, request_id: str, limits: Limits, tokens: int
    ) -> Admission:
        """Reserve a request and ``tokens``, or raise ``RateLimited`` with Retry-After."""
        if limits.tokens_per_minute is not None and tokens > limits.tokens_per_minute:
            raise RateLimited(
                f"This request needs up to {tokens} tokens, more than your limit of "
                f"{limits.tokens_per_minute} tokens per minute; lower max_tokens.",
                code="tokens_exceed_limit",
            )
        state = await self._admit(tenant_id, request_id, limits, tokens)
        headers = ratelimit_headers(limits, state)
        if state.reason is not None:
            retry_after = max(1, math.ceil(state.retry_after_s))
            raise RateLimited(
                f"Rate limit reached for {_REASONS[state.reason]}; retry after {retry_after}s.",
                headers={**headers, "retry-after": str(retry_after)},
            )
        return Admission(tenant_id, request_id, tokens, headers)

    async def finish(self, admission: Admission, used_tokens: int) -> None:
        """Return the unused reserved tokens and the concurrency slot."""
        await self._finish(
            admission.tenant_id, admission.request_id, min(used_tokens, admission.reserved_tokens)
        )

"""The rate-limit contract, shared by the in-process and the Redis implementations.

Requests and tokens are counted over a sliding window (a minute by default): a tenant
with ``requests_per_minute = N`` is admitted at most N requests in any window, exactly.
Tokens are reserved at admission (prompt tokens plus the most the request may generate)
and the unused part is handed back when the request finishes. Concurrency counts the
sequences (choices: prompts x n) of requests admitted and not yet finished.

A tenant with no limits at all is admitted without asking the limiter anything, so a
Redis outage never touches it. When the limiter's store is down or hangs, a limited
tenant gets a 503 with Retry-After (``errors.dependency_unavailable``), or, with
``fail_open``, is admitted without limits (logged). A release that fails is logged, never
raised: the reservation expires on its own (``max_request_s``, the keys' TTL).

The monthly token quota is reserved the same way: a request is admitted only if its
reservation fits what the usage records leave of the quota (``Limits.monthly_tokens_left``)
less the reservations of the tenant's requests in flight; finishing a request drops its
reservation, once its usage is recorded.
"""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from loramux.errors import QuotaExceeded, RateLimited, dependency_unavailable

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Limits:
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    max_concurrent_requests: int | None = None  # sequences (choices) at once
    # The monthly quota less the tokens the usage records hold this month; None: no quota.
    monthly_tokens_left: int | None = None

    @property
    def unlimited(self) -> bool:
        return (
            self.requests_per_minute is None
            and self.tokens_per_minute is None
            and self.max_concurrent_requests is None
            and self.monthly_tokens_left is None
        )


@dataclass(frozen=True, slots=True)
class WindowState:
    """What a limiter saw at its decision, after admitting (or not) this request."""

    # None = admitted; else "requests" | "tokens" | "concurrency" | "quota"
    reason: str | None
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
    # False: admitted without the limiter (no limits, or failed open): nothing to release.
    tracked: bool = True


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
    def __init__(
        self, window_s: float = 60.0, max_request_s: float = 900.0, fail_open: bool = False
    ) -> None:
        self.window_s = window_s
        # A request still "in flight" after this long is assumed lost (a crashed replica).
        self.max_request_s = max_request_s
        self.fail_open = fail_open

    async def check(self) -> None:
        """Raise if the limiter's store cannot be reached (for /readyz); in-process: never."""
        return None

    @abstractmethod
    async def _admit(
        self, tenant_id: str, request_id: str, limits: Limits, tokens: int, sequences: int
    ) -> WindowState:
        """Admit atomically, or say why not; ``sequences`` concurrency units are taken."""

    @abstractmethod
    async def _finish(self, tenant_id: str, request_id: str, used_tokens: int) -> None:
        """Settle the request's tokens to ``used_tokens``; give back its in-flight share."""

    async def admit(
        self, tenant_id: str, request_id: str, limits: Limits, tokens: int, sequences: int = 1
    ) -> Admission:
        """Reserve a request, ``tokens`` and ``sequences`` concurrency units.

        Raises ``RateLimited`` (with Retry-After when waiting helps) or ``QuotaExceeded``.
        """
        if limits.unlimited:
            return Admission(tenant_id, request_id, tokens, tracked=False)
        _refuse_never_fits(limits, tokens)
        try:
            state = await self._admit(tenant_id, request_id, limits, tokens, sequences)
        except Exception as error:
            unavailable = dependency_unavailable(error)  # logs the cause
            if unavailable is None:
                raise
            if not self.fail_open:
                raise unavailable from error
            logger.warning("rate limiter unavailable: admitting %s without limits", request_id)
            return Admission(tenant_id, request_id, tokens, tracked=False)
        headers = ratelimit_headers(limits, state)
        if state.reason is None:
            return Admission(tenant_id, request_id, tokens, headers)
        limit = limits.max_concurrent_requests
        if state.reason == "concurrency" and limit is not None and sequences > limit:
            raise RateLimited(  # no Retry-After: waiting cannot help
                f"This request runs {sequences} sequences at once (prompts x n), more than "
                f"your limit of {limit} concurrent requests; lower n or send fewer prompts.",
                code="concurrency_exceeds_limit",
                headers=headers,
            )
        retry_after = max(1, math.ceil(state.retry_after_s))
        retry_headers = {**headers, "retry-after": str(retry_after)}
        if state.reason == "quota":
            raise QuotaExceeded(
                f"This request may use up to {tokens} tokens; with the tokens reserved by "
                "your requests in flight that is more than is left of your monthly token "
                f"quota. Retry after they finish ({retry_after}s) or lower max_tokens.",
                headers=retry_headers,
            )
        raise RateLimited(
            f"Rate limit reached for {_REASONS[state.reason]}; retry after {retry_after}s.",
            headers=retry_headers,
        )

    async def finish(self, admission: Admission, used_tokens: int) -> None:
        """Return the unused reserved tokens, the concurrency units and the quota reservation.

        Call it once the request's usage is recorded, so that its tokens always count
        against the monthly quota, by the reservation or by the records.
        """
        if not admission.tracked:
            return
        try:
            await self._finish(
                admission.tenant_id,
                admission.request_id,
                min(used_tokens, admission.reserved_tokens),
            )
        except Exception as error:
            if dependency_unavailable(error) is None:  # logs an outage; a bug is raised
                raise


def _refuse_never_fits(limits: Limits, tokens: int) -> None:
    """A request over a limit on its own: no Retry-After, since waiting cannot help."""
    if limits.monthly_tokens_left is not None and tokens > limits.monthly_tokens_left:
        if limits.monthly_tokens_left <= 0:
            raise QuotaExceeded(
                "You exceeded your monthly token quota; ask your administrator to raise it."
            )
        raise QuotaExceeded(
            f"This request may use up to {tokens} tokens (its prompts plus max_tokens for "
            f"each choice), but {limits.monthly_tokens_left} are left of your monthly token "
            "quota; lower max_tokens or ask your administrator to raise the quota."
        )
    if limits.tokens_per_minute is not None and tokens > limits.tokens_per_minute:
        raise RateLimited(
            f"This request needs up to {tokens} tokens, more than your limit of "
            f"{limits.tokens_per_minute} tokens per minute; lower max_tokens.",
            code="tokens_exceed_limit",
        )

"""Per-tenant rate limits (requests, tokens, concurrency) and the monthly token quota."""

from loramux.limits.base import Admission, Limits, RateLimiter
from loramux.limits.factory import rate_limiter_from_settings

__all__ = ["Admission", "Limits", "RateLimiter", "rate_limiter_from_settings"]

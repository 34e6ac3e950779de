"""Rate limits shared by every API replica through Redis.

Each decision is one Lua script, so two replicas can never both admit the last slot.
Per tenant: a sorted set of admitted request ids by time, a sorted set plus a hash of
reserved tokens, and a sorted set of requests in flight with two hashes of their
sequences (concurrency units) and their reserved tokens (for the monthly quota).
"""

from __future__ import annotations

import time

import redis.asyncio as aioredis

from loramux.limits.base import Limits, RateLimiter, WindowState

_ADMIT = """
local now, window = tonumber(ARGV[1]), tonumber(ARGV[2])
local rpm, tpm, conc = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local rid, tokens, max_request = ARGV[6], tonumber(ARGV[7]), tonumber(ARGV[8])
local sequences, quota_left = tonumber(ARGV[9]), tonumber(ARGV[10])
local cutoff = now - window
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', cutoff)
local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', cutoff)
if #expired > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', cutoff)
  redis.call('HDEL', KEYS[3], unpack(expired))
end
local lost = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', now - max_request)
if #lost > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now - max_request)
  redis.call('HDEL', KEYS[5], unpack(lost))
  redis.call('HDEL', KEYS[6], unpack(lost))
end
local nreq = redis.call('ZCARD', KEYS[1])
local function total(key)
  local sum = 0
  for _, v in ipairs(redis.call('HVALS', key)) do sum = sum + tonumber(v) end
  return sum
end
local used = total(KEYS[3])
local inflight_seqs, inflight_tokens = total(KEYS[5]), total(KEYS[6])
local reason, retry = '', 0
if conc >= 0 and inflight_seqs + sequences > conc then
  reason, retry = 'concurrency', 1
elseif rpm >= 0 and nreq >= rpm then
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  reason, retry = 'requests', tonumber(oldest[2]) + window - now
elseif tpm >= 0 and used + tokens > tpm then
  reason = 'tokens'
  local freed = 0
  local entries = redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')
  for i = 1, #entries, 2 do
    freed = freed + tonumber(redis.call('HGET', KEYS[3], entries[i]) or '0')
    if used - freed + tokens <= tpm then
      retry = tonumber(entries[i + 1]) + window - now
      break
    end
  end
elseif quota_left >= 0 and inflight_tokens + tokens > quota_left then
  reason, retry = 'quota', 1
end
if reason == '' then
  redis.call('ZADD', KEYS[1], now, rid)
  redis.call('ZADD', KEYS[2], now, rid)
  redis.call('HSET', KEYS[3], rid, tokens)
  redis.call('ZADD', KEYS[4], now, rid)
  redis.call('HSET', KEYS[5], rid, sequences)
  redis.call('HSET', KEYS[6], rid, tokens)
  nreq, used = nreq + 1, used + tokens
end
local ttl = math.ceil(math.max(window, max_request)) + 1
for i = 1, 6 do redis.call('EXPIRE', KEYS[i], ttl) end
local oldest_req = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')[2] or tostring(now)
local oldest_tok = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')[2] or tostring(now)
return {reason, tostring(retry), nreq, used, oldest_req, oldest_tok}
"""

_FINISH = """
if redis.call('HEXISTS', KEYS[3], ARGV[1]) == 1 then
  redis.call('HSET', KEYS[3], ARGV[1], ARGV[2])
end
redis.call('ZREM', KEYS[4], ARGV[1])
redis.call('HDEL', KEYS[5], ARGV[1])
redis.call('HDEL', KEYS[6], ARGV[1])
return 1
"""


class RedisRateLimiter(RateLimiter):
    def __init__(
        self,
        client: aioredis.Redis,
        window_s: float = 60.0,
        max_request_s: float = 900.0,
        key_prefix: str = "loramux:rl",
        fail_open: bool = False,
    ) -> None:
        super().__init__(window_s, max_request_s, fail_open)
        self.client = client
        self.key_prefix = key_prefix
        self._admit_script = client.register_script(_ADMIT)
        self._finish_script = client.register_script(_FINISH)

    async def check(self) -> None:
        await self.client.ping()

    def _keys(self, tenant_id: str) -> list[str]:
        base = f"{self.key_prefix}:{{{tenant_id}}}"  # one hash slot per tenant on a cluster
        return [
            f"{base}:req",
            f"{base}:tok",
            f"{base}:tokamt",
            f"{base}:inflight",
            f"{base}:inflightseq",
            f"{base}:inflighttok",
        ]

    async def _admit(
        self, tenant_id: str, request_id: str, limits: Limits, tokens: int, sequences: int
    ) -> WindowState:
        def arg(value: int | None) -> int:
            return -1 if value is None else value

        quota_left = limits.monthly_tokens_left
        now = time.time()
        reason, retry, nreq, used, oldest_req, oldest_tok = await self._admit_script(
            keys=self._keys(tenant_id),
            args=[
                repr(now),
                repr(self.window_s),
                arg(limits.requests_per_minute),
                arg(limits.tokens_per_minute),
                arg(limits.max_concurrent_requests),
                request_id,
                tokens,
                repr(self.max_request_s),
                sequences,
                # -1: no quota (a quota already spent is refused before this script runs)
                -1 if quota_left is None else max(quota_left, 0),
            ],
        )
        return WindowState(
            reason=(reason.decode() if isinstance(reason, bytes) else reason) or None,
            retry_after_s=float(retry),
            num_requests=int(nreq),
            num_tokens=int(used),
            reset_requests_s=float(oldest_req) + self.window_s - now,
            reset_tokens_s=float(oldest_tok) + self.window_s - now,
        )

    async def _finish(self, tenant_id: str, request_id: str, used_tokens: int) -> None:
        await self._finish_script(keys=self._keys(tenant_id), args=[request_id, used_tokens])

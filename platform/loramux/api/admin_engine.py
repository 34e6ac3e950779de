"""``GET /admin/api/engine``: the engine's state for an operator.

The engine knows tenants and adapters only as opaque keys (its fairness key and an
AdapterRef's namespace are the tenant's id, the ref's id the adapter version's); names are
resolved here, from the registry. Throughput and latency over the last minutes come from
the usage records, so they cover every API replica and survive a restart.
"""

from __future__ import annotations

import dataclasses
import math
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from loramux.api.common import principal, state
from loramux.db.models import Adapter, AdapterVersion, Tenant, UsageRecord

RECENT_MINUTES = 15
MAX_RECENT_RECORDS = 50_000
TIERS = ("device", "host", "disk")


def _tiers(flat: dict[str, float]) -> dict[str, dict[str, float]]:
    """``adapter_cache_<tier>_<counter>`` grouped by tier."""
    tiers: dict[str, dict[str, float]] = {tier: {} for tier in TIERS}
    for name, value in flat.items():
        for tier in TIERS:
            prefix = f"adapter_cache_{tier}_"
            if name.startswith(prefix):
                tiers[tier][name.removeprefix(prefix)] = value
    return tiers


def _percentile(sorted_values: list[int], fraction: float) -> int | None:
    """Nearest rank."""
    if not sorted_values:
        return None
    return sorted_values[max(math.ceil(fraction * len(sorted_values)) - 1, 0)]


def recent_activity(session: Session, now: datetime) -> dict[str, Any]:
    """Per minute over the last RECENT_MINUTES: requests, tokens per second, latency."""
    end = now.replace(second=0, microsecond=0) + timedelta(minutes=1)
    start = end - timedelta(minutes=RECENT_MINUTES)
    rows = session.execute(
        select(
            UsageRecord.created_at,
            UsageRecord.latency_ms,
            UsageRecord.prompt_tokens,
            UsageRecord.completion_tokens,
        )
        .where(UsageRecord.created_at >= start)
        .order_by(UsageRecord.created_at.desc())
        .limit(MAX_RECENT_RECORDS)
    ).all()
    buckets: list[dict[str, Any]] = []
    latencies: list[list[int]] = [[] for _ in range(RECENT_MINUTES)]
    for minute in range(RECENT_MINUTES):
        buckets.append(
            {
                "start": int((start + timedelta(minutes=minute)).timestamp()),
                "num_requests": 0,
                "prompt_tokens": 0,
                "completion_tokens": 0,
            }
        )
    for created_at, latency_ms, prompt, completion in rows:
        minute = int((created_at - start) // timedelta(minutes=1))
        if not 0 <= minute < RECENT_MINUTES:
            continue
        bucket = buckets[minute]
        bucket["num_requests"] += 1
        bucket["prompt_tokens"] += prompt
        bucket["completion_tokens"] += completion
        latencies[minute].append(latency_ms)
    for bucket, values in zip(buckets, latencies, strict=True):
        values.sort()
        bucket["completion_tokens_per_s"] = round(bucket["completion_tokens"] / 60, 3)
        bucket["latency_p50_ms"] = _percentile(values, 0.5)
        bucket["latency_p95_ms"] = _percentile(values, 0.95)
    return {
        "bucket_s": 60,
        "buckets": buckets,
        "truncated": len(rows) == MAX_RECENT_RECORDS,
    }


def _names(
    session: Session, tenant_ids: set[str], version_ids: set[str]
) -> tuple[dict[str, str], dict[str, tuple[str, int]]]:
    tenants = dict(
        session.execute(select(Tenant.id, Tenant.name).where(Tenant.id.in_(tenant_ids))).all()
    )
    versions = {
        version_id: (name, version)
        for version_id, name, version in session.execute(
            select(AdapterVersion.id, Adapter.name, AdapterVersion.version)
            .join(Adapter, Adapter.id == AdapterVersion.adapter_id)
            .where(AdapterVersion.id.in_(version_ids))
        )
    }
    return tenants, versions


async def engine_status(request: Request) -> JSONResponse:
    principal(request, "admin")
    app_state = state(request)
    engine = app_state.require_engine()
    # A remote engine answers over HTTP; keep that off the event loop.
    stats = dataclasses.asdict(await run_in_threadpool(engine.stats))
    adapter_cache = stats.pop("extra")
    running, waiting = stats.pop("num_running_by_key"), stats.pop("num_waiting_by_key")
    resident = stats.pop("resident_adapters")
    now = datetime.now(UTC)

    def registry_view() -> dict[str, Any]:
        with app_state.sessions() as session:
            tenants, versions = _names(
                session,
                set(running) | set(waiting) | {r["namespace"] for r in resident},
                {r["id"] for r in resident},
            )
            return {
                "tenants": [
                    {
                        "tenant_id": key,
                        "tenant": tenants.get(key),
                        "num_running": running.get(key, 0),
                        "num_waiting": waiting.get(key, 0),
                    }
                    for key in sorted(set(running) | set(waiting), key=lambda k: tenants.get(k, k))
                ],
                "resident_adapters": [
                    {
                        "slot": r["slot"],
                        "adapter_version_id": r["id"],
                        "tenant_id": r["namespace"],
                        "tenant": tenants.get(r["namespace"]),
                        "adapter": versions.get(r["id"], (None, None))[0],
                        "version": versions.get(r["id"], (None, None))[1],
                        "pinned": r["pinned"],
                    }
                    for r in resident
                ],
                "recent": recent_activity(session, now),
            }

    return JSONResponse(
        {
            "object": "engine",
            "base_model_id": app_state.base_model_id,
            "max_model_len": engine.max_model_len,
            "stats": stats,
            "adapter_cache": adapter_cache,
            "adapter_cache_tiers": _tiers(adapter_cache),
            **await run_in_threadpool(registry_view),
            "updated_at": int(now.timestamp()),
        }
    )


routes = [Route("/admin/api/engine", engine_status, methods=["GET"])]

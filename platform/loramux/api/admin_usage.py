"""Admin API for money: usage by tenant, day and adapter with its cost; the price table; a
tenant's monthly statement as CSV."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from fractions import Fraction
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from loramux import tenancy
from loramux.adapters.registry import storage_used_by_tenant
from loramux.api.common import json_object, principal, state
from loramux.api.params import date_range, limit_param, month_param, text_param
from loramux.billing import (
    MonthTotals,
    day_start,
    month_totals,
    priced_usage,
    statement_csv,
    usage_rows,
)
from loramux.db.models import Adapter, Tenant
from loramux.db.session import transaction
from loramux.pricing import current_table, parse_prices, round_micro, set_prices, table_view, usd


def _admin(request: Request) -> str:
    return principal(request, "admin").actor


def tenant_summaries(session: Session, base_model_id: str) -> dict[str, dict[str, Any]]:
    """Per tenant: live adapters, bytes stored (adapters and merged exports, as the quota
    counts them), and this month's tokens and cost so far."""
    now = datetime.now(UTC)
    adapters = dict(
        session.execute(
            select(Adapter.tenant_id, func.count(Adapter.id))
            .where(Adapter.deleted_at.is_(None))
            .group_by(Adapter.tenant_id)
        ).all()
    )
    # As the quota counts it (registry.stored_holdings): merged exports included.
    storage = storage_used_by_tenant(session)
    totals = month_totals(session, now.date(), now=now, base_model_id=base_model_id)
    tenant_ids = set(adapters) | set(storage) | set(totals)
    return {
        tenant_id: {
            "adapters_used": int(adapters.get(tenant_id, 0)),
            "storage_used_bytes": int(storage.get(tenant_id) or 0),
            "this_month": totals.get(tenant_id, MonthTotals()).view(),
        }
        for tenant_id in tenant_ids
    }


def unused() -> dict[str, Any]:
    """The summary of a tenant that has used nothing."""
    return {"adapters_used": 0, "storage_used_bytes": 0, "this_month": MonthTotals().view()}


async def usage(request: Request) -> JSONResponse:
    """Usage per UTC day, tenant and adapter version, priced; filters ``tenant`` (id or name),
    ``adapter`` (name), ``start_date``, ``end_date``; ``limit`` rows, totals over all."""
    _admin(request)
    start, end = date_range(request)
    tenant_ref = text_param(request, "tenant")
    adapter = text_param(request, "adapter")
    limit = limit_param(request, default=1000, maximum=10_000)
    base_model_id = state(request).base_model_id

    def run() -> dict[str, Any]:
        with state(request).sessions() as session:
            tenant = None if tenant_ref is None else tenancy.get_tenant(session, tenant_ref)
            lines = priced_usage(
                session,
                day_start(start),
                day_start(end),
                base_model_id=base_model_id,
                tenant_id=None if tenant is None else tenant.id,
                adapter=adapter,
            )
            names = dict(session.execute(select(Tenant.id, Tenant.name)).all())
        rows = usage_rows(lines, with_tenant=True)
        for row in rows:
            row["tenant"] = names.get(row["tenant_id"])
        total_cost = round_micro(sum((line.cost for line in lines), Fraction()))
        return {
            "object": "list",
            "data": rows[:limit],
            "has_more": len(rows) > limit,
            "start_date": start.isoformat(),
            "end_date": (end - timedelta(days=1)).isoformat(),  # inclusive, as asked
            "totals": {
                "num_requests": sum(line.num_requests for line in lines),
                "prompt_tokens": sum(line.prompt_tokens for line in lines),
                "completion_tokens": sum(line.completion_tokens for line in lines),
                "cost_micro_usd": total_cost,
                "cost_usd": usd(total_cost),
            },
        }

    return JSONResponse(await run_in_threadpool(run))


async def get_prices(request: Request) -> JSONResponse:
    _admin(request)

    def run() -> dict[str, Any]:
        with state(request).sessions() as session:
            return table_view(current_table(session))

    return JSONResponse(await run_in_threadpool(run))


async def put_prices(request: Request) -> JSONResponse:
    """Replace the price table; the new one is in force from now on (past usage keeps its)."""
    actor = _admin(request)
    prices = parse_prices(await json_object(request))

    def run() -> dict[str, Any]:
        with transaction(state(request).sessions) as session:
            return table_view(set_prices(session, prices, actor=actor))

    return JSONResponse(await run_in_threadpool(run))


async def statement(request: Request) -> Response:
    _admin(request)
    month = month_param(request)
    base_model_id = state(request).base_model_id

    def run() -> tuple[str, str]:
        with state(request).sessions() as session:
            tenant = tenancy.get_tenant(session, request.path_params["id"])
            text = statement_csv(
                session, tenant, month, now=datetime.now(UTC), base_model_id=base_model_id
            )
            return tenant.name, text

    name, text = await run_in_threadpool(run)
    filename = f"statement-{name}-{month:%Y-%m}.csv"
    return Response(
        text,
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="{filename}"'},
    )


routes = [
    Route("/admin/api/usage", usage, methods=["GET"]),
    Route("/admin/api/prices", get_prices, methods=["GET"]),
    Route("/admin/api/prices", put_prices, methods=["PUT"]),
    Route("/admin/api/tenants/{id}/statement", statement, methods=["GET"]),
]

"""Admin API for batches across tenants: list (filters ``tenant`` and ``status``, OpenAI's
``after`` and ``limit`` paging, newest first) and cancel."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from loramux import tenancy
from loramux.api.common import principal, state
from loramux.api.params import text_param
from loramux.audit import record
from loramux.batches import service
from loramux.batches.pages import list_body, page, parse_limit
from loramux.db.models import Batch, Tenant
from loramux.db.session import transaction
from loramux.errors import InvalidRequest, NotFound

STATUSES = (
    "validating",
    "failed",
    "in_progress",
    "finalizing",
    "completed",
    "expired",
    "cancelling",
    "cancelled",
)


def _view(batch: Batch, tenant_name: str | None) -> dict[str, Any]:
    return {**service.batch_view(batch), "tenant_id": batch.tenant_id, "tenant": tenant_name}


async def list_batches(request: Request) -> JSONResponse:
    principal(request, "admin")
    limit = parse_limit(request.query_params.get("limit"))
    tenant_ref = text_param(request, "tenant")
    status = request.query_params.get("status")
    if status is not None and status not in STATUSES:
        raise InvalidRequest(f"status must be one of {', '.join(STATUSES)}", param="status")

    def run() -> dict[str, Any]:
        with state(request).sessions() as session:
            query = select(Batch)
            if tenant_ref is not None:
                tenant = tenancy.get_tenant(session, tenant_ref)
                query = query.where(Batch.tenant_id == tenant.id)
            if status is not None:
                query = query.where(Batch.status == status)
            rows, has_more = page(session, query, Batch, request.query_params.get("after"), limit)
            names = dict(
                session.execute(
                    select(Tenant.id, Tenant.name).where(Tenant.id.in_({r.tenant_id for r in rows}))
                ).all()
            )
            return list_body([_view(r, names.get(r.tenant_id)) for r in rows], has_more)

    return JSONResponse(await run_in_threadpool(run))


async def cancel_batch(request: Request) -> JSONResponse:
    actor = principal(request, "admin").actor
    batch_id = request.path_params["id"]

    def run() -> dict[str, Any]:
        with transaction(state(request).sessions) as session:
            found = session.get(Batch, batch_id)
            if found is None:
                raise NotFound(f"No such Batch object: {batch_id}", param="batch_id")
            batch = service.cancel_batch(session, found.tenant_id, batch_id)
            record(
                session,
                actor=actor,
                action="batch.cancel",
                target_type="batch",
                target_id=batch.id,
                tenant_id=batch.tenant_id,
            )
            tenant = session.get(Tenant, batch.tenant_id)
            return _view(batch, tenant.name if tenant else None)

    return JSONResponse(await run_in_threadpool(run))


routes = [
    Route("/admin/api/batches", list_batches, methods=["GET"]),
    Route("/admin/api/batches/{id}/cancel", cancel_batch, methods=["POST"]),
]

"""Admin API for a tenant's adapters: every version with its status, rejection reason, size,
rank, targets, creation and last use; deletion as the tenant's own route does it."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from loramux import tenancy
from loramux.adapters.registry import version_view
from loramux.api.adapters import remove_adapter
from loramux.api.common import principal, state
from loramux.api.params import limit_param
from loramux.db.models import Adapter, AdapterVersion, UsageRecord
from loramux.errors import InvalidRequest


def _ts(value: datetime | None) -> int | None:
    return int(value.timestamp()) if value else None


async def list_adapters(request: Request) -> JSONResponse:
    """``include_deleted=true`` adds soft-deleted adapters; ``limit`` adapters, by name."""
    principal(request, "admin")
    limit = limit_param(request, default=100, maximum=1000)
    include_deleted = request.query_params.get("include_deleted", "false")
    if include_deleted not in ("true", "false"):
        raise InvalidRequest("include_deleted must be true or false", param="include_deleted")

    def run() -> dict[str, Any]:
        with state(request).sessions() as session:
            tenant = tenancy.get_tenant(session, request.path_params["id"])
            query = select(Adapter).where(Adapter.tenant_id == tenant.id)
            if include_deleted == "false":
                query = query.where(Adapter.deleted_at.is_(None))
            adapters = list(
                session.scalars(query.order_by(Adapter.name, Adapter.created_at).limit(limit + 1))
            )
            ids = [a.id for a in adapters[:limit]]
            versions = session.scalars(
                select(AdapterVersion)
                .where(AdapterVersion.tenant_id == tenant.id, AdapterVersion.adapter_id.in_(ids))
                .order_by(AdapterVersion.version)
            ).all()
            used = {
                version_id: (last, count)
                for version_id, last, count in session.execute(
                    select(
                        UsageRecord.adapter_version_id,
                        func.max(UsageRecord.created_at),
                        func.count(UsageRecord.id),
                    )
                    .where(
                        UsageRecord.tenant_id == tenant.id,
                        UsageRecord.adapter_version_id.in_([v.id for v in versions]),
                    )
                    .group_by(UsageRecord.adapter_version_id)
                )
            }
            by_adapter: dict[str, list[dict[str, Any]]] = {a_id: [] for a_id in ids}
            named = {a.id: a for a in adapters}
            for version in versions:
                last, count = used.get(version.id, (None, 0))
                by_adapter[version.adapter_id].append(
                    {
                        **version_view(named[version.adapter_id], version),
                        "last_used_at": _ts(last),
                        "num_requests": int(count),
                    }
                )
            data = [
                {
                    "id": adapter.id,
                    "object": "adapter",
                    "name": adapter.name,
                    "tenant_id": tenant.id,
                    "base_model": adapter.base_model_id,
                    "created_at": _ts(adapter.created_at),
                    "deleted_at": _ts(adapter.deleted_at),
                    "versions": by_adapter[adapter.id],
                }
                for adapter in adapters[:limit]
            ]
            return {"object": "list", "data": data, "has_more": len(adapters) > limit}

    return JSONResponse(await run_in_threadpool(run))


async def delete_adapter(request: Request) -> JSONResponse:
    actor = principal(request, "admin").actor

    def tenant_id() -> str:
        with state(request).sessions() as session:
            return tenancy.get_tenant(session, request.path_params["id"]).id

    return await remove_adapter(
        state(request), await run_in_threadpool(tenant_id), request.path_params["name"], actor
    )


routes = [
    Route("/admin/api/tenants/{id}/adapters", list_adapters, methods=["GET"]),
    Route("/admin/api/tenants/{id}/adapters/{name}", delete_adapter, methods=["DELETE"]),
]

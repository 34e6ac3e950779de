"""Admin API: tenants, quotas, keys and the audit log (admin key as Bearer); usage and
prices, adapters, batches and the engine in the admin_*.py modules beside it."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from loramux import tenancy
from loramux.api import admin_adapters, admin_batches, admin_engine, admin_usage
from loramux.api.admin_usage import tenant_summaries, unused
from loramux.api.common import json_object, principal, state
from loramux.db.models import ApiKey, AuditLog, Tenant
from loramux.db.session import transaction
from loramux.errors import InvalidRequest


def _admin(request: Request) -> str:
    return principal(request, "admin").actor


def _page(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {"object": "list", "data": items}


async def list_tenants(request: Request) -> JSONResponse:
    """Every tenant with its quotas and, under ``usage``, what it uses of them: adapters,
    bytes stored, and this month's requests, tokens and cost so far."""
    _admin(request)
    base_model_id = state(request).base_model_id

    def run() -> list[dict[str, Any]]:
        with state(request).sessions() as session:
            summaries = tenant_summaries(session, base_model_id)
            return [
                {**tenancy.tenant_view(t), "usage": summaries.get(t.id, unused())}
                for t in session.scalars(select(Tenant).order_by(Tenant.name))
            ]

    return JSONResponse(_page(await run_in_threadpool(run)))


async def create_tenant(request: Request) -> JSONResponse:
    actor = _admin(request)
    body = await json_object(request)
    unknown = sorted(set(body) - {"name", *tenancy.QUOTA_FIELDS})
    if unknown:
        raise InvalidRequest(f"unknown field {unknown[0]!r}", param=unknown[0])

    def run() -> dict[str, Any]:
        with transaction(state(request).sessions) as session:
            tenant = tenancy.create_tenant(session, body.get("name", ""), body, actor=actor)
            return tenancy.tenant_view(tenant)

    return JSONResponse(await run_in_threadpool(run), status_code=201)


async def get_tenant(request: Request) -> JSONResponse:
    """The tenant with its quotas and, under ``usage``, what the list shows for it."""
    _admin(request)
    base_model_id = state(request).base_model_id

    def run() -> dict[str, Any]:
        with state(request).sessions() as session:
            tenant = tenancy.get_tenant(session, request.path_params["id"])
            summaries = tenant_summaries(session, base_model_id)
            return {**tenancy.tenant_view(tenant), "usage": summaries.get(tenant.id, unused())}

    return JSONResponse(await run_in_threadpool(run))


async def update_tenant(request: Request) -> JSONResponse:
    actor = _admin(request)
    body = await json_object(request)

    def run() -> dict[str, Any]:
        with transaction(state(request).sessions) as session:
            tenant = tenancy.get_tenant(session, request.path_params["id"])
            return tenancy.tenant_view(tenancy.update_tenant(session, tenant, body, actor=actor))

    return JSONResponse(await run_in_threadpool(run))


async def create_key(request: Request) -> JSONResponse:
    actor = _admin(request)
    body = await json_object(request)
    unknown = sorted(set(body) - {"name", "scopes"})
    if unknown:
        raise InvalidRequest(f"unknown field {unknown[0]!r}", param=unknown[0])

    def run() -> dict[str, Any]:
        with transaction(state(request).sessions) as session:
            tenant = tenancy.get_tenant(session, request.path_params["id"])
            key, secret = tenancy.create_key(
                session,
                tenant,
                name=body.get("name", "default"),
                scopes=body.get("scopes"),
                actor=actor,
            )
            return {**tenancy.key_view(key), "key": secret}

    return JSONResponse(await run_in_threadpool(run), status_code=201)


async def list_keys(request: Request) -> JSONResponse:
    _admin(request)

    def run() -> list[dict[str, Any]]:
        with state(request).sessions() as session:
            tenant = tenancy.get_tenant(session, request.path_params["id"])
            keys = session.scalars(
                select(ApiKey).where(ApiKey.tenant_id == tenant.id).order_by(ApiKey.created_at)
            )
            return [tenancy.key_view(k) for k in keys]

    return JSONResponse(_page(await run_in_threadpool(run)))


async def revoke_key(request: Request) -> JSONResponse:
    actor = _admin(request)

    def run() -> dict[str, Any]:
        with transaction(state(request).sessions) as session:
            return tenancy.key_view(
                tenancy.revoke_key(session, request.path_params["id"], actor=actor)
            )

    return JSONResponse(await run_in_threadpool(run))


async def audit_log(request: Request) -> JSONResponse:
    _admin(request)
    try:
        limit = min(max(int(request.query_params.get("limit", "100")), 1), 1000)
    except ValueError as error:
        raise InvalidRequest("limit must be an integer", param="limit") from error

    def run() -> list[dict[str, Any]]:
        with state(request).sessions() as session:
            rows = session.scalars(select(AuditLog).order_by(AuditLog.id.desc()).limit(limit))
            return [
                {
                    "id": row.id,
                    "actor": row.actor,
                    "action": row.action,
                    "target_type": row.target_type,
                    "target_id": row.target_id,
                    "tenant_id": row.tenant_id,
                    "details": row.details,
                    "created_at": int(row.created_at.timestamp()),
                }
                for row in rows
            ]

    return JSONResponse(_page(await run_in_threadpool(run)))


routes = [
    *admin_usage.routes,
    *admin_adapters.routes,
    *admin_batches.routes,
    *admin_engine.routes,
    Route("/admin/api/tenants", list_tenants, methods=["GET"]),
    Route("/admin/api/tenants", create_tenant, methods=["POST"]),
    Route("/admin/api/tenants/{id}", get_tenant, methods=["GET"]),
    Route("/admin/api/tenants/{id}", update_tenant, methods=["PATCH"]),
    Route("/admin/api/tenants/{id}/keys", create_key, methods=["POST"]),
    Route("/admin/api/tenants/{id}/keys", list_keys, methods=["GET"]),
    Route("/admin/api/keys/{id}", revoke_key, methods=["DELETE"]),
    Route("/admin/api/audit", audit_log, methods=["GET"]),
]

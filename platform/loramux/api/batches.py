"""The Batch API: ``POST /v1/batches``, get, list and cancel; a Celery worker runs them."""

from __future__ import annotations

import logging
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from loramux.api.common import json_object, state, tenant_principal
from loramux.batches import RUN_BATCH, service
from loramux.batches.pages import list_body, page, parse_limit
from loramux.db.models import Batch
from loramux.db.session import transaction
from loramux.jobs.queue import job_queue

log = logging.getLogger(__name__)
SCOPE = "batches"


async def create_batch(request: Request) -> JSONResponse:
    user = tenant_principal(request, SCOPE)
    app_state = state(request)
    body = await json_object(request)

    def run() -> dict[str, Any]:
        with transaction(app_state.sessions) as session:
            batch = service.create_batch(
                session, tenant_id=user.tenant_id or "", api_key_id=user.key_id, body=body
            )
            return service.batch_view(batch)

    view = await run_in_threadpool(run)
    try:  # after the commit, so the worker always finds the row
        await run_in_threadpool(
            job_queue(app_state.settings.resolved_broker_url).send, RUN_BATCH, view["id"]
        )
    except Exception:  # a worker starting up re-enqueues batches nobody runs
        log.exception("could not enqueue batch %s", view["id"])
    return JSONResponse(view)


async def get_batch(request: Request) -> JSONResponse:
    user = tenant_principal(request, SCOPE)

    def run() -> dict[str, Any]:
        with state(request).sessions() as session:
            batch = service.get_batch(session, user.tenant_id or "", request.path_params["id"])
            return service.batch_view(batch)

    return JSONResponse(await run_in_threadpool(run))


async def list_batches(request: Request) -> JSONResponse:
    user = tenant_principal(request, SCOPE)
    limit = parse_limit(request.query_params.get("limit"))

    def run() -> dict[str, Any]:
        with state(request).sessions() as session:
            query = service.batches_query(user.tenant_id or "")
            rows, has_more = page(session, query, Batch, request.query_params.get("after"), limit)
            return list_body([service.batch_view(r) for r in rows], has_more)

    return JSONResponse(await run_in_threadpool(run))


async def cancel_batch(request: Request) -> JSONResponse:
    user = tenant_principal(request, SCOPE)

    def run() -> dict[str, Any]:
        with transaction(state(request).sessions) as session:
            batch = service.cancel_batch(session, user.tenant_id or "", request.path_params["id"])
            return service.batch_view(batch)

    return JSONResponse(await run_in_threadpool(run))


routes = [
    Route("/v1/batches", create_batch, methods=["POST"]),
    Route("/v1/batches", list_batches, methods=["GET"]),
    Route("/v1/batches/{id}", get_batch, methods=["GET"]),
    Route("/v1/batches/{id}/cancel", cancel_batch, methods=["POST"]),
]

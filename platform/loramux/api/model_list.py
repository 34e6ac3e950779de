"""``GET /v1/models`` in OpenAI's list shape."""

from __future__ import annotations

from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from loramux.api.common import principal, state
from loramux.resolve import ready_adapters


async def list_models(request: Request) -> JSONResponse:
    user = principal(request, "inference")
    app_state = state(request)
    base = {
        "id": app_state.base_model_id,
        "object": "model",
        "created": app_state.base_model_created,
        "owned_by": "loramux",
        "parent": None,
    }

    def adapters() -> list[dict[str, Any]]:
        if user.tenant_id is None:
            return []
        merged = app_state.merged
        if merged is not None:  # a merged deployment serves its one adapter, to its tenant
            if user.tenant_id != merged.tenant_id:
                return []
            return [
                {
                    "id": merged.adapter_name,
                    "object": "model",
                    "created": app_state.base_model_created,
                    "owned_by": user.tenant_name,
                    "parent": app_state.base_model_id,
                    "version": merged.version,
                    "merged": True,
                }
            ]
        with app_state.sessions() as session:
            return [
                {
                    "id": adapter.name,
                    "object": "model",
                    "created": int(version.created_at.timestamp()),
                    "owned_by": user.tenant_name,
                    "parent": app_state.base_model_id,
                    "version": version.version,
                }
                for adapter, version in ready_adapters(session, user.tenant_id)
            ]

    served = [] if app_state.merged is not None else [base]  # merged: the base is not served
    return JSONResponse({"object": "list", "data": [*served, *await run_in_threadpool(adapters)]})


routes = [Route("/v1/models", list_models, methods=["GET"])]

"""``GET /v1/models`` in OpenAI's list shape."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from loramux.api.common import principal, state


async def list_models(request: Request) -> JSONResponse:
    principal(request, "inference")
    app_state = state(request)
    base = {
        "id": app_state.base_model_id,
        "object": "model",
        "created": app_state.base_model_created,
        "owned_by": "loramux",
        "parent": None,
    }
    return JSONResponse({"object": "list", "data": [base]})


routes = [Route("/v1/models", list_models, methods=["GET"])]

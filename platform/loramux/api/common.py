"""Request helpers shared by every route module."""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request

from loramux.auth.backend import Principal
from loramux.errors import AuthenticationFailed, InvalidRequest
from loramux.state import AppState


def state(request: Request) -> AppState:
    app_state: AppState = request.app.state.loramux
    return app_state


def principal(request: Request, scope: str) -> Principal:
    user = request.scope.get("user")
    if not isinstance(user, Principal):
        raise AuthenticationFailed(
            "You didn't provide an API key. Pass it as 'Authorization: Bearer YOUR_KEY'.",
            code="missing_api_key",
        )
    user.require(scope)
    return user


def tenant_principal(request: Request, scope: str) -> Principal:
    user = principal(request, scope)
    if user.tenant_id is None:
        raise InvalidRequest("this route needs a tenant API key, not an admin key")
    return user


async def json_object(request: Request) -> dict[str, Any]:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InvalidRequest(f"the request body is not valid JSON: {error}") from error
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    return body

"""Request helpers shared by every route module."""

from __future__ import annotations

import re
from typing import Any

from starlette.requests import Request

from loramux.auth.backend import Principal
from loramux.errors import AuthenticationFailed, InvalidRequest
from loramux.state import AppState
from loramux_engine.utils.bounded_json import MAX_INT_DIGITS, JSONLimitError, loads

# A key whose value is a number the loader refuses (too many digits, NaN, Infinity, or a
# float beyond float64): it names the ``param`` of the refusal. Run on refused bodies only.
_BAD_NUMBER = re.compile(
    rb'"([A-Za-z_][A-Za-z0-9_]{0,63})"\s*:\s*(?:-?\d{%d}|NaN|-?Infinity|-?[\d.]+[eE]\+?\d{3})'
    % (MAX_INT_DIGITS + 1)
)


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
        body = loads(raw)
    except JSONLimitError as error:
        bad_number = _BAD_NUMBER.search(raw)
        raise InvalidRequest(
            f"the request body is not valid JSON or is out of bounds: {error}",
            param=bad_number.group(1).decode() if bad_number else None,
        ) from None
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    return body

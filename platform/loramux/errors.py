"""One error type per failure kind, mapped once to HTTP in OpenAI's error shape."""

from __future__ import annotations

import logging
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse

logger = logging.getLogger(__name__)


class APIError(Exception):
    status_code = 400
    type = "invalid_request_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status_code, headers=self.headers)


class InvalidRequest(APIError):
    pass


class AuthenticationFailed(APIError):
    status_code = 401
    type = "authentication_error"
    code = "invalid_api_key"


class PermissionDenied(APIError):
    status_code = 403
    type = "permission_error"
    code = "insufficient_scope"


class NotFound(APIError):
    status_code = 404
    type = "not_found_error"
    code = "not_found"


class Conflict(APIError):
    status_code = 409
    type = "invalid_request_error"
    code = "conflict"


class PayloadTooLarge(APIError):
    status_code = 413
    type = "invalid_request_error"
    code = "payload_too_large"


class RateLimited(APIError):
    status_code = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"


class QuotaExceeded(APIError):
    status_code = 429
    type = "insufficient_quota"
    code = "insufficient_quota"


class ServiceUnavailable(APIError):
    status_code = 503
    type = "server_error"
    code = "service_unavailable"


async def api_error_handler(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    return exc.response()


async def internal_error_handler(request: Request, exc: Exception) -> JSONResponse:
    # The method and path only: never a body, which may hold prompt text.
    logger.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    body = APIError("The server had an error while processing your request.").body()
    body["error"].update(type="server_error", code="internal_error")
    return JSONResponse(body, status_code=500)

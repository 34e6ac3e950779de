"""One error type per failure kind, mapped once to HTTP in OpenAI's error shape."""

from __future__ import annotations

import logging
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from sqlalchemy import exc as sa_exc
from starlette.requests import Request
from starlette.responses import JSONResponse

from loramux.storage.errors import StorageUnavailable

logger = logging.getLogger(__name__)

# What a 503 asks a client to wait before retrying: about one dependency timeout.
RETRY_AFTER_S = 5


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

    def __init__(self, message: str, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.headers.setdefault("Retry-After", str(RETRY_AFTER_S))


def dependency_unavailable(exc: BaseException) -> ServiceUnavailable | None:
    """The 503 for a dependency that is down, hung or refusing; None for any other error.

    The one place a registry or storage failure becomes HTTP, wherever it was raised (the
    auth backend, a route). The message names no host, port, bucket, key or path: those
    are in the log line written here.
    """
    if isinstance(exc, sa_exc.OperationalError | sa_exc.InterfaceError | sa_exc.TimeoutError) or (
        isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated
    ):
        what = "the registry database"
    elif isinstance(exc, StorageUnavailable):
        what = "object storage"
    elif isinstance(exc, RedisConnectionError | RedisTimeoutError):  # the shared limiter
        what = "the rate limiter"
    else:
        return None
    logger.warning("dependency unavailable (%s): %s", what, exc)
    return ServiceUnavailable(
        f"The service is temporarily unavailable ({what}); please retry later."
    )


async def dependency_error_handler(request: Request, exc: Exception) -> JSONResponse:
    unavailable = dependency_unavailable(exc)
    if unavailable is None:
        return await internal_error_handler(request, exc)
    return unavailable.response()


# For the app's exception_handlers: what a dependency outage raises in a route. Any other
# error (an IntegrityError is a bug) stays with the catch-all 500.
DEPENDENCY_ERRORS: tuple[type[Exception], ...] = (
    sa_exc.OperationalError,
    sa_exc.InterfaceError,
    sa_exc.TimeoutError,
    StorageUnavailable,
    RedisConnectionError,
    RedisTimeoutError,
)


async def api_error_handler(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    return exc.response()


async def internal_error_handler(request: Request, exc: Exception) -> JSONResponse:
    unavailable = dependency_unavailable(exc)
    if unavailable is not None:  # raised outside the routes (a middleware)
        return unavailable.response()
    # The method and path only: never a body, which may hold prompt text.
    logger.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    body = APIError("The server had an error while processing your request.").body()
    body["error"].update(type="server_error", code="internal_error")
    return JSONResponse(body, status_code=500)

"""Plain ASGI middleware."""

from __future__ import annotations

import re
import secrets

from opentelemetry.trace import Span
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from loramux.errors import PayloadTooLarge
from loramux.logging_config import request_id_var

# The routes that take a file as multipart/form-data: the adapter and the file uploads.
UPLOAD_ROUTES = (("POST", "/v1/adapters"), ("POST", "/v1/files"))
REQUEST_ID = re.compile(rb"[A-Za-z0-9._:-]{1,128}")


class BodySizeLimit:
    """Answer 413 for a body over its limit, by header or by counting what arrives.

    A multipart body sent to one of ``upload_routes`` gets ``max_upload_bytes``; every
    other body ``max_bytes``. The match is exact (method, path and content type): a JSON
    body under an upload path (``/v1/adapters/uploads``) is parsed whole in memory, so it
    must never get the upload cap.
    """

    def __init__(
        self,
        app: ASGIApp,
        max_bytes: int,
        max_upload_bytes: int,
        upload_routes: tuple[tuple[str, str], ...] = UPLOAD_ROUTES,
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.max_upload_bytes = max_upload_bytes
        self.upload_routes = upload_routes

    def limit(self, scope: Scope) -> int:
        content_type = dict(scope["headers"]).get(b"content-type", b"").lower()
        upload_route = (scope["method"], scope["path"]) in self.upload_routes
        if upload_route and content_type.startswith(b"multipart/form-data"):
            return self.max_upload_bytes
        return self.max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit(scope)
        too_large = PayloadTooLarge(f"the request body is over {limit} bytes")
        length = dict(scope["headers"]).get(b"content-length")
        # More than 18 digits is over any limit (and int() refuses past 4,300 digits).
        if length is not None and length.isdigit() and (len(length) > 18 or int(length) > limit):
            await too_large.response()(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise too_large
            return message

        await self.app(scope, limited_receive, send)


class RequestId:
    """Names each request: the caller's ``X-Request-Id`` if it is a short token of safe
    characters, else a fresh one. The id is returned as ``x-request-id``, set in
    ``request_id_var`` for every log line while the request runs, and on its trace."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = accepted_request_id(dict(scope["headers"]).get(b"x-request-id"))
        token = request_id_var.set(request_id)
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers["x-request-id"] = request_id
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            request_id_var.reset(token)


def accepted_request_id(value: bytes | None) -> str:
    """``value`` if it is 1 to 128 of ``[A-Za-z0-9._:-]``, else ``req_`` and 24 hex digits.

    A longer or stranger id is replaced, not trimmed: it reaches logs and traces, where
    newlines, quotes or a pasted secret must not.
    """
    if value is not None and REQUEST_ID.fullmatch(value):
        return value.decode("ascii")
    return "req_" + secrets.token_hex(12)


def trace_request_id(span: Span, scope: Scope) -> None:
    """The ASGI instrumentation's server request hook: the request id on its span."""
    request_id = request_id_var.get()
    if request_id is not None and span.is_recording():
        span.set_attribute("loramux.request_id", request_id)

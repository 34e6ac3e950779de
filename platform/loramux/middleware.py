"""Plain ASGI middleware."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from loramux.errors import PayloadTooLarge

# The routes that take a file as multipart/form-data: the adapter and the file uploads.
UPLOAD_ROUTES = (("POST", "/v1/adapters"), ("POST", "/v1/files"))


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

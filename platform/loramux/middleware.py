"""Plain ASGI middleware."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from loramux.errors import PayloadTooLarge


class BodySizeLimit:
    """Answer 413 for a body over its limit, by header or by counting what arrives.

    Upload routes (paths under ``upload_prefixes``) get ``max_upload_bytes``; the rest
    ``max_bytes``.
    """

    def __init__(
        self,
        app: ASGIApp,
        max_bytes: int,
        max_upload_bytes: int,
        upload_prefixes: tuple[str, ...] = ("/v1/adapters", "/v1/files"),
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.max_upload_bytes = max_upload_bytes
        self.upload_prefixes = upload_prefixes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = (
            self.max_upload_bytes
            if scope["path"].startswith(self.upload_prefixes)
            else self.max_bytes
        )
        too_large = PayloadTooLarge(f"the request body is over {limit} bytes")
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
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

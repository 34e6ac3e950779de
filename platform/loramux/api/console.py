"""The admin console: its static single page under /admin/ (its data: api/admin*.py).

The page is public code; everything it shows comes from /admin/api/*, which needs the admin
key. The key lives in the browser's sessionStorage and travels only as a Bearer header, never
in a cookie, so the console has no CSRF surface, and its headers forbid framing, inline code
and any origin but ours.
"""

from __future__ import annotations

from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# The source tree's admin_ui/ folder, found as db/migrate.py finds migrations/.
STATIC_DIR = Path(__file__).resolve().parents[3] / "admin_ui" / "static"

SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
        "frame-ancestors 'none'"
    ),
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    # Revalidate on every load (ETags keep that cheap) so an upgrade is seen at once.
    "Cache-Control": "no-cache",
}
_OVERRIDDEN = {name.lower() for name in SECURITY_HEADERS}


class SecurityHeaders:
    """ASGI wrapper that adds SECURITY_HEADERS to every response of the wrapped app."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [
                    (name, value)
                    for name, value in message.get("headers", [])
                    if name.decode("latin-1").lower() not in _OVERRIDDEN
                ]
                headers += [(k.lower().encode(), v.encode()) for k, v in SECURITY_HEADERS.items()]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


async def index(_request: Request) -> Response:
    if not (STATIC_DIR / "index.html").is_file():
        raise RuntimeError(f"admin console not found at {STATIC_DIR}; install loramux editable")
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html", headers=SECURITY_HEADERS)


async def to_index(_request: Request) -> Response:
    return RedirectResponse("/admin/", status_code=308)


routes = [
    Route("/admin", to_index, methods=["GET"]),
    Route("/admin/", index, methods=["GET"]),
    Mount("/admin/static", SecurityHeaders(StaticFiles(directory=STATIC_DIR, check_dir=False))),
]

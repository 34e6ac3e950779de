"""Liveness, readiness and the Prometheus metrics."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import anyio
from sqlalchemy import text
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from loramux.api.common import principal, state


async def healthz(_request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> JSONResponse:
    app_state = state(request)
    checks: dict[str, str] = {}

    def check_registry() -> None:
        with app_state.db_engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    def in_thread(check: Callable[[], None]) -> Callable[[], Awaitable[None]]:
        return lambda: anyio.to_thread.run_sync(check, abandon_on_cancel=True)

    async def run(name: str, check: Callable[[], Awaitable[None]]) -> None:
        # Each check bounded: a hung dependency answers "not ready" within seconds. The
        # abandoned thread ends on its own (every registry and S3 call has its timeout).
        try:
            with anyio.fail_after(app_state.settings.readyz_timeout_s):
                await check()
            checks[name] = "ok"
        except TimeoutError:
            checks[name] = "error: timed out"
        except Exception as error:  # readiness reports any failure, whatever its type
            checks[name] = f"error: {type(error).__name__}"

    async with anyio.create_task_group() as group:
        group.start_soon(run, "registry", in_thread(check_registry))
        group.start_soon(run, "storage", in_thread(app_state.storage.check))
        if app_state.settings.redis_url:  # the shared rate limiter (its own client timeouts)
            group.start_soon(run, "redis", app_state.limiter.check)
    # A limiter that fails open serves without Redis: reported, but still ready.
    optional = {"redis"} if app_state.limiter.fail_open else set()
    ready = all(v == "ok" for k, v in checks.items() if k not in optional)
    return JSONResponse(
        {"status": "ok" if ready else "unavailable", "checks": checks},
        status_code=200 if ready else 503,
    )


async def metrics(request: Request) -> Response:
    app_state = state(request)
    if app_state.settings.metrics_auth == "admin":
        principal(request, "admin")
    return app_state.metrics.exposition()


routes = [
    Route("/healthz", healthz),
    Route("/readyz", readyz),
    Route("/metrics", metrics, methods=["GET"]),
]

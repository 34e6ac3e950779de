"""Liveness, readiness and the Prometheus metrics."""

from __future__ import annotations

from sqlalchemy import text
from starlette.concurrency import run_in_threadpool
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

    for name, check in (("registry", check_registry), ("storage", app_state.storage.check)):
        try:
            await run_in_threadpool(check)
            checks[name] = "ok"
        except Exception as error:  # readiness reports any failure, whatever its type
            checks[name] = f"error: {type(error).__name__}"
    ready = all(v == "ok" for v in checks.values())
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

"""The Starlette application: routes, middleware and error mapping, composed once."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.authentication import AuthenticationMiddleware

from loramux import openapi
from loramux.adapters.outbox import MergeOutbox, ValidationOutbox
from loramux.api import (
    adapters,
    admin,
    batches,
    console,
    engine,
    files,
    health,
    inference,
    merges,
    model_list,
)
from loramux.auth.backend import ApiKeyBackend, on_auth_error
from loramux.db.session import engine_from_settings, make_session_factory
from loramux.errors import (
    DEPENDENCY_ERRORS,
    APIError,
    api_error_handler,
    dependency_error_handler,
    internal_error_handler,
)
from loramux.limits import rate_limiter_from_settings
from loramux.middleware import BodySizeLimit, RequestId, trace_request_id
from loramux.settings import Settings
from loramux.state import AppState
from loramux.telemetry import TracedAuthBackend, asgi_middleware, setup_tracing
from loramux.usage_spool import replay_forever, spool_for


def base_model_id(settings: Settings) -> str:
    """The id tenants pass as ``model`` for the base model: its name, or its folder's name."""
    path = Path(settings.model)
    return path.name if path.is_dir() else settings.model


def build_state(settings: Settings, *, storage: Any = None, engine: Any = None) -> AppState:
    from loramux.storage import storage_from_settings

    db_engine = engine_from_settings(settings)
    return AppState(
        settings=settings,
        db_engine=db_engine,
        sessions=make_session_factory(db_engine),
        storage=storage if storage is not None else storage_from_settings(settings),
        base_model_id=base_model_id(settings),
        base_model_created=int(time.time()),
        limiter=rate_limiter_from_settings(settings),
        engine=engine,
    )


def create_app(settings: Settings, *, app_state: AppState | None = None) -> Starlette:
    app_state = app_state or build_state(settings)
    admin_key = settings.admin_key.get_secret_value() if settings.admin_key else None
    setup_tracing(settings)

    @asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        if app_state.engine is not None:
            app_state.engine.start()
        # Usage journalled while the registry was away: replayed now (in the background, so
        # the app starts with the registry down too) and until it is written.
        replay = asyncio.create_task(
            replay_forever(
                spool_for(settings.home),
                app_state.sessions,
                settings.usage_spool_replay_interval_s,
            )
        )
        # Validations due in the registry (an upload's, one a dead worker or broker lost):
        # published now and every few seconds; a broker that is down delays them only.
        outbox = ValidationOutbox.from_settings(app_state.sessions, settings)
        dispatch = asyncio.create_task(outbox.dispatch_forever())
        # Merge jobs due (just requested, or lost with a worker): the same pattern.
        merge_outbox = MergeOutbox.from_settings(app_state.sessions, settings)
        merge_dispatch = asyncio.create_task(merge_outbox.dispatch_forever())
        try:
            yield
        finally:
            outbox.stop()
            merge_outbox.stop()
            dispatch.cancel()
            merge_dispatch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await dispatch
            with contextlib.suppress(asyncio.CancelledError):
                await merge_dispatch
            replay.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await replay
            # Here, not after uvicorn.run: uvicorn re-raises SIGTERM once it has shut down.
            for hook in app_state.shutdown_hooks:
                hook()
            if app_state.engine is not None:
                app_state.engine.shutdown()
            app_state.db_engine.dispose()

    app = Starlette(
        routes=[
            *health.routes,
            *model_list.routes,
            *inference.routes,
            *adapters.routes,
            *merges.routes,
            *files.routes,
            *batches.routes,
            *admin.routes,
            *console.routes,
            *engine.routes,
            *openapi.routes,
        ],
        middleware=[
            # The request id first, so the trace and every log line of the request carry it.
            Middleware(RequestId),
            *asgi_middleware(
                request_hook=trace_request_id, trust_incoming=settings.trace_trust_incoming
            ),
            Middleware(
                BodySizeLimit,
                max_bytes=settings.max_body_bytes,
                max_upload_bytes=settings.max_upload_bytes,
            ),
            Middleware(
                AuthenticationMiddleware,
                backend=TracedAuthBackend(ApiKeyBackend(app_state.sessions, admin_key)),
                on_error=on_auth_error,
            ),
        ],
        exception_handlers={
            APIError: api_error_handler,
            **dict.fromkeys(DEPENDENCY_ERRORS, dependency_error_handler),
            Exception: internal_error_handler,
        },
        lifespan=lifespan,
    )
    app.state.loramux = app_state
    return app

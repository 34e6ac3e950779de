"""The batch runner's setting in a Celery worker process.

The worker holds no engine: it reaches the serving process's engine over HTTP with the
admin key (``RemoteEngineClient``), so batch lines share the engine, its adapter cache and
its scheduler with interactive traffic. Built once per process, like ``worker_context``.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
import uuid
from datetime import UTC, datetime

from sqlalchemy import select

from loramux.batches.files import ACTIVE_STATUSES, unix
from loramux.batches.runner import BatchRunner
from loramux.batches.staging import move_status
from loramux.db.models import Batch
from loramux.db.session import transaction
from loramux.jobs.context import WorkerContext
from loramux.limits.base import Limits, RateLimiter, WindowState
from loramux.remote_engine import RemoteEngineClient
from loramux.state import AppState


class AdmitAll(RateLimiter):
    """Batch lines are not subject to per-minute limits (the monthly quota still applies)."""

    async def _admit(
        self, tenant_id: str, request_id: str, limits: Limits, tokens: int, sequences: int
    ) -> WindowState:
        return WindowState(None, 0.0, 0, 0, 0.0, 0.0)

    async def _finish(self, tenant_id: str, request_id: str, used_tokens: int) -> None:
        return None


_state: AppState | None = None
_state_pid: int | None = None


def batch_app_state(context: WorkerContext) -> AppState:
    """What ``admit`` needs, with the remote engine and the admit-all limiter."""
    global _state, _state_pid
    if _state is None or _state_pid != os.getpid():
        from loramux.base_models import resolve_model

        settings = context.settings
        if settings.admin_key is None:
            raise RuntimeError("a batch worker needs LORAMUX_ADMIN_KEY to reach the engine")
        engine = RemoteEngineClient(
            settings.resolved_engine_url,
            settings.admin_key.get_secret_value(),
            resolve_model(settings.model, settings.models_dir),
        )
        sessions = context.sessions
        merged = None
        if settings.merged_adapter is not None:  # lines resolve as the merged server does
            from loramux.adapters.merged_serving import resolve_merged_adapter

            with sessions() as session:
                merged = resolve_merged_adapter(session, settings.merged_adapter)
        _state = AppState(
            settings=settings,
            db_engine=sessions.kw["bind"],
            sessions=sessions,
            storage=context.storage,
            base_model_id=engine.base_model_id,
            base_model_created=int(time.time()),
            limiter=AdmitAll(),
            engine=engine,
            merged=merged,
        )
        _state_pid = os.getpid()
    return _state


def run_batch_now(context: WorkerContext, batch_id: str) -> str:
    owner = f"{socket.gethostname()[:32]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    runner = BatchRunner(batch_app_state(context), batch_id, owner)
    return asyncio.run(runner.run())


def orphaned_batches(context: WorkerContext) -> list[tuple[str, float]]:
    """Unfinished batches and how long until their lease lapses (0: nobody holds one).

    A worker killed outright leaves its task unacknowledged until the broker's visibility
    timeout; a worker starting up hands these back to the queue sooner.
    """
    now = datetime.now(UTC).timestamp()
    with context.sessions() as session:
        rows = session.execute(
            select(Batch.id, Batch.lease_expires_at).where(Batch.status.in_(ACTIVE_STATUSES))
        ).all()
    return [(batch_id, max(0.0, (unix(lease) or now) - now)) for batch_id, lease in rows]


def fail_batch(context: WorkerContext, batch_id: str, message: str) -> None:
    """End a batch the worker cannot run (a bug, not an outage) as failed, saying why."""
    error = {"code": "internal_error", "message": message, "param": None, "line": None}
    with transaction(context.sessions) as session:
        move_status(
            session, batch_id, ("validating", "in_progress", "finalizing", "cancelling"),
            status="failed", failed_at=datetime.now(UTC), lease_owner=None,
            lease_expires_at=None, errors={"object": "list", "data": [error]},
        )  # fmt: skip

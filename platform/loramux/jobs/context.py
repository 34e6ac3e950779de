"""What a worker process needs, built lazily once per process from settings.

Nothing is shared across processes: a forked pool child sees a different pid and builds
its own database engine and storage client.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from sqlalchemy.orm import Session, sessionmaker

from loramux.db.session import make_engine, make_session_factory
from loramux.settings import Settings, get_settings
from loramux.storage import Storage, storage_from_settings


@dataclass(frozen=True, slots=True)
class WorkerContext:
    settings: Settings
    sessions: sessionmaker[Session]
    storage: Storage
    pid: int


_context: WorkerContext | None = None


def worker_context() -> WorkerContext:
    global _context
    if _context is None or _context.pid != os.getpid():
        settings = get_settings()
        _context = WorkerContext(
            settings=settings,
            sessions=make_session_factory(make_engine(settings.resolved_database_url)),
            storage=storage_from_settings(settings),
            pid=os.getpid(),
        )
    return _context

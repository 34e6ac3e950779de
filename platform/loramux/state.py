"""What a running app holds: settings, the registry, storage, and the engine client."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from loramux.drain import Drain
from loramux.limits import RateLimiter
from loramux.metrics import Metrics
from loramux.settings import Settings


@dataclass
class AppState:
    settings: Settings
    db_engine: Engine
    sessions: sessionmaker[Session]
    storage: Any
    base_model_id: str
    base_model_created: int
    limiter: RateLimiter
    # The EngineClient (loramux.engine_client); None when this process serves no engine.
    engine: Any = None
    # Run when the app shuts down (e.g. stopping the embedded Celery worker).
    shutdown_hooks: list[Callable[[], None]] = field(default_factory=list)
    # Ends the requests still in flight when the shutdown grace runs out.
    drain: Drain = field(default_factory=Drain)
    metrics: Metrics = field(init=False)

    def __post_init__(self) -> None:
        self.metrics = Metrics(lambda: self.engine)

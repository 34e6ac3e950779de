"""What a running app holds: settings, the registry, storage, and the engine client."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from loramux.drain import Drain
from loramux.errors import ServiceUnavailable
from loramux.limits import RateLimiter
from loramux.metrics import Metrics
from loramux.settings import Settings
from loramux.storage import Storage

if TYPE_CHECKING:  # the in-process client imports torch, which an API-only process skips
    from loramux.adapters.merged_serving import MergedServing
    from loramux.engine_client import EngineClient


@dataclass
class AppState:
    settings: Settings
    db_engine: Engine
    sessions: sessionmaker[Session]
    storage: Storage
    base_model_id: str
    base_model_created: int
    limiter: RateLimiter
    # None when this process serves no engine.
    engine: EngineClient | None = None
    # The one adapter version a merged deployment serves (LORAMUX_MERGED_ADAPTER).
    merged: MergedServing | None = None
    # Run when the app shuts down (e.g. stopping the embedded Celery worker).
    shutdown_hooks: list[Callable[[], None]] = field(default_factory=list)
    # Ends the requests still in flight when the shutdown grace runs out.
    drain: Drain = field(default_factory=Drain)
    metrics: Metrics = field(init=False)

    def __post_init__(self) -> None:
        self.metrics = Metrics(lambda: self.engine)

    def require_engine(self) -> EngineClient:
        """The engine client, or a 503 where this process serves no engine."""
        if self.engine is None:
            raise ServiceUnavailable("the inference engine is not running on this server")
        return self.engine

"""What a running app holds: settings, the registry, storage, and the engine client."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from loramux.limits import RateLimiter
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
    # The EngineClient (loramux.engine_client); None until the engine is wired in.
    engine: Any = None
    extras: dict[str, Any] = field(default_factory=dict)

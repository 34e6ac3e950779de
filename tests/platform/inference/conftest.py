"""An app with a real in-process engine on the tiny random LLaMA."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker
from starlette.testclient import TestClient

from loramux.app import build_state, create_app
from loramux.engine_client import InProcessEngineClient, StorageAdapterSource
from loramux.settings import Settings
from loramux.storage import LocalStorage
from loramux_engine.config import EngineConfig
from loramux_engine.engine.async_engine import AsyncLLMEngine
from tests.platform.conftest import ADMIN_KEY


@pytest.fixture
def settings(
    pg_database: str, db: sessionmaker[Session], tmp_path: Path, tiny_llama_dir: Path
) -> Settings:
    return Settings(
        home=tmp_path / "home",
        database_url=pg_database,
        storage_url=(tmp_path / "storage").as_uri(),
        admin_key=ADMIN_KEY,
        model=str(tiny_llama_dir),
        rate_limit_window_s=2.0,
    )


@pytest.fixture
def engine(settings: Settings, tiny_llama_dir: Path) -> InProcessEngineClient:
    config = EngineConfig(
        model_dir=str(tiny_llama_dir),
        device="cpu",
        max_num_seqs=16,
        max_model_len=256,
        kv_cache_bytes=8 << 20,
        max_num_batched_tokens=512,
        adapter_source=StorageAdapterSource(LocalStorage(settings.home / "storage")),
    )
    return InProcessEngineClient(AsyncLLMEngine.from_config(config))


@pytest.fixture
def client(settings: Settings, engine: InProcessEngineClient) -> Iterator[TestClient]:
    app = create_app(settings, app_state=build_state(settings, engine=engine))
    with TestClient(app) as test_client:
        yield test_client

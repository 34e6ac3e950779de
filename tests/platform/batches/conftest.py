"""Batch tests on both registries (PostgreSQL and the embedded default's SQLite), local
storage and the tiny model's in-process engine. The runner is driven directly here (no
Celery); tests/e2e runs it on a worker."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy.orm import Session, sessionmaker
from starlette.testclient import TestClient

from loramux.app import build_state, create_app
from loramux.batches.runner import BatchRunner
from loramux.batches.worker import AdmitAll
from loramux.engine_client import InProcessEngineClient, StorageAdapterSource
from loramux.settings import Settings
from loramux.state import AppState
from loramux.storage import LocalStorage
from loramux_engine.config import EngineConfig
from loramux_engine.engine.async_engine import AsyncLLMEngine
from tests.fixtures.services import REGISTRY_BACKENDS
from tests.platform.conftest import ADMIN_KEY

BROKER_DB = 13  # its own Redis db: no worker consumes what these tests enqueue


@pytest.fixture(params=REGISTRY_BACKENDS)
def registry_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def settings(
    registry_url: str, db: sessionmaker[Session], tmp_path: Path, tiny_llama_dir: Path,
    redis_url: str,
) -> Settings:  # fmt: skip
    broker_url = f"{redis_url.rsplit('/', 1)[0]}/{BROKER_DB}"
    redis.Redis.from_url(broker_url).flushdb()
    return Settings(
        home=tmp_path / "home",
        database_url=registry_url,
        storage_url=(tmp_path / "storage").as_uri(),
        broker_url=broker_url,
        admin_key=ADMIN_KEY,
        model=str(tiny_llama_dir),
        batch_poll_s=0.05,
        batch_lease_s=5.0,
        batch_max_in_flight=4,
    )


@pytest.fixture
def engine(settings: Settings, tiny_llama_dir: Path) -> InProcessEngineClient:
    config = EngineConfig(
        model_dir=str(tiny_llama_dir),
        device="cpu",
        max_num_seqs=8,
        max_model_len=256,
        kv_cache_bytes=8 << 20,
        max_num_batched_tokens=512,
        adapter_source=StorageAdapterSource(LocalStorage(settings.home / "storage")),
    )
    return InProcessEngineClient(AsyncLLMEngine.from_config(config))


@pytest.fixture
def app_state(settings: Settings, engine: InProcessEngineClient) -> AppState:
    return build_state(settings, engine=engine)


@pytest.fixture
def client(app_state: AppState) -> Iterator[TestClient]:
    with TestClient(create_app(app_state.settings, app_state=app_state)) as test_client:
        yield test_client


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def jsonl(lines: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


def request_line(custom_id: str, body: dict[str, Any], url: str = "/v1/completions") -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body}


def upload(client: TestClient, key: str, data: bytes, purpose: str = "batch") -> Any:
    return client.post(
        "/v1/files",
        headers=bearer(key),
        data={"purpose": purpose},
        files={"file": ("input.jsonl", data, "application/jsonl")},
    )


@pytest.fixture
def start_batch(client: TestClient) -> Callable[..., dict[str, Any]]:
    """``start_batch(key, lines, endpoint=...) -> batch``: upload the lines, create a batch."""

    def start(
        key: str, lines: list[dict[str, Any]], endpoint: str = "/v1/completions"
    ) -> dict[str, Any]:
        uploaded = upload(client, key, jsonl(lines))
        assert uploaded.status_code == 200, uploaded.text
        batch = client.post(
            "/v1/batches",
            headers=bearer(key),
            json={
                "input_file_id": uploaded.json()["id"],
                "endpoint": endpoint,
                "completion_window": "24h",
            },
        )
        assert batch.status_code == 200, batch.text
        result: dict[str, Any] = batch.json()
        return result

    return start


@pytest.fixture
def run_batch(app_state: AppState) -> Callable[..., str]:
    """``run_batch(batch_id, owner="test", **settings) -> status``: the runner, in-process."""

    def run(batch_id: str, owner: str = "test-worker", **overrides: Any) -> str:
        state = AppState(
            settings=app_state.settings.model_copy(update=overrides),
            db_engine=app_state.db_engine,
            sessions=app_state.sessions,
            storage=app_state.storage,
            base_model_id=app_state.base_model_id,
            base_model_created=app_state.base_model_created,
            limiter=AdmitAll(),
            engine=app_state.engine,
        )
        return asyncio.run(BatchRunner(state, batch_id, owner).run())

    return run

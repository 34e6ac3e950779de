"""The registry lost during a stream: the client still gets every token and ``[DONE]``; the
usage record is journalled under home and written exactly once when the registry returns,
a restart in between neither losing nor doubling it."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker
from starlette.testclient import TestClient

from loramux.app import build_state, create_app
from loramux.db.models import UsageRecord
from loramux.engine_client import InProcessEngineClient
from loramux.settings import Settings
from loramux.usage_spool import UsageSpool, spool_for
from tests.fixtures.fault_proxy import FaultProxy
from tests.fixtures.services import both_registries
from tests.platform.adapters.helpers import bearer
from tests.platform.conftest import ADMIN_KEY
from tests.platform.faults.conftest import FAST_TIMEOUTS, proxied_url, within
from tests.platform.inference.conftest import engine  # noqa: F401  (the tiny engine fixture)
from tests.platform.registry_rows import add_tenant

PROMPT = "a secret prompt the journal must never hold"


@pytest.fixture
def settings(
    registry_url: str,
    db: sessionmaker[Session],
    tmp_path: Path,
    tiny_llama_dir: Path,
    pg_proxy: FaultProxy,
) -> Settings:
    return Settings(
        home=tmp_path / "home",
        database_url=proxied_url(registry_url, pg_proxy),
        storage_url=(tmp_path / "storage").as_uri(),
        admin_key=SecretStr(ADMIN_KEY),
        model=str(tiny_llama_dir),
        usage_spool_replay_interval_s=0.1,
        **FAST_TIMEOUTS,
    )


@pytest.fixture
def client(settings: Settings, engine: InProcessEngineClient) -> Iterator[TestClient]:  # noqa: F811
    with TestClient(create_app(settings, app_state=build_state(settings, engine=engine))) as c:
        yield c


def records(db: sessionmaker[Session], request_id: str) -> int:
    with db() as session:
        query = select(func.count()).where(UsageRecord.request_id == request_id)
        return int(session.scalar(query) or 0)


def wait_until(condition: Callable[[], bool]) -> None:
    def poll() -> None:
        while not condition():
            time.sleep(0.05)

    within(poll)


def stream_losing_the_registry(client: TestClient, key: str, proxy: FaultProxy) -> list[str]:
    """A chat stream during which the registry goes down; returns its data lines."""
    model = client.get("/v1/models", headers=bearer(key)).json()["data"][0]["id"]
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": 16,
        "stream": True,
        "stream_options": {"include_usage": True},
    }

    def run() -> list[str]:
        data: list[str] = []
        with client.stream("POST", "/v1/chat/completions", headers=bearer(key), json=body) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: "):
                    if not data:
                        proxy.refuse()  # the registry goes away mid-stream
                    data.append(line[len("data: ") :])
        return data

    return within(run)


def test_a_stream_that_loses_the_registry_is_billed_once_after_it_returns(
    settings: Settings,
    client: TestClient,
    make_tenant: Callable[..., tuple[dict[str, Any], str]],
    pg_proxy: FaultProxy,
    db: sessionmaker[Session],
) -> None:
    _, key = make_tenant("acme")
    data = stream_losing_the_registry(client, key, pg_proxy)
    assert data[-1] == "[DONE]"
    usage = json.loads(data[-2])["usage"]
    request_id = json.loads(data[0])["id"]

    spool = spool_for(settings.home)
    wait_until(spool.pending)
    journal = spool.path.read_text()
    assert request_id in journal and PROMPT not in journal
    assert records(db, request_id) == 0

    # A restart while the registry is still down: the new app finds the journal, keeps it.
    client.__exit__(None, None, None)  # the first app stops (the fixture's exit is a no-op)
    restarted = create_app(settings, app_state=build_state(settings))
    with TestClient(restarted):
        assert spool.pending() and records(db, request_id) == 0
        pg_proxy.resume()
        wait_until(lambda: not spool.pending())  # replayed by the app in the background
    with db() as session:
        (record,) = session.scalars(select(UsageRecord).where(UsageRecord.request_id == request_id))
        assert record.prompt_tokens == usage["prompt_tokens"]
        assert record.completion_tokens == usage["completion_tokens"]

    # A crash after the insert but before the journal was trimmed replays the line again:
    # its billing key makes that a no-op.
    spool.path.write_text(journal)
    assert spool.replay(db) == 0
    assert not spool.pending()
    assert records(db, request_id) == 1


@both_registries
def test_a_replay_bills_each_journalled_record_once_and_sets_aside_what_it_cannot(
    db: sessionmaker[Session], tmp_path: Path
) -> None:
    with db() as session:
        tenant_id = add_tenant(session, "acme").id
        session.commit()
    spool = UsageSpool(tmp_path / "home")
    record = {
        "tenant_id": tenant_id,
        "api_key_id": None,
        "adapter_version_id": None,
        "request_id": "cmpl-1",
        "endpoint": "/v1/completions",
        "billing_key": "cmpl-1",
        "prompt_tokens": 3,
        "completion_tokens": 5,
        "latency_ms": 7,
        "status": "ok",
        "created_at": datetime(2026, 1, 31, 23, 59, tzinfo=UTC),
    }
    spool.append(record)
    with spool.path.open("ab") as journal:
        journal.write(b'{"tenant_id": "torn')  # a crash in the middle of an append
    spool.append(record)  # journalled twice: a replay that crashed before trimming
    spool.append({**record, "tenant_id": "deleted", "billing_key": "cmpl-2"})

    assert spool.replay(db) == 1
    assert not spool.pending()
    with db() as session:
        (row,) = session.scalars(select(UsageRecord))
        assert (row.prompt_tokens, row.completion_tokens) == (3, 5)
        assert row.created_at == record["created_at"]  # billed in the month it ran
    rejected = spool.rejected_path.read_text().splitlines()
    assert len(rejected) == 2 and '"torn' in rejected[0] and "cmpl-2" in rejected[1]
    assert spool.replay(db) == 0
    assert records(db, "cmpl-1") == 1

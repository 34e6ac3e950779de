"""The Celery broker down or hung: an upload answers at once with its version committed and
its validation message due (no hang, so no retry making a duplicate version); once the
broker returns, the dispatcher publishes it and the worker validates it.

The app reaches Redis (the broker) through a proxy the test refuses or freezes; the
session's Celery worker reads the same queue straight from Redis.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from pydantic import SecretStr
from sqlalchemy.orm import Session, sessionmaker
from starlette.testclient import TestClient

from loramux.adapters.outbox import ValidationOutbox
from loramux.db.models import AdapterVersion
from loramux.settings import Settings
from tests.fixtures.celery import CeleryWorker
from tests.fixtures.fault_proxy import FaultProxy
from tests.platform.adapters.conftest import make_peft_adapter, peft_adapter_dir  # noqa: F401
from tests.platform.adapters.helpers import bearer, upload
from tests.platform.conftest import ADMIN_KEY
from tests.platform.faults.conftest import within


@pytest.fixture
def broker_proxy(celery_broker_url: str) -> Iterator[FaultProxy]:
    parts = urlsplit(celery_broker_url)
    with FaultProxy((parts.hostname or "127.0.0.1", parts.port or 6379)) as proxy:
        yield proxy


@pytest.fixture
def settings(
    celery_worker: CeleryWorker, db: sessionmaker[Session], broker_proxy: FaultProxy
) -> Settings:
    """The worker's registry, store and model; the broker's queue through the proxy."""
    broker_db = urlsplit(celery_worker.settings.resolved_broker_url).path
    return celery_worker.settings.model_copy(
        update={
            "admin_key": SecretStr(ADMIN_KEY),
            "broker_url": f"redis://{broker_proxy.host}:{broker_proxy.port}{broker_db}",
            "broker_timeout_s": 0.5,
            "adapter_validation_dispatch_interval_s": 0.2,
        }
    )


def version_row(db: sessionmaker[Session], version_id: str) -> AdapterVersion:
    with db() as session:
        version = session.get(AdapterVersion, version_id)
    assert version is not None
    return version


@pytest.mark.parametrize("outage", ["refuse", "freeze"])
def test_an_upload_answers_while_the_broker_is_away_and_validates_when_it_returns(  # noqa: F811
    client: TestClient,
    make_tenant: Any,
    peft_adapter_dir: Path,  # noqa: F811
    broker_proxy: FaultProxy,
    settings: Settings,
    db: sessionmaker[Session],
    wait_validated: Any,
    outage: str,
) -> None:
    _, secret = make_tenant("acme")
    getattr(broker_proxy, outage)()

    response = within(lambda: upload(client, secret, "bot", peft_adapter_dir))
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["status"] == "validating"
    assert version_row(db, body["version_id"]).validation_attempts == 0  # pending dispatch

    # A pass while the broker is away ends in its bounded time, publishes nothing and leaves
    # the version due.
    report = within(lambda: ValidationOutbox.from_settings(db, settings).dispatch_due())
    assert report.published == []
    assert version_row(db, body["version_id"]).validation_attempts == 0

    broker_proxy.resume()
    ready = wait_validated(body["version_id"])
    assert ready.status == "ready", ready.reason
    assert ready.validation_attempts == 1
    shown = client.get("/v1/adapters/bot", headers=bearer(secret)).json()
    assert shown["status"] == "ready" and shown["num_versions"] == 1

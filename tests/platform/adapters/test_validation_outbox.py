"""The validation outbox on either registry: a version's message is due in its row, published
at start, published again with backoff when it was lost, and the version rejected only once
its attempts are spent.

The broker is a real one nobody consumes from (the embedded SQLite transport, in the test's
own directory): every message sent there is lost, as to a worker that died. The dispatcher's
clock is passed in, so minutes of backoff cost the test nothing.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from kombu import Connection
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker
from starlette.testclient import TestClient

from loramux.adapters.base_shape import base_model_shape
from loramux.adapters.outbox import ValidationOutbox
from loramux.adapters.validation_job import validate_version
from loramux.app import build_state, create_app
from loramux.db.models import Adapter, AdapterVersion
from loramux.db.session import transaction
from loramux.jobs.config import QUEUE
from loramux.settings import Settings
from loramux.storage import LocalStorage
from tests.fixtures.services import both_registries
from tests.platform.registry_rows import add_adapter_version, add_tenant

TIMEOUT = timedelta(seconds=60)
MAX_ATTEMPTS = 3
WAIT_S = 60.0


@pytest.fixture
def outbox_settings(registry_url: str, db: sessionmaker[Session], tmp_path: Path) -> Settings:
    home = tmp_path / "home"
    home.mkdir()
    return Settings(
        home=home,
        database_url=registry_url,
        storage_url=(tmp_path / "storage").as_uri(),
        adapter_validation_timeout_s=TIMEOUT.total_seconds(),
        adapter_validation_max_attempts=MAX_ATTEMPTS,
        adapter_validation_dispatch_interval_s=0.1,
    )


@pytest.fixture
def outbox(outbox_settings: Settings, db: sessionmaker[Session]) -> Iterator[ValidationOutbox]:
    outbox = ValidationOutbox.from_settings(db, outbox_settings)
    yield outbox
    outbox.stop()


def queued(settings: Settings) -> int:
    """Validation messages sent to the broker and never taken."""
    with Connection(settings.resolved_broker_url) as conn:
        return int(conn.default_channel.queue_declare(queue=QUEUE, passive=True).message_count)


def validating(db: sessionmaker[Session], name: str) -> AdapterVersion:
    """A version as an upload commits it: validating, its message due, never published."""
    with transaction(db) as session:
        tenant = add_tenant(session, f"tenant-{name}")
        return add_adapter_version(session, tenant.id, name, name[0] * 64, "validating")


def row(db: sessionmaker[Session], version_id: str) -> AdapterVersion:
    with db() as session:
        version = session.get(AdapterVersion, version_id)
    assert version is not None
    return version


@both_registries
def test_a_lost_message_is_published_again_with_backoff_then_the_version_rejected(
    db: sessionmaker[Session], outbox: ValidationOutbox, outbox_settings: Settings
) -> None:
    lost = validating(db, "lost")
    done = validating(db, "done")
    t = datetime.now(UTC)
    assert sorted(outbox.dispatch_due(t).published) == sorted([lost.id, done.id])
    assert queued(outbox_settings) == 2
    with transaction(db) as session:  # a worker finished this one
        session.execute(
            update(AdapterVersion).where(AdapterVersion.id == done.id).values(status="ready")
        )

    # Attempt n waits TIMEOUT * 2**(n-1): 1, 2, 4 minutes with the default.
    for attempt, wait in enumerate((TIMEOUT, TIMEOUT * 2), start=1):
        assert row(db, lost.id).validation_attempts == attempt
        assert row(db, lost.id).validation_due_at == t + wait
        report = outbox.dispatch_due(t + wait - timedelta(seconds=1))
        assert report.published == report.rejected == []
        t += wait
        assert outbox.dispatch_due(t).published == [lost.id]
        assert queued(outbox_settings) == 1 + attempt + 1  # done's, and lost's so far
        assert row(db, lost.id).status == "validating"

    # The last attempt's time runs out: rejected, with a reason the tenant can act on.
    assert row(db, lost.id).validation_attempts == MAX_ATTEMPTS
    assert outbox.dispatch_due(t + TIMEOUT * 4 - timedelta(seconds=1)).rejected == []
    report = outbox.dispatch_due(t + TIMEOUT * 4)
    assert report.rejected == [lost.id] and report.published == []
    rejected = row(db, lost.id)
    assert rejected.status == "rejected"
    assert rejected.reason is not None and f"after {MAX_ATTEMPTS} attempts" in rejected.reason
    assert "upload the adapter again" in rejected.reason
    assert row(db, done.id).status == "ready"

    later = outbox.dispatch_due(t + TIMEOUT * 100)
    assert later.published == later.rejected == []
    assert queued(outbox_settings) == 1 + MAX_ATTEMPTS


@both_registries
def test_the_dispatcher_publishes_at_start_what_a_crash_left_due(
    db: sessionmaker[Session], outbox_settings: Settings
) -> None:
    # Committed, then the process died before its message went out.
    pending = validating(db, "pending")
    assert row(db, pending.id).validation_attempts == 0
    app = create_app(outbox_settings, app_state=build_state(outbox_settings))
    with TestClient(app):
        deadline = time.monotonic() + WAIT_S
        while row(db, pending.id).validation_attempts == 0:
            assert time.monotonic() < deadline, "the dispatcher never published at start"
            time.sleep(0.05)
    assert queued(outbox_settings) == 1
    assert row(db, pending.id).validation_attempts == 1


@both_registries
def test_an_attempt_is_published_by_one_dispatcher_of_several(
    db: sessionmaker[Session], outbox_settings: Settings
) -> None:
    version = validating(db, "contended")
    now = datetime.now(UTC)
    sent: list[tuple[str, str]] = []
    other_reports = []

    def publish_a(version_id: str) -> None:
        sent.append(("a", version_id))
        # Another API process runs its pass while this one is publishing.
        other_reports.append(other.dispatch_due(now))

    first = ValidationOutbox(db, outbox_settings, publish_a)
    other = ValidationOutbox(db, outbox_settings, lambda v: sent.append(("b", v)))
    assert first.dispatch_due(now).published == [version.id]
    assert other_reports[0].published == [] and other_reports[0].failed is None
    assert other.dispatch_due(now).published == []
    assert sent == [("a", version.id)]
    assert row(db, version.id).validation_attempts == 1


@both_registries
def test_a_failed_publish_leaves_the_version_due_and_the_pass_stops(
    db: sessionmaker[Session], outbox_settings: Settings
) -> None:
    first, second = validating(db, "first"), validating(db, "second")
    now = datetime.now(UTC)

    def broker_down(version_id: str) -> None:
        raise ConnectionRefusedError("the broker is down")

    report = ValidationOutbox(db, outbox_settings, broker_down).dispatch_due(now)
    assert report.failed == first.id and report.published == []
    for version in (first, second):
        assert row(db, version.id).validation_attempts == 0  # still pending dispatch
    report = ValidationOutbox.from_settings(db, outbox_settings).dispatch_due(now)
    assert report.published == [first.id, second.id]
    assert queued(outbox_settings) == 2


@both_registries
def test_deleted_adapters_are_neither_published_nor_rejected(
    db: sessionmaker[Session], outbox: ValidationOutbox
) -> None:
    version = validating(db, "deleted")
    with transaction(db) as session:
        session.execute(
            update(Adapter)
            .where(Adapter.id == version.adapter_id)
            .values(deleted_at=datetime.now(UTC))
        )
    report = outbox.dispatch_due(datetime.now(UTC) + TIMEOUT * 100)
    assert report.published == report.rejected == []


@both_registries
def test_a_message_for_a_version_the_outbox_rejected_is_a_no_op(
    db: sessionmaker[Session],
    outbox: ValidationOutbox,
    outbox_settings: Settings,
    tiny_llama_dir: Path,
    tmp_path: Path,
) -> None:
    version = validating(db, "late")
    t = datetime.now(UTC)
    for attempt in range(MAX_ATTEMPTS):
        assert outbox.dispatch_due(t).published == [version.id]
        t += TIMEOUT * 2**attempt
    assert outbox.dispatch_due(t).rejected == [version.id]
    reason = row(db, version.id).reason
    # A copy of the message reaching a worker now (its files are not even there) changes
    # nothing.
    shape = base_model_shape(outbox_settings.model_copy(update={"model": str(tiny_llama_dir)}))
    storage = LocalStorage(tmp_path / "storage")
    assert validate_version(db, storage, shape, 64, version.id) == "rejected"
    assert row(db, version.id).reason == reason

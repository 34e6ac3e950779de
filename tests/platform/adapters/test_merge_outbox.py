"""The merge jobs' outbox (the same outbox as validations', adapters/outbox.py) on either
registry: a job published with backoff, then failed once its attempts are spent, holding
no storage and naming no blobs; a deleted adapter's job is still published (its task fails
it). Publishing is recorded here rather than sent; the dispatcher's clock is passed in."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from loramux.adapters.outbox import MergeOutbox
from loramux.db.models import Adapter, AdapterMerge
from loramux.db.session import transaction
from loramux.settings import Settings
from tests.fixtures.services import both_registries
from tests.platform.registry_rows import add_adapter_version, add_tenant

TIMEOUT = timedelta(seconds=90)
MAX_ATTEMPTS = 2


def queued_merge(db: sessionmaker[Session], name: str, **values: object) -> str:
    """A job as POST .../merge commits it: queued, its estimate reserved, never published."""
    with transaction(db) as session:
        tenant = add_tenant(session, f"tenant-{name}")
        version = add_adapter_version(session, tenant.id, name, name[0] * 64)
        merge = AdapterMerge(
            tenant_id=tenant.id, adapter_version_id=version.id, base_model_id="m",
            status="queued", size_bytes=1000, **values,
        )  # fmt: skip
        session.add(merge)
        session.flush()
        return merge.id


def merge_row(db: sessionmaker[Session], merge_id: str) -> AdapterMerge:
    with db() as session:
        merge = session.get(AdapterMerge, merge_id)
    assert merge is not None
    return merge


@both_registries
def test_a_lost_merge_is_published_again_then_failed_holding_nothing(
    db: sessionmaker[Session], registry_url: str, tmp_path: Path
) -> None:
    settings = Settings(
        home=tmp_path, database_url=registry_url, storage_url=(tmp_path / "s").as_uri(),
        merge_timeout_s=TIMEOUT.total_seconds(), merge_max_attempts=MAX_ATTEMPTS,
    )  # fmt: skip
    sent: list[str] = []
    outbox = MergeOutbox(db, settings, sent.append)
    lost = queued_merge(db, "lost")
    gone = queued_merge(db, "gone")
    with transaction(db) as session:  # a deleted adapter's job goes out: the task fails it
        session.execute(
            update(Adapter).where(Adapter.name == "gone").values(deleted_at=datetime.now(UTC))
        )
    t = datetime.now(UTC)
    assert sorted(outbox.dispatch_due(t).published) == sorted([lost, gone])
    with transaction(db) as session:  # the worker finished one; the other's message is lost
        session.execute(update(AdapterMerge).where(AdapterMerge.id == gone).values(status="failed"))
        # It had named its export before it was lost (merge_job.py).
        session.execute(update(AdapterMerge).where(AdapterMerge.id == lost).values(sha256="e" * 64))
    assert merge_row(db, lost).due_at == t + TIMEOUT
    assert outbox.dispatch_due(t + TIMEOUT - timedelta(seconds=1)).published == []
    t += TIMEOUT
    assert outbox.dispatch_due(t).published == [lost]
    assert (merge_row(db, lost).attempts, merge_row(db, lost).due_at) == (2, t + TIMEOUT * 2)
    assert outbox.dispatch_due(t + TIMEOUT * 2 - timedelta(seconds=1)).rejected == []

    report = outbox.dispatch_due(t + TIMEOUT * 2)
    assert report.rejected == [lost] and report.published == []
    failed = merge_row(db, lost)
    assert failed.status == "failed" and f"after {MAX_ATTEMPTS} attempts" in (failed.error or "")
    assert (failed.size_bytes, failed.sha256) == (0, None)
    assert failed.finished_at is not None
    assert sorted(sent) == sorted([lost, gone, lost])
    later = outbox.dispatch_due(t + TIMEOUT * 100)
    assert later.published == later.rejected == []

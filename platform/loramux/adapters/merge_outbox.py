"""The merge outbox: each merge job's message is due in its own row (as validations are,
adapters/outbox.py).

``POST .../merge`` commits the job ``queued`` with ``attempts`` 0 and no due time, which
says in the same transaction that its message is still to be sent; the request never waits
on the broker. The API process publishes what is due: at once in the background, then at
start and every ``merge_dispatch_interval_s``. Attempt n has ``merge_timeout_s * 2**(n-1)``
to finish; a job still queued or running after that had its message lost or its worker
killed, and is published again, up to ``merge_max_attempts`` times, then failed with a
reason. One dispatcher claims an attempt by moving its due time past now in one
conditional UPDATE; a message sent twice is harmless, the task being idempotent by job id
(merge_job.py).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import anyio
from sqlalchemy import ColumnElement, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from loramux.db.models import AdapterMerge
from loramux.db.session import transaction
from loramux.jobs.queue import job_queue
from loramux.settings import Settings

log = logging.getLogger(__name__)

MERGE_TASK = "loramux.merge_adapter_version"
PENDING = ("queued", "running")
CLAIM = timedelta(seconds=60)
MAX_PER_PASS = 100
Publish = Callable[[str], None]


def _due(now: datetime) -> ColumnElement[bool]:
    return AdapterMerge.status.in_(PENDING) & or_(
        AdapterMerge.due_at.is_(None), AdapterMerge.due_at <= now
    )


class MergeOutbox:
    def __init__(self, sessions: sessionmaker[Session], settings: Settings, publish: Publish):
        self.sessions = sessions
        self.settings = settings
        self.publish = publish
        self._stopping = threading.Event()

    @classmethod
    def from_settings(cls, sessions: sessionmaker[Session], settings: Settings) -> MergeOutbox:
        queue = job_queue(settings.resolved_broker_url, settings.broker_timeout_s)
        return cls(sessions, settings, lambda merge_id: queue.send(MERGE_TASK, merge_id))

    def attempt_timeout(self, attempt: int) -> timedelta:
        return timedelta(seconds=self.settings.merge_timeout_s * 2 ** (attempt - 1))

    def publish_soon(self, merge_id: str) -> None:
        """Publish a just-committed job in the background; the dispatcher retries on failure."""
        threading.Thread(
            target=self._publish_quietly, args=(merge_id,), daemon=True,
            name=f"loramux-merge-publish-{merge_id}",
        ).start()  # fmt: skip

    def _publish_quietly(self, merge_id: str) -> None:
        try:
            self.dispatch(merge_id, 0, datetime.now(UTC))
        except Exception:  # the registry away: the job stays due for the dispatcher
            log.warning("could not publish merge %s now", merge_id, exc_info=True)

    def dispatch(self, merge_id: str, attempts: int, now: datetime) -> str:
        """Publish attempt ``attempts + 1`` if still due and no other dispatcher's:
        "published", "skipped" or "failed" (left due at once for the next pass)."""
        with transaction(self.sessions) as session:
            claimed = session.execute(
                update(AdapterMerge)
                .where(AdapterMerge.id == merge_id, AdapterMerge.attempts == attempts, _due(now))
                .values(due_at=now + CLAIM)
                .execution_options(synchronize_session=False)
            )
        if getattr(claimed, "rowcount", 0) != 1:
            return "skipped"
        try:
            self.publish(merge_id)
        except Exception as error:
            log.warning("could not publish merge %s: %s", merge_id, error)
            self._record(merge_id, attempts, attempts, due_at=now)
            return "failed"
        attempt = attempts + 1
        self._record(merge_id, attempts, attempt, due_at=now + self.attempt_timeout(attempt))
        log.info("merge %s published (attempt %d)", merge_id, attempt)
        return "published"

    def _record(self, merge_id: str, claimed: int, attempts: int, *, due_at: datetime) -> None:
        with transaction(self.sessions) as session:
            session.execute(
                update(AdapterMerge)
                .where(AdapterMerge.id == merge_id, AdapterMerge.attempts == claimed)
                .values(attempts=attempts, due_at=due_at)
                .execution_options(synchronize_session=False)
            )

    def dispatch_due(self, now: datetime | None = None) -> list[str]:
        """Fail the jobs whose attempts are spent, then publish what is due, oldest first,
        until a publish fails; the ids published."""
        now = now or datetime.now(UTC)
        self.fail_spent(now)
        with self.sessions() as session:
            due = session.execute(
                select(AdapterMerge.id, AdapterMerge.attempts)
                .where(_due(now), AdapterMerge.attempts < self.settings.merge_max_attempts)
                .order_by(AdapterMerge.created_at)
                .limit(MAX_PER_PASS)
            ).all()
        published = []
        for merge_id, attempts in due:
            if self._stopping.is_set():
                break
            outcome = self.dispatch(merge_id, attempts, now)
            if outcome == "failed":
                break
            if outcome == "published":
                published.append(merge_id)
        return published

    def fail_spent(self, now: datetime) -> int:
        spent = _due(now) & (AdapterMerge.attempts >= self.settings.merge_max_attempts)
        reason = (
            f"the merge did not finish after {self.settings.merge_max_attempts} attempts; "
            "request it again, and tell the operator if this repeats"
        )
        with transaction(self.sessions) as session:
            done = session.execute(
                update(AdapterMerge)
                .where(spent)
                .values(status="failed", error=reason, size_bytes=0, sha256=None, finished_at=now)
                .execution_options(synchronize_session=False)
            )
        count = int(getattr(done, "rowcount", 0) or 0)
        if count:
            log.warning("merge attempts spent: %d jobs failed", count)
        return count

    async def dispatch_forever(self) -> None:
        while not self._stopping.is_set():
            try:
                await anyio.to_thread.run_sync(self.dispatch_due)
            except Exception:
                log.warning("merge outbox: dispatch failed; retrying", exc_info=True)
            await anyio.sleep(self.settings.merge_dispatch_interval_s)

    def stop(self) -> None:
        self._stopping.set()

"""The validation outbox: each version's validation message is due in its own row.

An upload commits its version ``validating`` with ``validation_attempts`` 0, which says, in
the same transaction, that its message is still to be sent: no version is left that
nothing will validate, and no request waits on the broker. The API process publishes what
is due: once in the background right after the commit, then at start and every
``adapter_validation_dispatch_interval_s`` (``dispatch_forever`` in the app's lifespan), so
a broker that was down, or a process killed in between, delays a validation and loses none.

Attempt n is given ``adapter_validation_timeout_s * 2**(n-1)`` to finish. A version still
validating after that had its message lost (a worker killed mid-task, a broker that
dropped its queue) or its worker is not there: it is published again, up to
``adapter_validation_max_attempts`` times, and then rejected with a reason.

Several processes may dispatch at once: one claims an attempt by moving the version's due
time past now, in one conditional UPDATE, so each attempt is published by one of them. A
message published but not recorded (a crash in between, a publish that timed out and
landed later) goes out twice; the task is idempotent by version id (validation_job.py).
"""

from __future__ import annotations

import contextvars
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Literal

import anyio
from sqlalchemy import ColumnElement, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from loramux.db.models import Adapter, AdapterVersion
from loramux.db.session import transaction
from loramux.jobs.queue import job_queue
from loramux.settings import Settings

log = logging.getLogger(__name__)

# How long a claim keeps other dispatchers off an attempt: far longer than a bounded
# publish. A dispatcher that dies holding one leaves the attempt due again after it.
CLAIM = timedelta(seconds=60)
# Versions looked at per pass; the rest wait for the next one.
MAX_PER_PASS = 100
Publish = Callable[[str], None]


@dataclass
class DispatchReport:
    published: list[str] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)
    # The version whose publish failed; the pass stopped there (the broker is away).
    failed: str | None = None


def _due(now: datetime) -> ColumnElement[bool]:
    return (AdapterVersion.status == "validating") & or_(
        AdapterVersion.validation_due_at.is_(None), AdapterVersion.validation_due_at <= now
    )


class ValidationOutbox:
    def __init__(self, sessions: sessionmaker[Session], settings: Settings, publish: Publish):
        self.sessions = sessions
        self.settings = settings
        self.publish = publish
        self._stopping = threading.Event()

    @classmethod
    def from_settings(cls, sessions: sessionmaker[Session], settings: Settings) -> ValidationOutbox:
        queue = job_queue(settings.resolved_broker_url, settings.broker_timeout_s)
        return cls(sessions, settings, queue.validate_adapter_version)

    def attempt_timeout(self, attempt: int) -> timedelta:
        """How long attempt ``attempt`` (1 for the first) has to finish."""
        return timedelta(seconds=self.settings.adapter_validation_timeout_s * 2 ** (attempt - 1))

    # -- one version ----------------------------------------------------------------------

    def publish_soon(self, version_id: str) -> None:
        """Publish a just-committed version's message in the background; the caller never
        waits for the broker, and the dispatcher retries if this fails."""
        # In the caller's context, so the validation task continues the upload's trace.
        threading.Thread(
            target=contextvars.copy_context().run, args=(self._publish_quietly, version_id),
            daemon=True,
            name=f"loramux-validation-publish-{version_id}",
        ).start()  # fmt: skip

    def _publish_quietly(self, version_id: str) -> None:
        try:
            self.dispatch(version_id, 0, datetime.now(UTC))
        except Exception:  # the registry away: the version stays due for the dispatcher
            log.warning("could not publish the validation of %s now", version_id, exc_info=True)

    def dispatch(
        self, version_id: str, attempts: int, now: datetime
    ) -> Literal["published", "skipped", "failed"]:
        """Publish attempt ``attempts + 1`` if it is still due and no other dispatcher's.

        A failed publish leaves the version due at once, for the next pass.
        """
        if not self._claim(version_id, attempts, now):
            return "skipped"  # finished meanwhile, or another dispatcher's
        try:
            self.publish(version_id)
        except Exception as error:
            log.warning("could not publish the validation of %s: %s", version_id, error)
            self._record(version_id, attempts, attempts, due_at=now)
            return "failed"
        attempt = attempts + 1
        self._record(version_id, attempts, attempt, due_at=now + self.attempt_timeout(attempt))
        log.info("validation of %s published (attempt %d)", version_id, attempt)
        return "published"

    def _claim(self, version_id: str, attempts: int, now: datetime) -> bool:
        with transaction(self.sessions) as session:
            claimed = session.execute(
                update(AdapterVersion)
                .where(
                    AdapterVersion.id == version_id,
                    AdapterVersion.validation_attempts == attempts,
                    _due(now),
                )
                .values(validation_due_at=now + CLAIM)
                .execution_options(synchronize_session=False)
            )
            return getattr(claimed, "rowcount", 0) == 1

    def _record(self, version_id: str, claimed: int, attempts: int, *, due_at: datetime) -> None:
        with transaction(self.sessions) as session:
            session.execute(
                update(AdapterVersion)
                .where(
                    AdapterVersion.id == version_id,
                    AdapterVersion.validation_attempts == claimed,
                )
                .values(validation_attempts=attempts, validation_due_at=due_at)
                .execution_options(synchronize_session=False)
            )

    # -- every version due -------------------------------------------------------------

    def dispatch_due(self, now: datetime | None = None) -> DispatchReport:
        """Reject the versions whose attempts are spent, then publish what is due, oldest
        first, until a publish fails."""
        now = now or datetime.now(UTC)
        report = DispatchReport(rejected=self.reject_spent(now))
        max_attempts = self.settings.adapter_validation_max_attempts
        with self.sessions() as session:
            due = session.execute(
                select(AdapterVersion.id, AdapterVersion.validation_attempts)
                .join(Adapter, Adapter.id == AdapterVersion.adapter_id)
                .where(_due(now), AdapterVersion.validation_attempts < max_attempts)
                .where(Adapter.deleted_at.is_(None))
                .order_by(AdapterVersion.created_at)
                .limit(MAX_PER_PASS)
            ).all()
        for version_id, attempts in due:
            if self._stopping.is_set():
                break
            outcome = self.dispatch(version_id, attempts, now)
            if outcome == "failed":
                report.failed = version_id
                break
            if outcome == "published":
                report.published.append(version_id)
        return report

    def reject_spent(self, now: datetime) -> list[str]:
        """Reject the live versions still validating after their last attempt's time."""
        max_attempts = self.settings.adapter_validation_max_attempts
        reason = (
            f"validation did not finish after {max_attempts} attempts; upload the adapter "
            "again, and tell the operator if this repeats"
        )
        spent = _due(now) & (AdapterVersion.validation_attempts >= max_attempts)
        with self.sessions() as session:
            candidates = session.scalars(
                select(AdapterVersion.id)
                .join(Adapter, Adapter.id == AdapterVersion.adapter_id)
                .where(spent, Adapter.deleted_at.is_(None))
                .limit(MAX_PER_PASS)
            ).all()
        rejected = []
        for version_id in candidates:
            # Each its own write, conditional again: the worker may finish it meanwhile.
            with transaction(self.sessions) as session:
                done = session.execute(
                    update(AdapterVersion)
                    .where(AdapterVersion.id == version_id, spent)
                    .values(status="rejected", reason=reason)
                    .execution_options(synchronize_session=False)
                )
            if getattr(done, "rowcount", 0) == 1:
                rejected.append(version_id)
        if rejected:
            log.warning("validation attempts spent, rejected: %s", rejected)
        return rejected

    # -- in the API process ------------------------------------------------------------

    async def dispatch_forever(self) -> None:
        """Dispatch now and every ``adapter_validation_dispatch_interval_s`` until stopped."""
        while not self._stopping.is_set():
            try:
                await anyio.to_thread.run_sync(self.dispatch_due)
            except Exception:  # the registry away (logged where classified), or a bug
                log.warning("validation outbox: dispatch failed; retrying", exc_info=True)
            await anyio.sleep(self.settings.adapter_validation_dispatch_interval_s)

    def stop(self) -> None:
        """End the pass under way after its current publish (itself bounded)."""
        self._stopping.set()

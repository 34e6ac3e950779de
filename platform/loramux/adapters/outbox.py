"""Transactional outboxes: each job's message is due in the job's own row.

Two jobs go out this way, each described by an ``OutboxKind``: an adapter version's
validation (``ValidationOutbox``: the ``adapter_versions`` row while ``validating``) and a
merge (``MergeOutbox``: the ``adapter_merges`` row while ``queued`` or ``running``).

The request commits its row pending with 0 attempts and no due time, which says, in the
same transaction, that its message is still to be sent: no job is left that nothing will
run, and no request waits on the broker. The API process publishes what is due: once in
the background right after the commit, then at start and every dispatch interval
(``dispatch_forever`` in the app's lifespan), so a broker that was down, or a process
killed in between, delays a job and loses none.

Attempt n is given the kind's timeout ``* 2**(n-1)`` to finish. A job still pending after
that had its message lost (a worker killed mid-task, a broker that dropped its queue) or
its worker is not there: it is published again, up to the kind's maximum of attempts, and
then written off with a reason (a version rejected, a merge failed).

Several processes may dispatch at once: one claims an attempt by moving the row's due
time past now, in one conditional UPDATE, so each attempt is published by one of them. A
message published but not recorded (a crash in between, a publish that timed out and
landed later) goes out twice; each task is idempotent by row id (validation_job.py,
merge_job.py).
"""

from __future__ import annotations

import contextvars
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar, Literal, Protocol, TypeVar

import anyio
from sqlalchemy import ColumnElement, Select, or_, select, update
from sqlalchemy.orm import InstrumentedAttribute, Session, sessionmaker

from loramux.db.models import Adapter, AdapterMerge, AdapterVersion, Base
from loramux.db.session import transaction
from loramux.jobs.queue import JobQueue, job_queue
from loramux.settings import Settings

log = logging.getLogger(__name__)

# How long a claim keeps other dispatchers off an attempt: far longer than a bounded
# publish. A dispatcher that dies holding one leaves the attempt due again after it.
CLAIM = timedelta(seconds=60)
# Jobs looked at per pass; the rest wait for the next one.
MAX_PER_PASS = 100
Publish = Callable[[str], None]
_Query = TypeVar("_Query", bound=Select)  # type: ignore[type-arg]


class Scope(Protocol):
    def __call__(self, query: _Query, /) -> _Query: ...


def _everything(query: _Query) -> _Query:
    return query


MERGE_TASK = "loramux.merge_adapter_version"
# A merge job's statuses while its row is its outbox.
MERGE_PENDING = ("queued", "running")


@dataclass
class DispatchReport:
    published: list[str] = field(default_factory=list)
    # Written off: their attempts spent (versions rejected, merges failed).
    rejected: list[str] = field(default_factory=list)
    # The job whose publish failed; the pass stopped there (the broker is away).
    failed: str | None = None


@dataclass(frozen=True)
class OutboxKind:
    """Where one kind of job keeps its outbox, and what its settings say."""

    name: str  # in logs and thread names
    model: type[Base]
    id: InstrumentedAttribute[str]
    pending: ColumnElement[bool]  # the row is still its job's outbox
    attempts: InstrumentedAttribute[int]
    due_at: InstrumentedAttribute[datetime | None]
    created_at: InstrumentedAttribute[datetime]
    timeout_s: Callable[[Settings], float]
    max_attempts: Callable[[Settings], int]
    interval_s: Callable[[Settings], float]
    # The values that write off a job whose attempts are spent, at ``now``.
    spent: Callable[[Settings, datetime], dict[str, Any]]
    publisher: Callable[[JobQueue], Publish]
    # Narrows a scan for due or spent jobs (the live adapters' versions only).
    scope: Scope = _everything

    def due(self, now: datetime) -> ColumnElement[bool]:
        return self.pending & or_(self.due_at.is_(None), self.due_at <= now)


class Outbox:
    kind: ClassVar[OutboxKind]

    def __init__(self, sessions: sessionmaker[Session], settings: Settings, publish: Publish):
        self.sessions = sessions
        self.settings = settings
        self.publish = publish
        self._stopping = threading.Event()

    @classmethod
    def from_settings(cls, sessions: sessionmaker[Session], settings: Settings) -> Outbox:
        queue = job_queue(settings.resolved_broker_url, settings.broker_timeout_s)
        return cls(sessions, settings, cls.kind.publisher(queue))

    def attempt_timeout(self, attempt: int) -> timedelta:
        """How long attempt ``attempt`` (1 for the first) has to finish."""
        return timedelta(seconds=self.kind.timeout_s(self.settings) * 2 ** (attempt - 1))

    # -- one job ----------------------------------------------------------------------------

    def publish_soon(self, job_id: str) -> None:
        """Publish a just-committed job's message in the background; the caller never
        waits for the broker, and the dispatcher retries if this fails."""
        # In the caller's context, so the task continues the request's trace.
        threading.Thread(
            target=contextvars.copy_context().run, args=(self._publish_quietly, job_id),
            daemon=True,
            name=f"loramux-{self.kind.name}-publish-{job_id}",
        ).start()  # fmt: skip

    def _publish_quietly(self, job_id: str) -> None:
        try:
            self.dispatch(job_id, 0, datetime.now(UTC))
        except Exception:  # the registry away: the job stays due for the dispatcher
            log.warning("could not publish the %s of %s now", self.kind.name, job_id, exc_info=True)

    def dispatch(
        self, job_id: str, attempts: int, now: datetime
    ) -> Literal["published", "skipped", "failed"]:
        """Publish attempt ``attempts + 1`` if it is still due and no other dispatcher's.

        A failed publish leaves the job due at once, for the next pass.
        """
        if not self._claim(job_id, attempts, now):
            return "skipped"  # finished meanwhile, or another dispatcher's
        try:
            self.publish(job_id)
        except Exception as error:
            log.warning("could not publish the %s of %s: %s", self.kind.name, job_id, error)
            self._record(job_id, attempts, attempts, due_at=now)
            return "failed"
        attempt = attempts + 1
        self._record(job_id, attempts, attempt, due_at=now + self.attempt_timeout(attempt))
        log.info("%s of %s published (attempt %d)", self.kind.name, job_id, attempt)
        return "published"

    def _claim(self, job_id: str, attempts: int, now: datetime) -> bool:
        kind = self.kind
        with transaction(self.sessions) as session:
            claimed = session.execute(
                update(kind.model)
                .where(kind.id == job_id, kind.attempts == attempts, kind.due(now))
                .values({kind.due_at: now + CLAIM})
                .execution_options(synchronize_session=False)
            )
            return getattr(claimed, "rowcount", 0) == 1

    def _record(self, job_id: str, claimed: int, attempts: int, *, due_at: datetime) -> None:
        kind = self.kind
        with transaction(self.sessions) as session:
            session.execute(
                update(kind.model)
                .where(kind.id == job_id, kind.attempts == claimed)
                .values({kind.attempts: attempts, kind.due_at: due_at})
                .execution_options(synchronize_session=False)
            )

    # -- every job due -------------------------------------------------------------------

    def dispatch_due(self, now: datetime | None = None) -> DispatchReport:
        """Write off the jobs whose attempts are spent, then publish what is due, oldest
        first, until a publish fails."""
        kind = self.kind
        now = now or datetime.now(UTC)
        report = DispatchReport(rejected=self.write_off_spent(now))
        max_attempts = kind.max_attempts(self.settings)
        with self.sessions() as session:
            due = session.execute(
                kind.scope(select(kind.id, kind.attempts))
                .where(kind.due(now), kind.attempts < max_attempts)
                .order_by(kind.created_at)
                .limit(MAX_PER_PASS)
            ).all()
        for job_id, attempts in due:
            if self._stopping.is_set():
                break
            outcome = self.dispatch(job_id, attempts, now)
            if outcome == "failed":
                report.failed = job_id
                break
            if outcome == "published":
                report.published.append(job_id)
        return report

    def write_off_spent(self, now: datetime) -> list[str]:
        """Write off the jobs still pending after their last attempt's time."""
        kind = self.kind
        spent = kind.due(now) & (kind.attempts >= kind.max_attempts(self.settings))
        with self.sessions() as session:
            candidates = session.scalars(
                kind.scope(select(kind.id)).where(spent).limit(MAX_PER_PASS)
            ).all()
        written_off = []
        for job_id in candidates:
            # Each its own write, conditional again: the worker may finish it meanwhile.
            with transaction(self.sessions) as session:
                done = session.execute(
                    update(kind.model)
                    .where(kind.id == job_id, spent)
                    .values(kind.spent(self.settings, now))
                    .execution_options(synchronize_session=False)
                )
            if getattr(done, "rowcount", 0) == 1:
                written_off.append(job_id)
        if written_off:
            log.warning("%s attempts spent, written off: %s", self.kind.name, written_off)
        return written_off

    # -- in the API process ------------------------------------------------------------

    async def dispatch_forever(self) -> None:
        """Dispatch now and every dispatch interval until stopped."""
        while not self._stopping.is_set():
            try:
                await anyio.to_thread.run_sync(self.dispatch_due)
            except Exception:  # the registry away (logged where classified), or a bug
                log.warning("%s outbox: dispatch failed; retrying", self.kind.name, exc_info=True)
            await anyio.sleep(self.kind.interval_s(self.settings))

    def stop(self) -> None:
        """End the pass under way after its current publish (itself bounded)."""
        self._stopping.set()


def _live_versions(query: _Query) -> _Query:
    return query.join(Adapter, Adapter.id == AdapterVersion.adapter_id).where(
        Adapter.deleted_at.is_(None)
    )


def _version_rejected(settings: Settings, now: datetime) -> dict[str, Any]:
    return {
        "status": "rejected",
        "reason": f"validation did not finish after {settings.adapter_validation_max_attempts} "
        "attempts; upload the adapter again, and tell the operator if this repeats",
    }


def _merge_failed(settings: Settings, now: datetime) -> dict[str, Any]:
    return {
        "status": "failed",
        "error": f"the merge did not finish after {settings.merge_max_attempts} attempts; "
        "request it again, and tell the operator if this repeats",
        # It holds no storage and names no blobs (merge_job.py deletes unnamed ones).
        "size_bytes": 0,
        "sha256": None,
        "finished_at": now,
    }


VALIDATION = OutboxKind(
    name="validation",
    model=AdapterVersion,
    id=AdapterVersion.id,
    pending=AdapterVersion.status == "validating",
    attempts=AdapterVersion.validation_attempts,
    due_at=AdapterVersion.validation_due_at,
    created_at=AdapterVersion.created_at,
    timeout_s=lambda settings: settings.adapter_validation_timeout_s,
    max_attempts=lambda settings: settings.adapter_validation_max_attempts,
    interval_s=lambda settings: settings.adapter_validation_dispatch_interval_s,
    spent=_version_rejected,
    publisher=lambda queue: queue.validate_adapter_version,
    # A deleted adapter's versions are neither published nor rejected.
    scope=_live_versions,
)

MERGE = OutboxKind(
    name="merge",
    model=AdapterMerge,
    id=AdapterMerge.id,
    pending=AdapterMerge.status.in_(MERGE_PENDING),
    attempts=AdapterMerge.attempts,
    due_at=AdapterMerge.due_at,
    created_at=AdapterMerge.created_at,
    timeout_s=lambda settings: settings.merge_timeout_s,
    max_attempts=lambda settings: settings.merge_max_attempts,
    interval_s=lambda settings: settings.merge_dispatch_interval_s,
    spent=_merge_failed,
    # A deleted adapter's merge is published still: the task fails it (merge_job.py).
    publisher=lambda queue: lambda merge_id: queue.send(MERGE_TASK, merge_id),
)


class ValidationOutbox(Outbox):
    """Validations: a version is ``validating`` until its task rules on it."""

    kind = VALIDATION


class MergeOutbox(Outbox):
    """Merges: a job is ``queued`` or ``running`` until its task finishes it."""

    kind = MERGE

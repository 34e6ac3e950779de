"""What the runner commits: each finished line with its usage and the progress counters,
in one transaction, and the lease that keeps two workers off one batch.

The unique (batch, line) row is what makes a line count once: a line staged twice (a
redelivered task racing its first run) fails on the constraint and rolls back its usage
and counters with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from loramux.batches.files import ACTIVE_STATUSES
from loramux.batches.standing import check_standing
from loramux.db.models import Batch, BatchLine
from loramux.db.session import transaction
from loramux.usage import record_usage


@dataclass(frozen=True, slots=True)
class LineResult:
    """A line's outcome: a response body (status 200) or an error, and what it used."""

    index: int
    custom_id: str
    status_code: int | None
    request_id: str | None
    body: dict[str, Any] | None
    error: dict[str, Any] | None
    usage: dict[str, Any] | None = None  # record_usage fields, when the engine ran it

    @property
    def ok(self) -> bool:
        return self.error is None


def billing_key(batch_id: str, custom_id: str) -> str:
    return f"batch:{batch_id}:{custom_id}"


def stage_line(sessions: sessionmaker[Session], batch: Batch, result: LineResult) -> bool:
    """Commit the line, its usage record and the counters together; False if already staged.

    A line that ran is billed only while the tenant and key are still in good standing;
    otherwise StandingRevoked, with nothing staged (the runner records the line as refused).
    """
    counter = Batch.completed if result.ok else Batch.failed
    try:
        with transaction(sessions) as session:
            # A write first: on SQLite it begins the transaction (pysqlite begins none for a
            # SAVEPOINT, whose release would then commit on its own) and takes the one write
            # lock, so there too no suspension can commit between the read below and ours.
            session.execute(
                update(Batch)
                .where(Batch.id == batch.id)
                .values({counter.key: counter + 1})
                .execution_options(synchronize_session=False)
            )
            if result.usage is not None:
                check_standing(session, batch.tenant_id, batch.api_key_id, lock=True)
            session.add(
                BatchLine(
                    batch_id=batch.id,
                    line_index=result.index,
                    custom_id=result.custom_id,
                    status_code=result.status_code,
                    request_id=result.request_id,
                    body=result.body,
                    error=result.error,
                )
            )
            session.flush()  # a line staged before fails its unique (batch, line) here
            if result.usage is not None:
                record_usage(
                    session,
                    tenant_id=batch.tenant_id,
                    api_key_id=batch.api_key_id,
                    billing_key=billing_key(batch.id, result.custom_id),
                    endpoint=batch.endpoint,
                    **result.usage,
                )
    except IntegrityError:  # the whole transaction rolled back, the counter with it
        return False
    return True


def staged_indices(session: Session, batch_id: str) -> set[int]:
    return set(session.scalars(select(BatchLine.line_index).where(BatchLine.batch_id == batch_id)))


def claim_lease(sessions: sessionmaker[Session], batch_id: str, owner: str, lease_s: float) -> bool:
    """Take (or renew) the batch's lease unless another live worker holds it."""
    now = datetime.now(UTC)
    with transaction(sessions) as session:
        claimed = session.execute(
            update(Batch)
            .where(Batch.id == batch_id, Batch.status.in_(ACTIVE_STATUSES))
            .where(
                or_(
                    Batch.lease_owner.is_(None),
                    Batch.lease_owner == owner,
                    Batch.lease_expires_at < now,
                )
            )
            .values(lease_owner=owner, lease_expires_at=now + timedelta(seconds=lease_s))
            .execution_options(synchronize_session=False)
        )
        return bool(claimed.rowcount)  # type: ignore[attr-defined]


def renew_lease(sessions: sessionmaker[Session], batch_id: str, owner: str, lease_s: float) -> bool:
    """Extend our lease; False if it was lost (we stalled past it and another took over)."""
    with transaction(sessions) as session:
        renewed = session.execute(
            update(Batch)
            .where(Batch.id == batch_id, Batch.lease_owner == owner)
            .values(lease_expires_at=datetime.now(UTC) + timedelta(seconds=lease_s))
            .execution_options(synchronize_session=False)
        )
        return bool(renewed.rowcount)  # type: ignore[attr-defined]


def release_lease(sessions: sessionmaker[Session], batch_id: str, owner: str) -> None:
    with transaction(sessions) as session:
        session.execute(
            update(Batch)
            .where(Batch.id == batch_id, Batch.lease_owner == owner)
            .values(lease_owner=None, lease_expires_at=None)
            .execution_options(synchronize_session=False)
        )


def move_status(
    session: Session, batch_id: str, from_statuses: tuple[str, ...], **values: Any
) -> bool:
    """A conditional status change, so a cancel and the worker never overwrite each other."""
    moved = session.execute(
        update(Batch)
        .where(Batch.id == batch_id, Batch.status.in_(from_statuses))
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    return bool(moved.rowcount)  # type: ignore[attr-defined]

"""Usage metering and the monthly token quota."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from loramux.db.models import UsageRecord


def month_start(now: datetime | None = None) -> datetime:
    now = now or datetime.now(UTC)
    return now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def tokens_this_month(session: Session, tenant_id: str) -> int:
    total = session.scalar(
        select(
            func.coalesce(func.sum(UsageRecord.prompt_tokens + UsageRecord.completion_tokens), 0)
        )
        .where(UsageRecord.tenant_id == tenant_id)
        .where(UsageRecord.created_at >= month_start())
    )
    return int(total or 0)


def record_usage(session: Session, **fields: Any) -> bool:
    """Insert one usage record; False if its ``billing_key`` was already billed."""
    try:
        with session.begin_nested():
            session.add(UsageRecord(**fields))
    except IntegrityError:
        key = fields.get("billing_key")
        # Only the billing key's own conflict means "already billed"; any other (a tenant
        # deleted meanwhile) is an error, not a silent drop of the bill.
        if (
            key is None
            or session.scalar(select(UsageRecord.id).where(UsageRecord.billing_key == key)) is None
        ):
            raise
        return False
    return True

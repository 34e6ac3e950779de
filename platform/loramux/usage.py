"""Usage metering and the monthly token quota."""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from loramux.db.models import Adapter, AdapterVersion, UsageRecord
from loramux.db.types import utc_date


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


def usage_by_day(session: Session, tenant_id: str, start: date, end: date) -> list[dict[str, Any]]:
    """The tenant's totals per UTC day and adapter (the base model as null), start <= day < end."""
    day = utc_date(UsageRecord.created_at)
    rows = session.execute(
        select(
            day.label("day"),
            Adapter.name,
            AdapterVersion.version,
            func.count(UsageRecord.id),
            func.sum(UsageRecord.prompt_tokens),
            func.sum(UsageRecord.completion_tokens),
        )
        .outerjoin(AdapterVersion, AdapterVersion.id == UsageRecord.adapter_version_id)
        .outerjoin(Adapter, Adapter.id == AdapterVersion.adapter_id)
        .where(UsageRecord.tenant_id == tenant_id)
        .where(UsageRecord.created_at >= datetime.combine(start, datetime.min.time(), UTC))
        .where(UsageRecord.created_at < datetime.combine(end, datetime.min.time(), UTC))
        .group_by(day, Adapter.name, AdapterVersion.version)
        # NULLs sort last on PostgreSQL and first on SQLite unless told: the base model first.
        .order_by(day, Adapter.name.nulls_first(), AdapterVersion.version)
    ).all()
    return [
        {
            "date": str(row[0]),
            "adapter": row[1],
            "adapter_version": row[2],
            "num_requests": int(row[3]),
            "prompt_tokens": int(row[4] or 0),
            "completion_tokens": int(row[5] or 0),
            "total_tokens": int((row[4] or 0) + (row[5] or 0)),
        }
        for row in rows
    ]

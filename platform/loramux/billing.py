"""Usage priced by the price table (pricing.py), storage (adapters and their merged
exports) by the GB-month, and the monthly statement a tenant is billed by.

Usage is summed in SQL per price period (the table may change mid-month), per UTC day,
tenant, adapter version and kind (interactive or batch), and priced exactly; cost is a
``Fraction`` of micro-dollars until a reported line rounds it to whole micro-dollars. A
statement's total is the sum of its rounded lines, so the CSV adds up as printed.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from fractions import Fraction
from typing import Any

from sqlalchemy import case, func, or_, select
from sqlalchemy.orm import Session

from loramux.adapters.registry import stored_holdings
from loramux.db.models import Adapter, AdapterVersion, Tenant, UsageRecord
from loramux.db.types import utc_date
from loramux.pricing import price_periods, round_micro, usd

GB = 10**9
BATCH_KEY_PREFIX = "batch:"  # batches/staging.py bills each line under batch:<id>:<custom_id>


@dataclass(slots=True)
class UsageLine:
    """Usage of one tenant on one UTC day through one adapter version (None: the base model)."""

    date: date
    tenant_id: str
    adapter: str | None
    adapter_version: int | None
    adapter_version_id: str | None
    base_model: str
    batch: bool
    num_requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: Fraction = field(default_factory=Fraction)  # micro-dollars, exact


def _decimal(value: Fraction, places: int) -> str:
    exact = Decimal(value.numerator) / Decimal(value.denominator)
    return str(exact.quantize(Decimal(1).scaleb(-places), rounding=ROUND_HALF_UP))


def day_start(day: date) -> datetime:
    return datetime.combine(day, datetime.min.time(), UTC)


def priced_usage(
    session: Session,
    start: datetime,
    end: datetime,
    *,
    base_model_id: str,
    tenant_id: str | None = None,
    adapter: str | None = None,
) -> list[UsageLine]:
    """Usage records in [start, end), summed and priced; ``base_model_id`` is what requests
    without an adapter ran on (the server's model)."""
    is_batch = case((UsageRecord.billing_key.like(f"{BATCH_KEY_PREFIX}%"), 1), else_=0)
    day = utc_date(UsageRecord.created_at)
    lines: dict[tuple[Any, ...], UsageLine] = {}
    for period in price_periods(session, start, end):
        query = (
            select(
                day,
                UsageRecord.tenant_id,
                Adapter.name,
                AdapterVersion.version,
                AdapterVersion.id,
                Adapter.base_model_id,
                is_batch,
                func.count(UsageRecord.id),
                func.coalesce(func.sum(UsageRecord.prompt_tokens), 0),
                func.coalesce(func.sum(UsageRecord.completion_tokens), 0),
            )
            .outerjoin(AdapterVersion, AdapterVersion.id == UsageRecord.adapter_version_id)
            .outerjoin(Adapter, Adapter.id == AdapterVersion.adapter_id)
            .where(UsageRecord.created_at >= period.start, UsageRecord.created_at < period.end)
            .group_by(
                day,
                UsageRecord.tenant_id,
                Adapter.name,
                AdapterVersion.version,
                AdapterVersion.id,
                Adapter.base_model_id,
                is_batch,
            )
        )
        if tenant_id is not None:
            query = query.where(UsageRecord.tenant_id == tenant_id)
        if adapter is not None:
            query = query.where(Adapter.name == adapter)
        for row in session.execute(query):
            when, tenant, name, version, version_id, model, batch, num, prompt, completion = row
            model = model or base_model_id
            key = (str(when), tenant, name, version, version_id, model, bool(batch))
            line = lines.get(key)
            if line is None:
                line = lines[key] = UsageLine(
                    date.fromisoformat(str(when)), tenant, name, version, version_id, model,
                    bool(batch),
                )  # fmt: skip
            line.num_requests += int(num)
            line.prompt_tokens += int(prompt)
            line.completion_tokens += int(completion)
            line.cost += period.prices.usage_cost(model, int(prompt), int(completion), line.batch)
    return sorted(
        lines.values(),
        key=lambda u: (u.date, u.tenant_id, u.adapter or "", u.adapter_version or 0, u.batch),
    )


def usage_rows(lines: Iterable[UsageLine], *, with_tenant: bool) -> list[dict[str, Any]]:
    """Per day and adapter version (and tenant), interactive and batch together; each row's
    cost rounded once from its exact sum."""
    rows: dict[tuple[Any, ...], dict[str, Any]] = {}
    exact: dict[tuple[Any, ...], Fraction] = {}
    for line in lines:
        key = (line.date, line.tenant_id if with_tenant else "", line.adapter_version_id)
        row = rows.get(key)
        if row is None:
            row = rows[key] = {
                "date": line.date.isoformat(),
                **({"tenant_id": line.tenant_id} if with_tenant else {}),
                "adapter": line.adapter,
                "adapter_version": line.adapter_version,
                "base_model": line.base_model,
                "num_requests": 0,
                "num_batch_requests": 0,
                "prompt_tokens": 0,
                "completion_tokens": 0,
                "total_tokens": 0,
            }
            exact[key] = Fraction()
        row["num_requests"] += line.num_requests
        row["num_batch_requests"] += line.num_requests if line.batch else 0
        row["prompt_tokens"] += line.prompt_tokens
        row["completion_tokens"] += line.completion_tokens
        row["total_tokens"] += line.prompt_tokens + line.completion_tokens
        exact[key] += line.cost
    for key, row in rows.items():
        micro = round_micro(exact[key])
        row["cost_micro_usd"] = micro
        row["cost_usd"] = usd(micro)
    # Days in order; within one, the base model first (no adapter), then adapters by name.
    return sorted(
        rows.values(),
        key=lambda r: (
            r["date"],
            r.get("tenant_id", ""),
            r["adapter"] is not None,
            r["adapter"] or "",
            r["adapter_version"] or 0,
        ),
    )


@dataclass(slots=True)
class StorageLine:
    """One adapter version's files, or its merged export, stored over a billing period."""

    tenant_id: str
    kind: str  # "adapter" or "merge" (registry.stored_holdings)
    adapter: str
    adapter_version: int
    base_model: str
    size_bytes: int
    seconds: int = 0
    gb_months: Fraction = field(default_factory=Fraction)
    cost: Fraction = field(default_factory=Fraction)  # micro-dollars, exact


def month_bounds(month: date) -> tuple[datetime, datetime]:
    start = day_start(month.replace(day=1))
    end = day_start((month.replace(day=28) + timedelta(days=4)).replace(day=1))
    return start, end


def priced_storage(
    session: Session, month: date, *, now: datetime, tenant_id: str | None = None
) -> list[StorageLine]:
    """Each stored thing's bytes for the part of ``month`` (up to ``now``) it was stored:
    what ``registry.stored_holdings`` counts for the quota (adapter versions, rejected ones
    excluded; merged exports, failed ones excluded), from when it was stored (the upload,
    the merge's finish: a running merge's reservation is not billed) to its adapter's
    deletion. A GB-month is 10^9 bytes for the whole calendar month."""
    start, end = month_bounds(month)
    month_seconds = int((end - start).total_seconds())
    stop = min(end, now)
    held = stored_holdings()
    query = (
        select(held)
        .where(held.c.stored_at.is_not(None), held.c.stored_at < stop)
        .where(or_(held.c.deleted_at.is_(None), held.c.deleted_at > start))
        .order_by(held.c.adapter, held.c.adapter_version, held.c.kind)
    )
    if tenant_id is not None:
        query = query.where(held.c.tenant_id == tenant_id)
    rows = session.execute(query).all()
    lines = []
    periods = price_periods(session, start, stop) if stop > start else []
    for row in rows:
        line = StorageLine(
            row.tenant_id, row.kind, row.adapter, row.adapter_version, row.base_model,
            row.size_bytes,
        )  # fmt: skip
        alive_from = max(row.stored_at, start)
        alive_to = min(row.deleted_at or stop, stop)
        for period in periods:
            lo, hi = max(alive_from, period.start), min(alive_to, period.end)
            if hi <= lo:
                continue
            seconds = Fraction((hi - lo) // timedelta(microseconds=1), 10**6)
            gb_months = Fraction(row.size_bytes, GB) * seconds / month_seconds
            line.seconds += int(seconds)
            line.gb_months += gb_months
            line.cost += gb_months * period.prices.storage_per_gb_month
        if line.gb_months:
            lines.append(line)
    return lines


@dataclass(slots=True)
class MonthTotals:
    num_requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    usage_cost: Fraction = field(default_factory=Fraction)
    storage_cost: Fraction = field(default_factory=Fraction)

    def view(self) -> dict[str, Any]:
        usage_micro, storage_micro = round_micro(self.usage_cost), round_micro(self.storage_cost)
        return {
            "num_requests": self.num_requests,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "usage_cost_usd": usd(usage_micro),
            "storage_cost_usd": usd(storage_micro),
            "cost_micro_usd": usage_micro + storage_micro,
            "cost_usd": usd(usage_micro + storage_micro),
        }


def month_totals(
    session: Session, month: date, *, now: datetime, base_model_id: str
) -> dict[str, MonthTotals]:
    """Every tenant's usage and storage in ``month`` up to ``now``, priced."""
    start, end = month_bounds(month)
    totals: dict[str, MonthTotals] = {}
    for line in priced_usage(session, start, min(end, now), base_model_id=base_model_id):
        total = totals.setdefault(line.tenant_id, MonthTotals())
        total.num_requests += line.num_requests
        total.prompt_tokens += line.prompt_tokens
        total.completion_tokens += line.completion_tokens
        total.usage_cost += line.cost
    for storage in priced_storage(session, month, now=now):
        totals.setdefault(storage.tenant_id, MonthTotals()).storage_cost += storage.cost
    return totals


# A statement's kind for each stored thing: an adapter's files, its merged export.
STORAGE_KINDS = {"adapter": "storage", "merge": "merge_storage"}
STATEMENT_COLUMNS = [
    "date",
    "kind",
    "adapter",
    "adapter_version",
    "base_model",
    "requests",
    "input_tokens",
    "output_tokens",
    "gb_months",
    "cost_usd",
]


def statement_csv(
    session: Session, tenant: Tenant, month: date, *, now: datetime, base_model_id: str
) -> str:
    """The tenant's bill for ``month`` (to ``now`` if it is the current one) as CSV: one line
    per day, adapter version and kind (interactive, batch), one per stored version
    (``storage``) and merged export (``merge_storage``), then the total, which is the sum
    of the lines as printed."""
    start, end = month_bounds(month)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(STATEMENT_COLUMNS)
    total = 0
    usage = priced_usage(
        session, start, min(end, now), base_model_id=base_model_id, tenant_id=tenant.id
    )
    for line in usage:
        micro = round_micro(line.cost)
        total += micro
        writer.writerow(
            [
                line.date.isoformat(),
                "batch" if line.batch else "interactive",
                line.adapter or "",
                line.adapter_version or "",
                line.base_model,
                line.num_requests,
                line.prompt_tokens,
                line.completion_tokens,
                "",
                usd(micro),
            ]
        )
    for storage in priced_storage(session, month, now=now, tenant_id=tenant.id):
        micro = round_micro(storage.cost)
        total += micro
        writer.writerow(
            [
                f"{month:%Y-%m}",
                STORAGE_KINDS[storage.kind],
                storage.adapter,
                storage.adapter_version,
                storage.base_model,
                "",
                "",
                "",
                _decimal(storage.gb_months, 9),
                usd(micro),
            ]
        )
    writer.writerow([f"{month:%Y-%m}", "total", "", "", "", "", "", "", "", usd(total)])
    return out.getvalue()

"""Query parameters the admin routes share: paging, date ranges, months, tenant filters."""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, timedelta

from starlette.requests import Request

from loramux.errors import InvalidRequest

MAX_RANGE_DAYS = 366
_MONTH = re.compile(r"^(\d{4})-(\d{2})$")


def limit_param(request: Request, default: int = 100, maximum: int = 1000) -> int:
    value = request.query_params.get("limit")
    if value is None:
        return default
    if not value.isdigit() or not 1 <= int(value) <= maximum:
        raise InvalidRequest(f"limit must be an integer between 1 and {maximum}", param="limit")
    return int(value)


def _date(request: Request, name: str, default: date) -> date:
    value = request.query_params.get(name)
    if value is None:
        return default
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise InvalidRequest(f"{name} must be a date like 2026-01-31", param=name) from None


def date_range(request: Request) -> tuple[date, date]:
    """``start_date`` and ``end_date`` (inclusive, UTC days; default: this month to today),
    as [start, end) with end the day after ``end_date``."""
    today = datetime.now(UTC).date()
    start = _date(request, "start_date", today.replace(day=1))
    end = _date(request, "end_date", today) + timedelta(days=1)
    if end <= start:
        raise InvalidRequest("end_date must not be before start_date", param="end_date")
    if (end - start).days > MAX_RANGE_DAYS:
        raise InvalidRequest(
            f"a date range spans at most {MAX_RANGE_DAYS} days", param="start_date"
        )
    return start, end


def month_param(request: Request) -> date:
    """``month=YYYY-MM`` (default: the current UTC month) as its first day."""
    value = request.query_params.get("month")
    if value is None:
        return datetime.now(UTC).date().replace(day=1)
    match = _MONTH.match(value)
    if match is None or not 1 <= int(match.group(2)) <= 12 or int(match.group(1)) < 1970:
        raise InvalidRequest("month must look like 2026-01", param="month")
    return date(int(match.group(1)), int(match.group(2)), 1)


def text_param(request: Request, name: str, maximum: int = 128) -> str | None:
    value = request.query_params.get(name)
    if value is not None and not 1 <= len(value) <= maximum:
        raise InvalidRequest(f"{name} must have 1 to {maximum} characters", param=name)
    return value

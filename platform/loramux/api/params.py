"""Query parameters routes share: paging, date ranges, months, tenant filters; and the one
parser of decimal integers from a request (ASCII digits only, bounded length)."""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, timedelta

from starlette.requests import Request

from loramux.errors import InvalidRequest

MAX_RANGE_DAYS = 366
# years a date may name: a day after the last one must still be a date
MIN_YEAR, MAX_YEAR = 1970, 9998
_MONTH = re.compile(r"^([0-9]{4})-([0-9]{2})$")
_INTEGER = re.compile(r"[0-9]{1,18}")


def ascii_int(text: str) -> int | None:
    """``text`` as a non-negative integer if it is 1 to 18 ASCII digits, else None.

    ``str.isdigit`` is not enough: it accepts "²" (which ``int`` refuses) and other
    scripts' digits, and ``int`` of thousands of digits is slow or refused."""
    return int(text) if _INTEGER.fullmatch(text) else None


def parse_limit(value: str | None, default: int, maximum: int) -> int:
    """A ``limit`` query value: ``default`` when absent, else an integer in [1, maximum]."""
    if value is None:
        return default
    number = ascii_int(value)
    if number is None or not 1 <= number <= maximum:
        raise InvalidRequest(f"limit must be an integer between 1 and {maximum}", param="limit")
    return number


def limit_param(request: Request, default: int = 100, maximum: int = 1000) -> int:
    return parse_limit(request.query_params.get("limit"), default, maximum)


def _date(request: Request, name: str, default: date) -> date:
    value = request.query_params.get(name)
    if value is None:
        return default
    try:
        day = date.fromisoformat(value)
    except ValueError:
        raise InvalidRequest(f"{name} must be a date like 2026-01-31", param=name) from None
    if not MIN_YEAR <= day.year <= MAX_YEAR:
        raise InvalidRequest(f"{name} must be in {MIN_YEAR} to {MAX_YEAR}", param=name)
    return day


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
    if (
        match is None
        or not 1 <= int(match.group(2)) <= 12
        or not MIN_YEAR <= int(match.group(1)) <= MAX_YEAR
    ):
        raise InvalidRequest("month must look like 2026-01", param="month")
    return date(int(match.group(1)), int(match.group(2)), 1)


def text_param(request: Request, name: str, maximum: int = 128) -> str | None:
    value = request.query_params.get(name)
    if value is not None and not 1 <= len(value) <= maximum:
        raise InvalidRequest(f"{name} must have 1 to {maximum} characters", param=name)
    return value

"""OpenAI list pagination: newest first, ``after`` names the last object already seen."""

from __future__ import annotations

from typing import Any, TypeVar

from sqlalchemy import Select, and_, or_
from sqlalchemy.orm import Session

from loramux.api import params
from loramux.db.models import Batch, File
from loramux.errors import InvalidRequest

Listed = TypeVar("Listed", Batch, File)
MAX_LIMIT = 100


def parse_limit(value: str | None, default: int = 20) -> int:
    return params.parse_limit(value, default, MAX_LIMIT)


def page(
    session: Session, query: Select[Any], model: type[Listed], after: str | None, limit: int
) -> tuple[list[Listed], bool]:
    """Up to ``limit`` rows of ``query`` after the row ``after``, and whether more follow."""
    if after is not None:
        anchor = session.scalars(query.where(model.id == after)).first()
        if anchor is None:
            raise InvalidRequest(f"after names no object in this list: {after!r}", param="after")
        query = query.where(
            or_(
                model.created_at < anchor.created_at,
                and_(model.created_at == anchor.created_at, model.id < anchor.id),
            )
        )
    rows = list(
        session.scalars(query.order_by(model.created_at.desc(), model.id.desc()).limit(limit + 1))
    )
    return rows[:limit], len(rows) > limit


def list_body(data: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": has_more,
    }

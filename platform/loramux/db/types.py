"""Column types and SQL functions that behave the same on PostgreSQL and SQLite.

PostgreSQL's ``timestamptz`` keeps the instant and hands back aware datetimes; SQLite
stores text without a zone and hands back naive ones, which then raise ``TypeError``
when compared with ``datetime.now(UTC)``. ``UTCDateTime`` writes every value as UTC and
reads every value back aware in UTC, so the code above the registry sees one kind of
datetime on both. The schema is unchanged: it is ``DateTime(timezone=True)`` in DDL.

SQLite compares timestamps as text, so every value must be written in one form:
``YYYY-MM-DD HH:MM:SS.ffffff``, as SQLAlchemy binds it. ``CURRENT_TIMESTAMP`` (what
``func.now()`` becomes there) drops the fraction, and a row stamped by it then sorts
before a bound value of the same instant. ``utc_now`` stamps rows in the bound form.
"""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Any, Literal

from sqlalchemy import Date, DateTime
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import FunctionElement
from sqlalchemy.types import TypeDecorator

# SQLite's strftime for the text form SQLAlchemy writes a datetime in (see above).
SQLITE_TIMESTAMP_FORMAT = "%Y-%m-%d %H:%M:%f000"


class UTCDateTime(TypeDecorator[datetime]):
    """``DateTime(timezone=True)`` that always round-trips as an aware UTC datetime."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        # A naive value is taken as UTC, the registry's zone, rather than the server's.
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        # SQLite writes the wall-clock digits and drops the offset: convert first.
        return value.astimezone(UTC)

    def process_result_value(self, value: Any | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:  # SQLite: the text was written in UTC
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class utc_now(FunctionElement[datetime]):  # lower case: an SQL function, like func.*
    """The database's current time, in the form ``UTCDateTime`` binds on every backend."""

    type = UTCDateTime()
    name = "utc_now"
    inherit_cache = True


@compiles(utc_now)
def _utc_now_default(element: utc_now, compiler: SQLCompiler, **kw: Any) -> str:
    return "CURRENT_TIMESTAMP"


@compiles(utc_now, "sqlite")
def _utc_now_sqlite(element: utc_now, compiler: SQLCompiler, **kw: Any) -> str:
    # %f is SS.SSS (milliseconds): three zeros make the six digits of a bound value.
    return f"strftime('{SQLITE_TIMESTAMP_FORMAT}', 'now')"


class utc_date(FunctionElement[date]):  # lower case: an SQL function, like func.*
    """The UTC calendar day of a ``UTCDateTime`` column: a GROUP BY bucket on both backends.

    ``CAST(x AS DATE)`` is not portable: SQLite casts the text ``2026-01-31 ...`` by
    numeric affinity to the integer 2026, and PostgreSQL casts in the session's time zone.
    """

    type = Date()
    name = "utc_date"
    inherit_cache = True


@compiles(utc_date, "postgresql")
def _utc_date_postgresql(element: utc_date, compiler: SQLCompiler, **kw: Any) -> str:
    return f"CAST(timezone('UTC', {compiler.process(element.clauses, **kw)}) AS DATE)"


@compiles(utc_date, "sqlite")
def _utc_date_sqlite(element: utc_date, compiler: SQLCompiler, **kw: Any) -> str:
    # The stored text is UTC; date() keeps its YYYY-MM-DD, which Date parses back.
    return f"date({compiler.process(element.clauses, **kw)})"


def render_item(type_: str, obj: Any, autogen_context: Any) -> str | Literal[False]:
    """Alembic's ``render_item`` hook: revisions spell ``UTCDateTime`` as plain SQLAlchemy,
    so a migration never imports the application (the DDL type is the same)."""
    if type_ == "type" and isinstance(obj, UTCDateTime):
        return "sa.DateTime(timezone=True)"
    return False

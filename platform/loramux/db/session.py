"""Engines and sessions. Each process (API, Celery worker) makes its own.

Every call to the registry is bounded, so a registry that is down or hangs costs a
request seconds, never minutes:

- connecting: libpq's ``connect_timeout`` (the whole handshake, a frozen server included)
  and the pool's ``pool_timeout`` when every connection is busy;
- a statement: the server's ``statement_timeout``, and on our side a deadline on every
  wait for the server's answer a little past it. A server that accepted the connection
  and went silent (stopped, wedged, a black-holed link whose peer still acknowledges
  bytes) never sends the cancellation, and TCP keepalives or ``tcp_user_timeout`` do not
  fire while the peer's kernel answers: only a client-side deadline ends that wait;
- SQLite: its busy timeout, for a file another process holds locked.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

if TYPE_CHECKING:
    from loramux.settings import Settings

# How far past the server's statement_timeout we stop waiting for its answer ourselves:
# enough for the server's own cancellation (a clean error) to arrive first.
CLIENT_WAIT_MARGIN_S = 1.0


def make_engine(
    url: str,
    *,
    connect_timeout_s: float | None = None,
    statement_timeout_s: float | None = None,
    **kwargs: Any,
) -> Engine:
    """An engine for ``url``; ``statement_timeout_s`` None leaves statements unbounded.

    Request-serving processes pass a statement timeout (``engine_from_settings``);
    migrations and one-off commands do not, since a long migration is legitimate.
    ``connect_timeout_s`` defaults to the ``LORAMUX_DB_CONNECT_TIMEOUT_S`` setting.
    """
    if connect_timeout_s is None:
        from loramux.settings import get_settings

        connect_timeout_s = get_settings().db_connect_timeout_s
    connect_args: dict[str, Any] = dict(kwargs.pop("connect_args", {}))
    # A statement's parameters stay out of its errors' text, which reaches logs: they hold
    # tenants' data (a staged batch line's completion).
    kwargs.setdefault("hide_parameters", True)
    if url.startswith("sqlite"):
        busy_ms = int(1000 * (statement_timeout_s or connect_timeout_s))
        connect_args.setdefault("check_same_thread", False)
        connect_args.setdefault("timeout", busy_ms / 1000)
        engine = create_engine(url, connect_args=connect_args, **kwargs)
        event.listen(engine, "connect", _sqlite_pragmas(busy_ms))
        return engine
    # libpq takes whole seconds (and at least 2).
    connect_args.setdefault("connect_timeout", max(2, math.ceil(connect_timeout_s)))
    if statement_timeout_s is not None:
        statement_ms = max(1, int(statement_timeout_s * 1000))
        options = connect_args.get("options", "")
        connect_args["options"] = f"{options} -c statement_timeout={statement_ms}".strip()
    kwargs.setdefault("pool_timeout", connect_timeout_s)
    engine = create_engine(url, pool_pre_ping=True, connect_args=connect_args, **kwargs)
    if statement_timeout_s is not None and engine.dialect.driver == "psycopg":
        event.listen(
            engine, "do_connect", _bounded_psycopg(statement_timeout_s + CLIENT_WAIT_MARGIN_S)
        )
    return engine


def engine_from_settings(settings: Settings) -> Engine:
    """The registry engine of a process that serves requests: every call bounded."""
    return make_engine(
        settings.resolved_database_url,
        connect_timeout_s=settings.db_connect_timeout_s,
        statement_timeout_s=settings.db_statement_timeout_s,
    )


def _sqlite_pragmas(busy_ms: int) -> Any:
    def set_pragmas(dbapi_connection: Any, _record: Any) -> None:
        # WAL lets the API read while a worker writes; foreign keys are off by default.
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={busy_ms}")
        cursor.close()

    return set_pragmas


def _bounded_psycopg(wait_s: float) -> Any:
    """A ``do_connect`` hook making psycopg connections that wait at most ``wait_s``."""
    import psycopg

    class BoundedConnection(psycopg.Connection[Any]):
        def wait(self, gen: Any, interval: float = 0.1, timeout: float | None = None) -> Any:
            try:
                return super().wait(gen, interval, wait_s if timeout is None else timeout)
            except psycopg.errors._WaitTimeout:
                # No answer: the connection's state is unknown. Closing it makes SQLAlchemy
                # see a disconnect and drop it from the pool instead of reusing it.
                self.pgconn.finish()
                raise psycopg.OperationalError(
                    f"the database did not answer within {wait_s:g} s"
                ) from None

    def connect(_dialect: Any, _record: Any, cargs: Any, cparams: Any) -> Any:
        return BoundedConnection.connect(*cargs, **cparams)

    return connect


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def transaction(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A session whose work commits on success and rolls back on any error."""
    with factory() as session, session.begin():
        yield session

"""Fault injection: the real PostgreSQL and moto's S3 server, each behind a proxy the test
refuses or freezes, and an app whose dependency timeouts are short.

Every call that may hang runs through ``within``: a hang fails the test after
``ANSWER_BOUND_S`` instead of hanging the run. The bound is far above the configured
timeouts (a couple of seconds each); it tells "answered" from "hung", nothing finer.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import psycopg
import pytest
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from loramux.settings import Settings
from tests.fixtures.fault_proxy import FaultProxy
from tests.fixtures.services import PG_ADMIN_DSN
from tests.platform.conftest import ADMIN_KEY

T = TypeVar("T")
ANSWER_BOUND_S = 30.0
# Short timeouts, so each outage costs the test seconds.
FAST_TIMEOUTS: dict[str, Any] = {
    "db_connect_timeout_s": 2.0,
    "db_statement_timeout_s": 1.0,
    "s3_connect_timeout_s": 1.0,
    "s3_read_timeout_s": 1.0,
    "s3_max_attempts": 3,
    "s3_deadline_s": 2.0,
    "readyz_timeout_s": 2.0,
}


def within(call: Callable[[], T], bound_s: float = ANSWER_BOUND_S) -> T:
    """``call()``'s result, or a test failure if it has not returned after ``bound_s``.

    A daemon thread, so a call that never returns does not keep the run from ending.
    """
    result: list[Any] = []

    def run() -> None:
        try:
            result.append(("ok", call()))
        except BaseException as error:  # re-raised in the test's thread
            result.append(("error", error))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(bound_s)
    if not result:
        pytest.fail(f"no answer within {bound_s:g} s: the call hangs", pytrace=False)
    kind, value = result[0]
    if kind == "error":
        raise value
    return value  # type: ignore[no-any-return]


def assert_unavailable(response: Any, *secrets: str) -> dict[str, Any]:
    """A 503 in OpenAI's shape, with Retry-After, naming none of ``secrets``."""
    assert response.status_code == 503, response.text
    assert int(response.headers["retry-after"]) > 0
    error: dict[str, Any] = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "server_error" and error["message"]
    for secret in secrets:
        assert secret not in response.text, f"{secret!r} leaked to the client: {response.text}"
    return error


@pytest.fixture
def pg_proxy() -> Iterator[FaultProxy]:
    """A proxy in front of the test PostgreSQL server."""
    info = psycopg.conninfo.conninfo_to_dict(PG_ADMIN_DSN)
    host, port = str(info.get("host", "127.0.0.1")), int(info.get("port", 5432) or 5432)
    with FaultProxy((host, port)) as proxy:
        yield proxy


@pytest.fixture
def s3_proxy(s3_endpoint: str) -> Iterator[FaultProxy]:
    """A proxy in front of moto's S3 server."""
    parts = urlsplit(s3_endpoint)
    with FaultProxy((parts.hostname or "127.0.0.1", parts.port or 80)) as proxy:
        yield proxy


def proxied_url(database_url: str, proxy: FaultProxy) -> str:
    url = make_url(database_url).set(host=proxy.host, port=proxy.port)
    return url.render_as_string(hide_password=False)


@pytest.fixture
def settings(
    registry_url: str, db: sessionmaker[Session], tmp_path: Path, pg_proxy: FaultProxy
) -> Settings:
    """The registry (PostgreSQL) reached through ``pg_proxy``; local storage. The
    ``client`` and ``make_tenant`` fixtures of tests/platform build on it."""
    return Settings(
        home=tmp_path / "home",
        database_url=proxied_url(registry_url, pg_proxy),
        storage_url=(tmp_path / "storage").as_uri(),
        admin_key=ADMIN_KEY,
        **FAST_TIMEOUTS,
    )

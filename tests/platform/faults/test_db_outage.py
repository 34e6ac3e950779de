"""The registry down, hung or stuck: a 503 with Retry-After on every route (auth included),
within seconds, naming nothing internal; and service again once it is back, no restart."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker
from starlette.testclient import TestClient

from loramux.app import build_state, create_app
from loramux.db.migrate import upgrade
from loramux.settings import Settings
from tests.fixtures.fault_proxy import FaultProxy
from tests.platform.adapters.helpers import bearer
from tests.platform.conftest import ADMIN_KEY, admin_headers
from tests.platform.faults.conftest import FAST_TIMEOUTS, assert_unavailable, within


def routes(key: str) -> list[tuple[str, dict[str, str]]]:
    return [
        ("/v1/models", bearer(key)),  # the key lookup in the auth backend
        ("/v1/adapters", bearer(key)),
        ("/admin/api/tenants", admin_headers()),  # no lookup for the bootstrap key: the route's
    ]


@pytest.mark.parametrize("outage", ["refuse", "freeze"])
def test_registry_outage_is_a_503_on_every_route_and_recovers(
    client: TestClient,
    make_tenant: Callable[..., tuple[dict[str, Any], str]],
    pg_proxy: FaultProxy,
    registry_url: str,
    outage: str,
) -> None:
    _, key = make_tenant("acme")
    internal = ["127.0.0.1", str(pg_proxy.port), str(make_url(registry_url).database)]
    getattr(pg_proxy, outage)()

    for path, headers in routes(key):
        response = within(lambda: client.get(path, headers=headers))  # noqa: B023
        error = assert_unavailable(response, *internal)
        assert error["code"] == "service_unavailable"
    ready = within(lambda: client.get("/readyz"))
    assert ready.status_code == 503
    assert ready.json()["checks"]["registry"].startswith("error")
    assert ready.json()["checks"]["storage"] == "ok"

    pg_proxy.resume()
    for path, headers in routes(key):
        assert within(lambda: client.get(path, headers=headers)).status_code == 200  # noqa: B023
    assert within(lambda: client.get("/readyz")).status_code == 200


def test_a_statement_stuck_behind_a_lock_is_cancelled_into_a_503(
    client: TestClient,
    make_tenant: Callable[..., tuple[dict[str, Any], str]],
    db: sessionmaker[Session],
) -> None:
    _, key = make_tenant("acme")
    with db() as locker:
        # Another session holds the key table: the auth lookup waits on the lock until the
        # statement timeout cancels it.
        locker.execute(text("LOCK TABLE api_keys IN ACCESS EXCLUSIVE MODE"))
        response = within(lambda: client.get("/v1/models", headers=bearer(key)))
        assert_unavailable(response)
        locker.rollback()
    assert within(lambda: client.get("/v1/models", headers=bearer(key))).status_code == 200


def test_a_locked_sqlite_registry_is_a_503_not_a_500(tmp_path: Path) -> None:
    path = tmp_path / "registry.db"
    settings = Settings(
        home=tmp_path / "home",
        database_url=f"sqlite:///{path}",
        storage_url=(tmp_path / "storage").as_uri(),
        admin_key=ADMIN_KEY,
        **FAST_TIMEOUTS,
    )
    upgrade(settings.resolved_database_url)
    with TestClient(create_app(settings, app_state=build_state(settings))) as client:
        tenant = client.post("/admin/api/tenants", json={"name": "acme"}, headers=admin_headers())
        key = client.post(
            f"/admin/api/tenants/{tenant.json()['id']}/keys",
            json={"name": "k"},
            headers=admin_headers(),
        ).json()["key"]
        locker = sqlite3.connect(path, isolation_level=None)
        try:
            # A writer that holds the file: the key's first use records last_used_at, a write.
            locker.execute("BEGIN EXCLUSIVE")
            response = within(lambda: client.get("/v1/models", headers=bearer(key)))
            assert_unavailable(response, str(path))
            locker.execute("ROLLBACK")
        finally:
            locker.close()
        assert within(lambda: client.get("/v1/models", headers=bearer(key))).status_code == 200

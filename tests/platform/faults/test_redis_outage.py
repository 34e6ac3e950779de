"""Redis (the shared rate limiter) down or hung: a limited tenant gets a 503 with Retry-After
within about the client timeouts, or is admitted without limits where the operator chose to
fail open; a tenant with no limits never touches Redis; /readyz reports it; and service
returns by itself when Redis does."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from pydantic import SecretStr
from sqlalchemy.orm import Session, sessionmaker
from starlette.testclient import TestClient

from loramux.app import build_state, create_app
from loramux.engine_client import InProcessEngineClient
from loramux.settings import Settings
from tests.fixtures.fault_proxy import FaultProxy
from tests.platform.adapters.helpers import bearer
from tests.platform.conftest import ADMIN_KEY
from tests.platform.faults.conftest import FAST_TIMEOUTS, assert_unavailable, within
from tests.platform.inference.conftest import engine  # noqa: F401  (the tiny engine fixture)

Tenant = Callable[..., tuple[dict[str, Any], str]]


@pytest.fixture
def redis_proxy(redis_url: str) -> Iterator[FaultProxy]:
    parts = urlsplit(redis_url)
    with FaultProxy((parts.hostname or "127.0.0.1", parts.port or 6379)) as proxy:
        yield proxy


def redis_settings(
    tmp_path: Path, pg_database: str, tiny_llama_dir: Path, proxy: FaultProxy, **extra: Any
) -> Settings:
    return Settings(
        home=tmp_path / "home",
        database_url=pg_database,
        storage_url=(tmp_path / "storage").as_uri(),
        admin_key=SecretStr(ADMIN_KEY),
        model=str(tiny_llama_dir),
        redis_url=f"redis://{proxy.host}:{proxy.port}/0",
        **FAST_TIMEOUTS,
        **extra,
    )


@pytest.fixture
def settings(
    pg_database: str,
    db: sessionmaker[Session],
    tmp_path: Path,
    tiny_llama_dir: Path,
    redis_proxy: FaultProxy,
    request: pytest.FixtureRequest,
) -> Settings:
    fail_open = bool(getattr(request, "param", False))
    return redis_settings(
        tmp_path, pg_database, tiny_llama_dir, redis_proxy, rate_limit_fail_open=fail_open
    )


@pytest.fixture
def client(settings: Settings, engine: InProcessEngineClient) -> Iterator[TestClient]:  # noqa: F811
    with TestClient(create_app(settings, app_state=build_state(settings, engine=engine))) as c:
        yield c


def complete(client: TestClient, key: str) -> Any:
    model = client.get("/v1/models", headers=bearer(key)).json()["data"][0]["id"]
    body = {"model": model, "prompt": "hello", "max_tokens": 2}
    return within(lambda: client.post("/v1/completions", headers=bearer(key), json=body))


@pytest.mark.parametrize("outage", ["refuse", "freeze"])
def test_redis_outage_refuses_limited_tenants_only_and_recovers(
    client: TestClient, make_tenant: Tenant, redis_proxy: FaultProxy, redis_url: str, outage: str
) -> None:
    _, free = make_tenant("free")
    _, limited = make_tenant("limited", requests_per_minute=1000)
    assert complete(client, limited).status_code == 200
    internal = ["127.0.0.1", str(redis_proxy.port), str(urlsplit(redis_url).port), "redis"]
    getattr(redis_proxy, outage)()

    # No limits: no Redis call at all, so a hung Redis cannot hold it up.
    assert complete(client, free).status_code == 200, "an unlimited tenant waited on Redis"
    error = assert_unavailable(complete(client, limited), *internal)
    assert error["code"] == "service_unavailable"
    ready = within(lambda: client.get("/readyz"))
    assert ready.status_code == 503
    assert ready.json()["checks"]["redis"].startswith("error")
    assert ready.json()["checks"]["registry"] == "ok"

    redis_proxy.resume()
    assert complete(client, limited).status_code == 200
    assert complete(client, free).status_code == 200
    ready = within(lambda: client.get("/readyz"))
    assert ready.status_code == 200 and ready.json()["checks"]["redis"] == "ok"


@pytest.mark.parametrize("settings", [True], indirect=True, ids=["fail_open"])
def test_fail_open_admits_limited_tenants_while_redis_is_down(
    client: TestClient, make_tenant: Tenant, redis_proxy: FaultProxy
) -> None:
    _, limited = make_tenant("limited", requests_per_minute=1)
    assert complete(client, limited).status_code == 200
    redis_proxy.refuse()
    # Over its limit of 1 a minute, but the limiter is away and the operator chose service.
    assert complete(client, limited).status_code == 200
    assert complete(client, limited).status_code == 200
    ready = within(lambda: client.get("/readyz"))
    assert ready.status_code == 200 and ready.json()["checks"]["redis"].startswith("error")
    redis_proxy.resume()
    assert complete(client, limited).status_code == 429  # limits apply again

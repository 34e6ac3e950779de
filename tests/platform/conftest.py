"""An app on the registry under test (PostgreSQL, or SQLite too where a test asks for both),
with an admin key and tenant helpers."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.orm import Session, sessionmaker
from starlette.testclient import TestClient

from loramux.app import build_state, create_app
from loramux.settings import Settings

ADMIN_KEY = "lmx_test-admin-key-0123456789abcdef"


@pytest.fixture
def settings(registry_url: str, db: sessionmaker[Session], tmp_path: Path) -> Settings:
    return Settings(
        home=tmp_path / "home",
        database_url=registry_url,
        storage_url=(tmp_path / "storage").as_uri(),
        admin_key=ADMIN_KEY,
        max_body_bytes=64 * 1024,
    )


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings, app_state=build_state(settings))) as test_client:
        yield test_client


def admin_headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {ADMIN_KEY}"}


@pytest.fixture
def make_tenant(client: TestClient) -> Callable[..., tuple[dict[str, Any], str]]:
    """Create a tenant through the admin API; returns (tenant, secret of a fresh key)."""

    def make(
        name: str, scopes: list[str] | None = None, **quotas: Any
    ) -> tuple[dict[str, Any], str]:
        tenant = client.post(
            "/admin/api/tenants", json={"name": name, **quotas}, headers=admin_headers()
        )
        assert tenant.status_code == 201, tenant.text
        body: dict[str, Any] = {"name": "test"}
        if scopes is not None:
            body["scopes"] = scopes
        key = client.post(
            f"/admin/api/tenants/{tenant.json()['id']}/keys", json=body, headers=admin_headers()
        )
        assert key.status_code == 201, key.text
        return tenant.json(), key.json()["key"]

    return make

"""API keys, scopes, the admin API, and the audit log, on PostgreSQL and on SQLite."""

from __future__ import annotations

import hashlib

from sqlalchemy import select
from starlette.testclient import TestClient

from loramux.db.models import ApiKey, AuditLog, Tenant
from tests.fixtures.services import both_registries
from tests.platform.conftest import ADMIN_KEY, admin_headers

pytestmark = both_registries


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def assert_openai_error(response, status: int, code: str | None = None) -> dict:  # type: ignore[no-untyped-def]
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if code is not None:
        assert error["code"] == code
    return error


def test_models_lists_base_model_for_a_valid_key(client, make_tenant) -> None:  # type: ignore[no-untyped-def]
    _, secret = make_tenant("acme")
    response = client.get("/v1/models", headers=bearer(secret))
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["smollm2-135m-instruct"]
    assert body["data"][0]["object"] == "model"


def test_missing_and_wrong_keys_get_401_in_openai_shape(client: TestClient) -> None:
    assert_openai_error(client.get("/v1/models"), 401, "missing_api_key")
    assert_openai_error(
        client.get("/v1/models", headers=bearer("lmx_nope-not-a-key-at-all")),
        401,
        "invalid_api_key",
    )
    assert_openai_error(client.get("/v1/models", headers={"Authorization": "Basic abc"}), 401)


def test_key_is_stored_as_prefix_and_sha256_only(client, make_tenant, db) -> None:  # type: ignore[no-untyped-def]
    _, secret = make_tenant("acme")
    assert secret.startswith("lmx_") and len(secret) >= 4 + 43  # 256 bits, urlsafe base64
    with db() as session:
        key = session.scalars(select(ApiKey)).one()
        assert key.prefix == secret[:12]
        assert key.secret_sha256 == hashlib.sha256(secret.encode()).hexdigest()
        for row in session.scalars(select(AuditLog)):
            assert secret not in str(row.details)


def test_revocation_and_suspension_apply_on_next_request(client, make_tenant) -> None:  # type: ignore[no-untyped-def]
    tenant, secret = make_tenant("acme")
    assert client.get("/v1/models", headers=bearer(secret)).status_code == 200
    keys = client.get(f"/admin/api/tenants/{tenant['id']}/keys", headers=admin_headers()).json()
    assert "key" not in keys["data"][0]  # the secret is shown once, at creation
    client.patch(
        f"/admin/api/tenants/{tenant['id']}", json={"status": "suspended"}, headers=admin_headers()
    ).raise_for_status()
    assert_openai_error(client.get("/v1/models", headers=bearer(secret)), 403, "tenant_suspended")
    client.patch(
        f"/admin/api/tenants/{tenant['id']}", json={"status": "active"}, headers=admin_headers()
    ).raise_for_status()
    assert client.get("/v1/models", headers=bearer(secret)).status_code == 200
    revoked = client.delete(f"/admin/api/keys/{keys['data'][0]['id']}", headers=admin_headers())
    assert revoked.json()["revoked_at"] is not None
    assert_openai_error(client.get("/v1/models", headers=bearer(secret)), 401, "revoked_api_key")


def test_scopes_are_enforced(client, make_tenant) -> None:  # type: ignore[no-untyped-def]
    _, secret = make_tenant("acme", scopes=["adapters:read"])
    assert_openai_error(client.get("/v1/models", headers=bearer(secret)), 403, "insufficient_scope")
    assert_openai_error(client.get("/admin/api/tenants", headers=bearer(secret)), 403)


def test_admin_api_tenant_quotas_round_trip(client: TestClient) -> None:
    created = client.post(
        "/admin/api/tenants",
        headers=admin_headers(),
        json={"name": "acme", "requests_per_minute": 60, "max_adapters": 3},
    )
    assert created.status_code == 201
    tenant = created.json()
    assert tenant["requests_per_minute"] == 60 and tenant["tokens_per_minute"] is None
    patched = client.patch(
        f"/admin/api/tenants/{tenant['id']}",
        headers=admin_headers(),
        json={"tokens_per_minute": 1000, "requests_per_minute": None},
    )
    assert patched.json()["tokens_per_minute"] == 1000
    assert patched.json()["requests_per_minute"] is None
    listed = client.get("/admin/api/tenants", headers=admin_headers()).json()["data"]
    assert [t["name"] for t in listed] == ["acme"]
    audit = client.get("/admin/api/audit", headers=admin_headers()).json()["data"]
    assert [a["action"] for a in audit] == ["tenant.update", "tenant.create"]
    assert audit[0]["actor"] == "admin:bootstrap-admin"


def test_bad_inputs_answer_clearly_and_store_nothing(client, make_tenant, db) -> None:  # type: ignore[no-untyped-def]
    tenant, _ = make_tenant("acme")
    h = admin_headers()
    assert_openai_error(client.post("/admin/api/tenants", json={"name": "acme"}, headers=h), 409)
    assert_openai_error(client.post("/admin/api/tenants", json={"name": "x" * 65}, headers=h), 400)
    assert_openai_error(client.post("/admin/api/tenants", json={"name": "../etc"}, headers=h), 400)
    assert_openai_error(
        client.post("/admin/api/tenants", json={"name": "ok", "rpm": 1}, headers=h), 400
    )
    error = assert_openai_error(
        client.post("/admin/api/tenants", json={"name": "ok", "max_adapters": -1}, headers=h), 400
    )
    assert error["param"] == "max_adapters"
    assert_openai_error(client.post("/admin/api/tenants", content=b"{not json", headers=h), 400)
    assert_openai_error(client.post("/admin/api/tenants", json=["a"], headers=h), 400)
    assert_openai_error(
        client.post("/admin/api/tenants", content=b"{" + b" " * 70_000 + b"}", headers=h), 413
    )
    error = assert_openai_error(
        client.post(
            f"/admin/api/tenants/{tenant['id']}/keys", json={"scopes": ["root"]}, headers=h
        ),
        400,
        "invalid_scope",
    )
    assert error["param"] == "scopes"
    assert_openai_error(client.post("/admin/api/tenants/ten_missing/keys", json={}, headers=h), 404)
    assert_openai_error(client.delete("/admin/api/keys/key_missing", headers=h), 404)
    assert_openai_error(
        client.patch(f"/admin/api/tenants/{tenant['id']}", json={"status": "deleted"}, headers=h),
        400,
    )
    with db() as session:
        assert [t.name for t in session.scalars(select(Tenant))] == ["acme"]
        assert len(session.scalars(select(ApiKey)).all()) == 1
        assert session.get(Tenant, tenant["id"]).status == "active"


def test_health_and_readiness(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"registry": "ok", "storage": "ok"}


def test_bootstrap_admin_key_is_not_a_tenant_key(client: TestClient) -> None:
    response = client.get("/v1/models", headers=bearer(ADMIN_KEY))
    assert_openai_error(response, 403, "insufficient_scope")

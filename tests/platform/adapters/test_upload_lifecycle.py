"""A real PEFT adapter through the API, S3 on moto and a real Celery worker on Redis."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker
from starlette.testclient import TestClient

from loramux.db.models import Adapter, AdapterVersion, AuditLog
from loramux.resolve import resolve_model
from loramux.storage import storage_from_settings
from loramux_engine.lora.ref import adapter_sha256
from tests.platform.adapters.helpers import (
    CONFIG,
    WEIGHTS,
    assert_openai_error,
    bearer,
    upload,
)


def test_peft_adapter_becomes_ready_on_s3_through_the_worker(  # type: ignore[no-untyped-def]
    client: TestClient, make_tenant, peft_adapter_dir: Path, wait_validated, settings
) -> None:
    _, secret = make_tenant("acme")
    response = upload(client, secret, "support-bot", peft_adapter_dir)
    assert response.status_code == 201, response.text
    body = response.json()
    expected_sha = adapter_sha256(
        (peft_adapter_dir / CONFIG).read_bytes(), (peft_adapter_dir / WEIGHTS).read_bytes()
    )
    assert body["object"] == "adapter"
    assert (body["name"], body["version"], body["status"]) == ("support-bot", 1, "validating")
    assert body["sha256"] == expected_sha
    # Resolved at upload against the base model (4 layers): full names, in model order.
    resolved = [
        f"model.layers.{layer}.{module}"
        for layer in range(4)
        for module in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")
    ]
    assert body["target_modules"] == resolved

    version = wait_validated(body["version_id"])
    assert version.status == "ready", version.reason
    assert (version.rank, version.alpha) == (8, 16.0)
    assert version.target_modules == resolved

    shown = client.get("/v1/adapters/support-bot", headers=bearer(secret)).json()
    assert (shown["status"], shown["reason"], shown["ready_version"]) == ("ready", None, 1)
    listed = client.get("/v1/adapters", headers=bearer(secret)).json()
    assert [a["name"] for a in listed["data"]] == ["support-bot"]
    models = client.get("/v1/models", headers=bearer(secret)).json()
    assert "support-bot" in [m["id"] for m in models["data"]]

    # Content-addressed, no tenant or adapter name in the key (the bucket is session-wide).
    stored = set(storage_from_settings(settings).list(f"adapters/{expected_sha}/"))
    assert stored == {f"adapters/{expected_sha}/{CONFIG}", f"adapters/{expected_sha}/{WEIGHTS}"}


def test_a_new_upload_under_a_name_makes_the_next_version(  # type: ignore[no-untyped-def]
    client: TestClient,
    make_tenant,
    make_peft_adapter: Callable[..., Path],
    wait_validated,
    db: sessionmaker[Session],
) -> None:
    tenant, secret = make_tenant("acme")
    first = upload(client, secret, "bot", make_peft_adapter(seed=0)).json()
    wait_validated(first["version_id"])
    second = upload(client, secret, "bot", make_peft_adapter(seed=1, r=4)).json()
    assert second["version"] == 2 and second["sha256"] != first["sha256"]
    assert wait_validated(second["version_id"]).rank == 4

    versions = client.get("/v1/adapters/bot/versions", headers=bearer(secret)).json()["data"]
    assert [(v["version"], v["status"]) for v in versions] == [(1, "ready"), (2, "ready")]
    with db() as session:
        assert (
            resolve_model(session, tenant["id"], "bot", "base").adapter_version_id
            == (second["version_id"])
        )
        assert (
            resolve_model(session, tenant["id"], "bot@1", "base").adapter_version_id
            == (first["version_id"])
        )
        assert session.scalar(select(func.count()).select_from(Adapter)) == 1


def test_idempotent_retry_returns_the_first_response_and_creates_nothing_twice(  # type: ignore[no-untyped-def]
    client: TestClient, make_tenant, peft_adapter_dir: Path, db: sessionmaker[Session]
) -> None:
    _, secret = make_tenant("acme")
    key = {"Idempotency-Key": "retry-123"}
    first = upload(client, secret, "bot", peft_adapter_dir, headers=key)
    again = upload(client, secret, "bot", peft_adapter_dir, headers=key)
    assert first.status_code == again.status_code == 201
    assert again.json() == first.json()
    with db() as session:
        assert session.scalar(select(func.count()).select_from(AdapterVersion)) == 1

    other = upload(client, secret, "other-name", peft_adapter_dir, headers=key)
    assert_openai_error(other, 409, "idempotency_key_reused")
    # Keys are per tenant: another tenant's identical key is a fresh request.
    _, secret_b = make_tenant("globex")
    assert upload(client, secret_b, "bot", peft_adapter_dir, headers=key).status_code == 201


def test_two_tenants_same_name_are_separate_and_invisible_to_each_other(  # type: ignore[no-untyped-def]
    client: TestClient,
    make_tenant,
    make_peft_adapter: Callable[..., Path],
    wait_validated,
    db: sessionmaker[Session],
) -> None:
    tenant_a, secret_a = make_tenant("acme")
    tenant_b, secret_b = make_tenant("globex")
    a = upload(client, secret_a, "bot", make_peft_adapter(seed=0)).json()
    b = upload(client, secret_b, "bot", make_peft_adapter(seed=1)).json()
    assert a["id"] != b["id"] and a["version"] == b["version"] == 1
    wait_validated(a["version_id"])
    wait_validated(b["version_id"])

    assert client.get("/v1/adapters/bot", headers=bearer(secret_a)).json()["id"] == a["id"]
    assert client.get("/v1/adapters/bot", headers=bearer(secret_b)).json()["id"] == b["id"]
    assert client.delete("/v1/adapters/bot", headers=bearer(secret_a)).status_code == 200
    # A's delete touched only A's adapter; A now sees nothing by that name.
    assert client.get("/v1/adapters/bot", headers=bearer(secret_b)).json()["id"] == b["id"]
    for route in ("/v1/adapters/bot", "/v1/adapters/bot/versions"):
        assert_openai_error(client.get(route, headers=bearer(secret_a)), 404)
    assert_openai_error(client.delete("/v1/adapters/bot", headers=bearer(secret_a)), 404)
    assert client.get("/v1/adapters", headers=bearer(secret_a)).json()["data"] == []
    with db() as session:
        assert (
            resolve_model(session, tenant_b["id"], "bot", "base").adapter_version_id
            == (b["version_id"])
        )


def test_delete_hides_at_once_drops_from_engine_and_is_audited(  # type: ignore[no-untyped-def]
    client: TestClient, make_tenant, peft_adapter_dir: Path, wait_validated, db
) -> None:
    tenant, secret = make_tenant("acme")
    body = upload(client, secret, "bot", peft_adapter_dir).json()
    wait_validated(body["version_id"])
    dropped = []

    class Engine:
        """Records drops; the app's lifespan also starts and shuts it down."""

        def drop_adapter(self, ref: object) -> None:
            dropped.append(ref)

        def start(self) -> None: ...

        def shutdown(self) -> None: ...

    client.app.state.loramux.engine = Engine()  # type: ignore[attr-defined]
    deleted = client.delete("/v1/adapters/bot", headers=bearer(secret))
    assert deleted.json() == {"id": body["id"], "object": "adapter", "name": "bot", "deleted": True}
    assert [(r.id, r.sha256) for r in dropped] == [(body["version_id"], body["sha256"])]
    assert_openai_error(client.get("/v1/adapters/bot", headers=bearer(secret)), 404)
    with db() as session:
        try:
            resolve_model(session, tenant["id"], "bot", "base")
            raise AssertionError("a deleted adapter still resolves")
        except Exception as error:
            assert getattr(error, "status_code", None) == 404
        actions = session.scalars(select(AuditLog.action).where(AuditLog.tenant_id == tenant["id"]))
        assert {"adapter.upload", "adapter.delete"} <= set(actions)
    # The name is free again: a new upload starts a new adapter at version 1.
    assert upload(client, secret, "bot", peft_adapter_dir).json()["version"] == 1


def test_scopes_guard_reads_and_writes(  # type: ignore[no-untyped-def]
    client: TestClient, make_tenant, peft_adapter_dir: Path
) -> None:
    _, reader = make_tenant("acme", scopes=["adapters:read"])
    assert_openai_error(upload(client, reader, "bot", peft_adapter_dir), 403, "insufficient_scope")
    assert_openai_error(client.delete("/v1/adapters/bot", headers=bearer(reader)), 403)
    assert client.get("/v1/adapters", headers=bearer(reader)).status_code == 200
    _, writer = make_tenant("globex", scopes=["inference"])
    assert_openai_error(client.get("/v1/adapters", headers=bearer(writer)), 403)

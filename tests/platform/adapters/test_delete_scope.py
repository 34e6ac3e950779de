"""A delete drops from the engine only the tenant's own entry, and only once nothing uses it.

The engine keys its adapter cache by (tenant, sha256): two tenants with identical bytes
hold two entries, so one's delete cannot evict the other's adapter (before, a delete
dropped the sha256 from every tier, whoever else was serving it).
"""

from __future__ import annotations

from pathlib import Path

from starlette.testclient import TestClient

from loramux.resolve import resolve_model
from loramux_engine.lora.ref import AdapterRef
from tests.platform.adapters.helpers import bearer, upload


class DropRecorder:
    """Stands in for the engine: records drops; the app's lifespan starts and stops it."""

    def __init__(self) -> None:
        self.dropped: list[AdapterRef] = []

    def drop_adapter(self, ref: AdapterRef) -> None:
        self.dropped.append(ref)

    def start(self) -> None: ...

    def shutdown(self) -> None: ...


def test_delete_drops_only_what_no_live_version_of_the_tenant_uses(  # type: ignore[no-untyped-def]
    client: TestClient, make_tenant, peft_adapter_dir: Path, wait_validated, db
) -> None:
    tenant_a, secret_a = make_tenant("acme")
    tenant_b, secret_b = make_tenant("globex")
    uploads = [
        ("a-bot", secret_a, "bot"),
        ("a-copy", secret_a, "bot-copy"),
        ("b-bot", secret_b, "bot"),
    ]
    versions = {}
    for label, secret, name in uploads:
        response = upload(client, secret, name, peft_adapter_dir)  # the same bytes each time
        assert response.status_code == 201, response.text
        versions[label] = response.json()["version_id"]
        assert wait_validated(versions[label]).status == "ready"
    with db() as session:
        ref_a = resolve_model(session, tenant_a["id"], "bot", "base").adapter
        ref_b = resolve_model(session, tenant_b["id"], "bot", "base").adapter
    assert ref_a is not None and ref_b is not None and ref_a.sha256 == ref_b.sha256
    assert (ref_a.namespace, ref_b.namespace) == (tenant_a["id"], tenant_b["id"])
    assert ref_a.cache_key != ref_b.cache_key

    engine = DropRecorder()
    client.app.state.loramux.engine = engine  # type: ignore[attr-defined]
    assert client.delete("/v1/adapters/bot", headers=bearer(secret_a)).status_code == 200
    assert engine.dropped == []  # A's bot-copy still serves these bytes
    assert client.delete("/v1/adapters/bot", headers=bearer(secret_b)).status_code == 200
    assert engine.dropped == [AdapterRef(versions["b-bot"], ref_b.sha256, tenant_b["id"])]
    assert client.delete("/v1/adapters/bot-copy", headers=bearer(secret_a)).status_code == 200
    assert engine.dropped[1:] == [AdapterRef(versions["a-copy"], ref_a.sha256, tenant_a["id"])]

"""An adapter the engine cannot load fails that request with a clear 503, nothing else."""

from __future__ import annotations

import hashlib

from sqlalchemy import select

from loramux.db.models import Adapter, AdapterVersion, UsageRecord


def test_missing_adapter_blobs_answer_503_and_are_metered(client, make_tenant, db) -> None:  # type: ignore[no-untyped-def]
    tenant, key = make_tenant("acme")
    headers = {"Authorization": f"Bearer {key}"}
    model = client.get("/v1/models", headers=headers).json()["data"][0]["id"]
    sha = hashlib.sha256(b"blobs that were never stored").hexdigest()
    with db() as session, session.begin():
        adapter = Adapter(tenant_id=tenant["id"], name="ghost", base_model_id=model)
        session.add(adapter)
        session.flush()
        session.add(
            AdapterVersion(
                adapter_id=adapter.id,
                tenant_id=tenant["id"],
                version=1,
                sha256=sha,
                size_bytes=1,
                rank=4,
                alpha=8.0,
                target_modules=["q_proj"],
                config_key=f"adapters/{sha}/adapter_config.json",
                weights_key=f"adapters/{sha}/adapter_model.safetensors",
                status="ready",
            )
        )
    response = client.post(
        "/v1/completions", headers=headers, json={"model": "ghost", "prompt": "hi", "max_tokens": 4}
    )
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "engine_error"
    base = client.post(
        "/v1/completions", headers=headers, json={"model": model, "prompt": "hi", "max_tokens": 4}
    )
    assert base.status_code == 200  # the engine keeps serving everyone else
    with db() as session:
        statuses = [r.status for r in session.scalars(select(UsageRecord).order_by(UsageRecord.id))]
    assert statuses == ["error", "ok"]

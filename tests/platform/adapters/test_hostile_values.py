"""Validation runs the engine's own value check: huge finite values end ``rejected``.

Before it, an adapter with lora_alpha 1e300 or f32 weights of 1e18 was ``ready`` (only NaN
and infinities were looked for, in the file's own dtype) and then overflowed in the pool.
"""

from __future__ import annotations

from pathlib import Path

from starlette.testclient import TestClient

from tests.platform.adapters.helpers import bearer, upload
from tests.platform.adapters.hostile_values import hostile_adapters


def test_hostile_values_are_rejected_with_their_reason(  # type: ignore[no-untyped-def]
    client: TestClient, make_tenant, peft_adapter_dir: Path, wait_validated
) -> None:
    _, secret = make_tenant("acme")
    hostile = hostile_adapters(peft_adapter_dir)
    bodies = {}
    for name, adapter in hostile.items():
        response = upload(client, secret, name, config=adapter.config, weights=adapter.weights)
        assert response.status_code == 201, response.text
        bodies[name] = response.json()
    clean = upload(client, secret, "clean", peft_adapter_dir).json()
    for name, body in bodies.items():
        version = wait_validated(body["version_id"])
        assert version.status == "rejected", (name, version.reason)
        assert hostile[name].reason in (version.reason or ""), (name, version.reason)
    assert wait_validated(clean["version_id"]).status == "ready"
    shown = client.get("/v1/adapters/alpha-1e300", headers=bearer(secret)).json()
    assert shown["status"] == "rejected" and "LoRA scale" in shown["reason"]

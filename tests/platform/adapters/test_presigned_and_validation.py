"""The presigned flow on S3 (moto), and the validation task refusing what upload cannot see.

A presigned upload's content is checked only by the task, so the crafted files here go
all the way to the worker and must end ``rejected`` with their reason, never stuck.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import httpx
from starlette.testclient import TestClient

from tests.platform.adapters.crafted import CRAFTED, altered_weights
from tests.platform.adapters.helpers import CONFIG, WEIGHTS, assert_openai_error, bearer, upload


def presigned_upload(
    client: TestClient, secret: str, name: str, adapter_dir: Path, weights: bytes | None = None
) -> dict[str, Any]:
    """Create, PUT the weights to the presigned URL, complete; returns the completion body."""
    weights = weights if weights is not None else (adapter_dir / WEIGHTS).read_bytes()
    created = client.post(
        "/v1/adapters/uploads",
        json={
            "name": name,
            "config": json.loads((adapter_dir / CONFIG).read_bytes()),
            "weights_bytes": len(weights),
            "weights_sha256": hashlib.sha256(weights).hexdigest(),
        },
        headers=bearer(secret),
    )
    assert created.status_code == 201, created.text
    put = httpx.put(created.json()["upload_url"], content=weights)
    assert put.status_code == 200, put.text
    completed = client.post(
        f"/v1/adapters/uploads/{created.json()['id']}/complete", headers=bearer(secret)
    )
    assert completed.status_code == 200, completed.text
    body: dict[str, Any] = {**completed.json(), "upload_id": created.json()["id"]}
    return body


def test_presigned_upload_becomes_ready_and_complete_is_idempotent(  # type: ignore[no-untyped-def]
    client, make_tenant, peft_adapter_dir, wait_validated, settings
) -> None:
    _, secret = make_tenant("acme")
    body = presigned_upload(client, secret, "big-bot", peft_adapter_dir)
    upload_id = body.pop("upload_id")
    assert (body["name"], body["version"], body["status"]) == ("big-bot", 1, "validating")
    assert wait_validated(body["version_id"]).status == "ready"
    storage = client.app.state.loramux.storage
    assert list(storage.list("uploads/")) == []  # the staged object was moved
    shown = client.get("/v1/adapters/big-bot", headers=bearer(secret)).json()
    assert (shown["status"], shown["sha256"]) == ("ready", body["sha256"])
    again = client.post(f"/v1/adapters/uploads/{upload_id}/complete", headers=bearer(secret))
    assert again.status_code == 200 and again.json()["version_id"] == body["version_id"]


def test_presigned_complete_checks_what_was_put(  # type: ignore[no-untyped-def]
    client, make_tenant, peft_adapter_dir
) -> None:
    _, secret = make_tenant("acme")
    weights = (peft_adapter_dir / WEIGHTS).read_bytes()
    created = client.post(
        "/v1/adapters/uploads",
        json={
            "name": "bot",
            "config": json.loads((peft_adapter_dir / CONFIG).read_bytes()),
            "weights_bytes": len(weights),
            "weights_sha256": hashlib.sha256(weights).hexdigest(),
        },
        headers=bearer(secret),
    ).json()
    complete = f"/v1/adapters/uploads/{created['id']}/complete"
    error = assert_openai_error(client.post(complete, headers=bearer(secret)), 400)
    assert error["code"] == "upload_incomplete"
    tampered = bytearray(weights)
    tampered[-1] ^= 0xFF
    assert httpx.put(created["upload_url"], content=bytes(tampered)).status_code == 200
    error = assert_openai_error(client.post(complete, headers=bearer(secret)), 400)
    assert error["code"] == "upload_mismatch" and "weights_sha256" in error["message"]
    # Another tenant cannot complete (or learn of) this upload.
    _, other = make_tenant("globex")
    assert_openai_error(client.post(complete, headers=bearer(other)), 404)


def test_presigned_uploads_need_s3(local_client: TestClient, make_tenant) -> None:  # type: ignore[no-untyped-def]
    _, secret = make_tenant("acme")
    body = {"name": "bot", "config": {}, "weights_bytes": 10, "weights_sha256": "0" * 64}
    response = local_client.post("/v1/adapters/uploads", json=body, headers=bearer(secret))
    error = assert_openai_error(response, 400, "presign_not_supported")
    assert "S3" in error["message"]


def test_crafted_weights_are_rejected_by_the_task(  # type: ignore[no-untyped-def]
    client, make_tenant, peft_adapter_dir, wait_validated
) -> None:
    _, secret = make_tenant("acme")
    versions = {}
    for kind, (make, _) in CRAFTED.items():
        versions[kind] = presigned_upload(
            client, secret, kind.replace("_", "-"), peft_adapter_dir, make()
        )
    for kind, body in versions.items():
        version = wait_validated(body["version_id"])
        assert version.status == "rejected", kind
        assert CRAFTED[kind][1] in (version.reason or ""), (kind, version.reason)
    shown = client.get("/v1/adapters/overlap", headers=bearer(secret)).json()
    assert shown["status"] == "rejected" and "overlap" in shown["reason"]


def test_wrong_content_passes_upload_and_is_rejected_by_the_task(  # type: ignore[no-untyped-def]
    client, make_tenant, peft_adapter_dir, wait_validated
) -> None:
    _, secret = make_tenant("acme")
    expected = {
        "nan": "NaN or infinite",
        "inf": "NaN or infinite",
        "wrong_shape": "has shape",
        "extra_tensor": "not LoRA weights",
        "missing_tensor": "missing",
    }
    bodies = {}
    for change in expected:
        weights = altered_weights(peft_adapter_dir, change)
        response = upload(
            client, secret, change.replace("_", "-"), peft_adapter_dir, weights=weights
        )
        assert response.status_code == 201, response.text
        bodies[change] = response.json()
    for change, body in bodies.items():
        version = wait_validated(body["version_id"])
        assert version.status == "rejected" and expected[change] in (version.reason or ""), (
            change,
            version.reason,
        )

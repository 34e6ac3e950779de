"""The Batch API's objects: shape, checks at create, tenant scoping, listing, cancel."""

from __future__ import annotations

from tests.platform.adapters.helpers import assert_openai_error
from tests.platform.batches.conftest import bearer, jsonl, request_line, upload

LINES = [request_line("a", {"model": "m", "prompt": "hi", "max_tokens": 2})]
BATCH_KEYS = {
    "id", "object", "endpoint", "errors", "input_file_id", "completion_window", "status",
    "output_file_id", "error_file_id", "created_at", "in_progress_at", "expires_at",
    "finalizing_at", "completed_at", "failed_at", "expired_at", "cancelling_at", "cancelled_at",
    "request_counts", "metadata",
}  # fmt: skip


def test_create_get_list(client, make_tenant, start_batch) -> None:  # type: ignore[no-untyped-def]
    _, key = make_tenant("acme")
    batch = start_batch(key, LINES)
    assert set(batch) == BATCH_KEYS
    assert batch["id"].startswith("batch_") and batch["object"] == "batch"
    assert batch["status"] == "validating" and batch["completion_window"] == "24h"
    assert batch["request_counts"] == {"total": 0, "completed": 0, "failed": 0}
    assert batch["expires_at"] - batch["created_at"] == 24 * 3600
    assert client.get(f"/v1/batches/{batch['id']}", headers=bearer(key)).json() == batch
    second = start_batch(key, LINES)
    page = client.get("/v1/batches?limit=1", headers=bearer(key)).json()
    assert page["object"] == "list" and page["has_more"] is True
    assert page["data"][0]["id"] == second["id"]
    rest = client.get(f"/v1/batches?after={page['last_id']}", headers=bearer(key)).json()
    assert [b["id"] for b in rest["data"]] == [batch["id"]] and rest["has_more"] is False


def test_create_checks(client, make_tenant) -> None:  # type: ignore[no-untyped-def]
    _, key = make_tenant("acme")
    file_id = upload(client, key, jsonl(LINES)).json()["id"]
    good = {"input_file_id": file_id, "endpoint": "/v1/completions", "completion_window": "24h"}
    for change, param in (
        ({"endpoint": "/v1/embeddings"}, "endpoint"),
        ({"completion_window": "1h"}, "completion_window"),
        ({"metadata": {"k": 1}}, "metadata"),
        ({"input_file_id": None}, "input_file_id"),
    ):
        response = client.post("/v1/batches", headers=bearer(key), json={**good, **change})
        assert assert_openai_error(response, 400)["param"] == param
    missing = client.post(
        "/v1/batches", headers=bearer(key), json={**good, "input_file_id": "file-nope"}
    )
    assert_openai_error(missing, 404)
    made = client.post(
        "/v1/batches", headers=bearer(key), json={**good, "metadata": {"job": "nightly"}}
    )
    assert made.status_code == 200 and made.json()["metadata"] == {"job": "nightly"}


def test_another_tenants_batch_is_a_404(client, make_tenant, start_batch) -> None:  # type: ignore[no-untyped-def]
    _, owner = make_tenant("owner")
    _, other = make_tenant("other")
    batch = start_batch(owner, LINES)
    assert_openai_error(client.get(f"/v1/batches/{batch['id']}", headers=bearer(other)), 404)
    cancel = client.post(f"/v1/batches/{batch['id']}/cancel", headers=bearer(other))
    assert_openai_error(cancel, 404)
    assert client.get("/v1/batches", headers=bearer(other)).json()["data"] == []


def test_cancel_and_cancel_of_a_finished_batch(  # type: ignore[no-untyped-def]
    client, make_tenant, start_batch, run_batch
) -> None:
    _, key = make_tenant("acme")
    batch = start_batch(key, LINES)
    cancelled = client.post(f"/v1/batches/{batch['id']}/cancel", headers=bearer(key)).json()
    assert cancelled["status"] == "cancelling" and cancelled["cancelling_at"] is not None
    again = client.post(f"/v1/batches/{batch['id']}/cancel", headers=bearer(key))
    assert again.json()["status"] == "cancelling"
    assert run_batch(batch["id"]) == "cancelled"

    done = start_batch(key, LINES)
    assert run_batch(done["id"]) == "completed"
    refused = client.post(f"/v1/batches/{done['id']}/cancel", headers=bearer(key))
    error = assert_openai_error(refused, 400, "batch_not_cancellable")
    assert "completed" in error["message"]
    file_id = client.get(f"/v1/batches/{done['id']}", headers=bearer(key)).json()["input_file_id"]
    assert client.delete(f"/v1/files/{file_id}", headers=bearer(key)).status_code == 200


def test_a_running_batchs_input_file_cannot_be_deleted(client, make_tenant, start_batch) -> None:  # type: ignore[no-untyped-def]
    _, key = make_tenant("acme")
    batch = start_batch(key, LINES)
    response = client.delete(f"/v1/files/{batch['input_file_id']}", headers=bearer(key))
    assert batch["id"] in assert_openai_error(response, 409)["message"]

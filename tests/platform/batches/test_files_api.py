"""The Files API: batch input checked line by line, tenant scoping, content, delete, list."""

from __future__ import annotations

import json

from tests.platform.adapters.helpers import assert_openai_error
from tests.platform.batches.conftest import bearer, jsonl, request_line, upload

GOOD = request_line("a", {"model": "m", "prompt": "hi"})


def test_upload_get_content_list_delete(client, make_tenant) -> None:  # type: ignore[no-untyped-def]
    _, key = make_tenant("acme")
    data = jsonl([GOOD, request_line("b", {"model": "m", "prompt": "yo"})])
    created = upload(client, key, data)
    assert created.status_code == 200, created.text
    body = created.json()
    assert body["id"].startswith("file-") and body["object"] == "file"
    assert body["bytes"] == len(data) and body["purpose"] == "batch"
    assert body["filename"] == "input.jsonl" and body["status"] == "processed"
    assert isinstance(body["created_at"], int)

    assert client.get(f"/v1/files/{body['id']}", headers=bearer(key)).json() == body
    content = client.get(f"/v1/files/{body['id']}/content", headers=bearer(key))
    assert content.status_code == 200 and content.content == data
    listed = client.get("/v1/files", headers=bearer(key)).json()
    assert [f["id"] for f in listed["data"]] == [body["id"]] and listed["has_more"] is False

    deleted = client.delete(f"/v1/files/{body['id']}", headers=bearer(key))
    assert deleted.json() == {"id": body["id"], "object": "file", "deleted": True}
    assert_openai_error(client.get(f"/v1/files/{body['id']}", headers=bearer(key)), 404)


def test_bad_lines_name_the_first_bad_line(client, make_tenant) -> None:  # type: ignore[no-untyped-def]
    _, key = make_tenant("acme")
    cases = [
        (jsonl([GOOD]) + b"{not json\n", "line 2: not valid JSON"),
        (jsonl([GOOD, GOOD]), "line 2: custom_id 'a' repeats the one on line 1"),
        (jsonl([GOOD, {**GOOD, "custom_id": "b", "url": "/v1/embeddings"}]), "line 2: url"),
        (jsonl([{**GOOD, "method": "GET"}]), "line 1: method"),
        (jsonl([{**GOOD, "body": {"prompt": "x"}}]), "line 1: body.model is required"),
        (jsonl([GOOD]) + b"\n" + b"[1, 2]\n", "line 3: each line must be a JSON object"),
        (jsonl([{**GOOD, "custom_id": "x" * 65}]), "line 1: custom_id must be"),
        (b"\n\n", "the file holds no requests"),
    ]
    for data, message in cases:
        error = assert_openai_error(upload(client, key, data), 400, "invalid_batch_line")
        assert error["message"].startswith(message), (message, error)
    assert client.get("/v1/files", headers=bearer(key)).json()["data"] == []


def test_limits_and_purpose(client, make_tenant, app_state) -> None:  # type: ignore[no-untyped-def]
    _, key = make_tenant("acme")
    error = assert_openai_error(upload(client, key, jsonl([GOOD]), purpose="fine-tune"), 400)
    assert error["param"] == "purpose"
    many = jsonl([request_line(str(i), {"model": "m", "prompt": "x"}) for i in range(4)])
    limited = app_state.settings.model_copy(update={"batch_max_lines": 3})
    app_state.settings = limited
    error = assert_openai_error(upload(client, key, many), 400, "invalid_batch_line")
    assert "line 4" in error["message"] and "at most 3" in error["message"]
    app_state.settings = limited.model_copy(update={"files_max_bytes": 10})
    assert_openai_error(upload(client, key, jsonl([GOOD])), 413)


def test_another_tenants_file_is_a_404(client, make_tenant) -> None:  # type: ignore[no-untyped-def]
    _, owner = make_tenant("owner")
    _, other = make_tenant("other")
    file_id = upload(client, owner, jsonl([GOOD])).json()["id"]
    for method, path in (
        ("GET", f"/v1/files/{file_id}"),
        ("GET", f"/v1/files/{file_id}/content"),
        ("DELETE", f"/v1/files/{file_id}"),
    ):
        assert_openai_error(client.request(method, path, headers=bearer(other)), 404)
    assert client.get("/v1/files", headers=bearer(other)).json()["data"] == []
    batch = client.post(
        "/v1/batches",
        headers=bearer(other),
        json={"input_file_id": file_id, "endpoint": "/v1/completions", "completion_window": "24h"},
    )
    assert_openai_error(batch, 404)


def test_list_pages_with_after(client, make_tenant) -> None:  # type: ignore[no-untyped-def]
    _, key = make_tenant("acme")
    ids = [upload(client, key, jsonl([GOOD])).json()["id"] for _ in range(3)]
    first = client.get("/v1/files?limit=2", headers=bearer(key)).json()
    assert first["has_more"] is True and len(first["data"]) == 2
    rest = client.get(f"/v1/files?limit=2&after={first['last_id']}", headers=bearer(key)).json()
    assert rest["has_more"] is False
    seen = [f["id"] for f in first["data"] + rest["data"]]
    assert sorted(seen) == sorted(ids) and len(set(seen)) == 3
    assert json.loads(client.get("/v1/files?limit=0", headers=bearer(key)).text)["error"]

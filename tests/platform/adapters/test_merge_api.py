"""Merge jobs through the API: a real Celery worker on Redis, S3 on moto, PostgreSQL.

The merged model, downloaded through its presigned URLs and read by transformers, gives
PEFT's greedy tokens for the adapter; on local storage the files stream through the API.
Another tenant's merge is a 404; bad versions and the storage quota are refused in
OpenAI's error shape.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from sqlalchemy.orm import Session, sessionmaker
from starlette.testclient import TestClient

from loramux.adapters import registry
from loramux.adapters.base_shape import base_model_shape
from loramux.adapters.merge_job import remove_orphaned_merges, run_merge
from loramux.adapters.validation_job import validate_version
from loramux.db.models import AdapterMerge
from loramux.storage import storage_from_settings
from tests.engine.peft_reference import greedy, load_base, peft_greedy
from tests.platform.adapters.helpers import assert_openai_error, bearer, upload
from tests.platform.conftest import ADMIN_KEY

PROMPTS = [[5 + (i * 7 + j * 13) % 250 for j in range(n)] for i, n in enumerate([4, 19])]
MAX_NEW_TOKENS = 10
LORA: dict[str, Any] = {
    "r": 8,
    "lora_alpha": 32,
    "target_modules": "all-linear",
    "use_rslora": True,
    "rank_pattern": {"q_proj": 4},
    "alpha_pattern": {"v_proj": 8},
}
EXPORT = {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json"}
MERGE = "/v1/adapters/{}/versions/{}/merge"


def wait_merged(client: TestClient, secret: str, path: str, timeout_s: float = 120) -> Any:
    deadline = time.monotonic() + timeout_s
    while (job := client.get(path, headers=bearer(secret)).json())["status"] in (
        "queued",
        "running",
    ):
        assert time.monotonic() < deadline, f"the merge is still {job['status']}: {job}"
        time.sleep(0.3)
    return job


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def merge_adapter(
    make_peft_adapter: Callable[..., Path], tiny_llama_dir: Path
) -> tuple[Path, list[list[int]]]:
    """A PEFT adapter (rsLoRA, rank and alpha patterns) and PEFT's greedy tokens with it."""
    adapter_dir = make_peft_adapter(seed=5, **LORA)
    base_tokens, base = peft_greedy(load_base(tiny_llama_dir), None, PROMPTS, MAX_NEW_TOKENS)
    tokens, _ = peft_greedy(base, adapter_dir, PROMPTS, MAX_NEW_TOKENS)
    assert tokens != base_tokens, "the adapter does not change the output"
    return adapter_dir, tokens


def test_merge_job_on_s3_gives_peft_tokens_and_is_the_tenants_alone(  # type: ignore[no-untyped-def]
    client: TestClient, make_tenant, merge_adapter, wait_validated, settings, tmp_path: Path
) -> None:
    adapter_dir, peft_tokens = merge_adapter
    _, secret = make_tenant("acme")
    uploaded = upload(client, secret, "bot", adapter_dir).json()
    assert wait_validated(uploaded["version_id"]).status == "ready"

    path = MERGE.format("bot", 1)
    created = client.post(path, headers=bearer(secret))
    assert created.status_code == 202, created.text
    job = created.json()
    assert job["object"] == "adapter.merge" and job["adapter_version_id"] == uploaded["version_id"]
    again = client.post(path, headers=bearer(secret))  # idempotent: the same job
    assert again.status_code == 200 and again.json()["id"] == job["id"]

    done = wait_merged(client, secret, path)
    assert (done["status"], done["progress"], done["error"]) == ("succeeded", 1.0, None)
    files = {f["name"]: f for f in done["files"]}
    assert set(files) >= EXPORT
    assert done["size_bytes"] == sum(f["size_bytes"] for f in files.values())
    # Content-addressed, no tenant or adapter name in a key.
    stored = set(storage_from_settings(settings).list(f"merges/{done['sha256']}/"))
    assert stored == {f"merges/{done['sha256']}/{name}" for name in files}

    export = tmp_path / "export"
    export.mkdir()
    for name, entry in files.items():
        body = httpx.get(entry["url"]).raise_for_status().content  # presigned, straight to S3
        assert sha256_of(body) == entry["sha256"] and len(body) == entry["size_bytes"]
        (export / name).write_bytes(body)
    route = client.get(
        f"{path}/files/model.safetensors", headers=bearer(secret), follow_redirects=False
    )
    assert route.status_code == 307 and route.headers["location"].startswith("http")

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
    assert [greedy(model, p, MAX_NEW_TOKENS) for p in PROMPTS] == peft_tokens

    # Another tenant with an adapter of the same name sees none of it.
    _, other = make_tenant("globex")
    upload(client, other, "bot", adapter_dir)
    assert_openai_error(client.get(path, headers=bearer(other)), 404, "merge_not_found")
    assert_openai_error(client.get(f"{path}/files/model.safetensors", headers=bearer(other)), 404)
    assert_openai_error(client.get(MERGE.format("bot", 2), headers=bearer(secret)), 404)


def test_merge_bytes_count_against_the_storage_quota(  # type: ignore[no-untyped-def]
    client: TestClient,
    make_tenant,
    merge_adapter,
    wait_validated,
    db: sessionmaker[Session],
) -> None:
    adapter_dir, _ = merge_adapter
    tenant, secret = make_tenant("acme", max_storage_bytes=200_000)
    uploaded = upload(client, secret, "bot", adapter_dir).json()
    assert wait_validated(uploaded["version_id"]).status == "ready"
    path = MERGE.format("bot", 1)
    refused = client.post(path, headers=bearer(secret))
    assert_openai_error(refused, 403, "storage_quota_exceeded")

    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    patched = client.patch(
        f"/admin/api/tenants/{tenant['id']}", json={"max_storage_bytes": 10**8}, headers=admin
    )
    assert patched.status_code == 200, patched.text
    assert client.post(path, headers=bearer(secret)).status_code == 202
    done = wait_merged(client, secret, path)
    assert done["status"] == "succeeded", done
    with db() as session:
        used = registry.storage_used(session, tenant["id"])
    assert used == uploaded["size_bytes"] + done["size_bytes"]


def test_bad_merge_requests_are_refused(  # type: ignore[no-untyped-def]
    local_client: TestClient, make_tenant, merge_adapter
) -> None:
    adapter_dir, _ = merge_adapter
    _, secret = make_tenant("acme")
    assert upload(local_client, secret, "bot", adapter_dir).status_code == 201  # no worker here
    auth = bearer(secret)
    assert_openai_error(
        local_client.post(MERGE.format("bot", 1), headers=auth), 409, "version_not_ready"
    )
    for version in ("2", "0", "abc", "9" * 30):
        response = local_client.post(MERGE.format("bot", version), headers=auth)
        assert_openai_error(response, 404, "version_not_found")
    assert_openai_error(
        local_client.post(MERGE.format("nope", 1), headers=auth), 404, "adapter_not_found"
    )
    assert_openai_error(
        local_client.get(MERGE.format("bot", 1), headers=auth), 404, "merge_not_found"
    )
    _, read_only = make_tenant("globex", scopes=["adapters:read"])
    assert_openai_error(local_client.post(MERGE.format("bot", 1), headers=bearer(read_only)), 403)


def test_merged_files_stream_from_local_storage(  # type: ignore[no-untyped-def]
    local_client: TestClient, make_tenant, merge_adapter, db: sessionmaker[Session]
) -> None:
    adapter_dir, _ = merge_adapter
    app: Any = local_client.app
    app_state = app.state.loramux
    settings, storage = app_state.settings, app_state.storage
    _, secret = make_tenant("acme")
    uploaded = upload(local_client, secret, "bot", adapter_dir).json()
    shape = base_model_shape(settings)
    assert validate_version(db, storage, shape, 64, uploaded["version_id"]) == "ready"
    path = MERGE.format("bot", 1)
    job = local_client.post(path, headers=bearer(secret)).json()
    # No worker behind this app: the task's work runs here, as the worker would run it.
    assert run_merge(db, storage, settings, job["id"]) == "succeeded"
    assert run_merge(db, storage, settings, job["id"]) == "succeeded"  # a redelivery: no-op
    done = local_client.get(path, headers=bearer(secret)).json()
    assert done["url_expires_in_s"] is None
    for entry in done["files"]:
        assert entry["url"] == f"{path}/files/{entry['name']}"
        body = local_client.get(entry["url"], headers=bearer(secret))
        assert body.status_code == 200
        assert sha256_of(body.content) == entry["sha256"]
    _, other = make_tenant("globex")
    assert_openai_error(local_client.get(f"{path}/files/config.json", headers=bearer(other)), 404)
    assert_openai_error(local_client.get(f"{path}/files/nope.bin", headers=bearer(secret)), 404)
    with db() as session:
        assert session.get(AdapterMerge, job["id"]).attempts <= 1  # type: ignore[union-attr]

    # Kept while the adapter lives; the cleanup takes a deleted adapter's merged model.
    stored = {f"merges/{done['sha256']}/{entry['name']}" for entry in done["files"]}
    assert remove_orphaned_merges(db, storage) == []
    assert local_client.delete("/v1/adapters/bot", headers=bearer(secret)).status_code == 200
    assert set(remove_orphaned_merges(db, storage)) == stored
    assert list(storage.list("merges/")) == []


def test_a_failed_merge_says_why_frees_its_quota_and_can_be_requested_again(  # type: ignore[no-untyped-def]
    local_client: TestClient, make_tenant, merge_adapter, db: sessionmaker[Session]
) -> None:
    adapter_dir, _ = merge_adapter
    app: Any = local_client.app
    settings, storage = app.state.loramux.settings, app.state.loramux.storage
    tenant, secret = make_tenant("acme")
    uploaded = upload(local_client, secret, "bot", adapter_dir).json()
    version_id = uploaded["version_id"]
    assert validate_version(db, storage, base_model_shape(settings), 64, version_id) == "ready"
    weights_key = f"adapters/{uploaded['sha256']}/adapter_model.safetensors"
    weights = storage.get_bytes(weights_key, expected_sha256=None)
    storage.delete(weights_key)  # the store lost it

    path = MERGE.format("bot", 1)
    job = local_client.post(path, headers=bearer(secret)).json()
    assert job["size_bytes"] > 0  # the estimate, reserved against the quota
    assert run_merge(db, storage, settings, job["id"]) == "failed"
    failed = local_client.get(path, headers=bearer(secret)).json()
    assert failed["status"] == "failed" and "missing or damaged" in failed["error"]
    assert (failed["size_bytes"], failed["files"]) == (0, [])
    with db() as session:
        assert registry.storage_used(session, tenant["id"]) == uploaded["size_bytes"]

    storage.put(weights_key, weights)
    again = local_client.post(path, headers=bearer(secret))
    assert again.status_code == 202 and again.json()["id"] == job["id"]
    assert (again.json()["status"], again.json()["error"]) == ("queued", None)
    assert run_merge(db, storage, settings, job["id"]) == "succeeded"


class PausingStorage:
    """The app's storage, whose first stored file of a merged export waits for ``go``: a
    job caught between storing its blobs and recording its success."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.stored, self.go = threading.Event(), threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def put(self, key: str, data: Any, *, sha256: str | None = None) -> Any:
        info = self.inner.put(key, data, sha256=sha256)
        if key.startswith("merges/") and not self.stored.is_set():
            self.stored.set()
            assert self.go.wait(120)
        return info


def test_an_over_quota_merge_keeps_the_blobs_another_tenants_job_shares(  # type: ignore[no-untyped-def]
    local_client: TestClient, make_tenant, merge_adapter, db: sessionmaker[Session]
) -> None:
    adapter_dir, _ = merge_adapter
    app: Any = local_client.app
    settings, storage = app.state.loramux.settings, app.state.loramux.storage
    shape = base_model_shape(settings)
    path = MERGE.format("bot", 1)
    tenants = {}
    for name in ("acme", "globex"):  # the same adapter bytes: the same export digest
        tenant, secret = make_tenant(name)
        uploaded = upload(local_client, secret, "bot", adapter_dir).json()
        assert validate_version(db, storage, shape, 64, uploaded["version_id"]) == "ready"
        job = local_client.post(path, headers=bearer(secret)).json()
        tenants[name] = (tenant, secret, uploaded, job)
    globex, globex_secret, globex_upload, globex_job = tenants["globex"]
    patched = local_client.patch(
        f"/admin/api/tenants/{globex['id']}",
        json={"max_storage_bytes": globex_upload["size_bytes"] + 1},
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
    )
    assert patched.status_code == 200, patched.text

    # acme's job stores its first file and stops there, not yet succeeded.
    _, acme_secret, _, acme_job = tenants["acme"]
    paused = PausingStorage(storage)
    outcome: list[str | None] = []
    worker = threading.Thread(
        target=lambda: outcome.append(run_merge(db, paused, settings, acme_job["id"]))
    )
    worker.start()
    try:
        assert paused.stored.wait(120), "acme's job never stored a file"
        # globex's job stores the same blobs, is over its quota and cleans up after itself.
        assert run_merge(db, storage, settings, globex_job["id"]) == "failed"
    finally:
        paused.go.set()
        worker.join(120)
    failed = local_client.get(path, headers=bearer(globex_secret)).json()
    assert "max_storage_bytes" in failed["error"] and failed["sha256"] is None
    assert outcome == ["succeeded"]

    done = local_client.get(path, headers=bearer(acme_secret)).json()
    for entry in done["files"]:  # every file there, its sha256 checked as it streams
        body = local_client.get(entry["url"], headers=bearer(acme_secret))
        assert body.status_code == 200 and sha256_of(body.content) == entry["sha256"]
    stored = {f"merges/{done['sha256']}/{entry['name']}" for entry in done["files"]}
    assert set(storage.list("merges/")) == stored
    assert remove_orphaned_merges(db, storage) == []  # acme's merge references them
    assert local_client.delete("/v1/adapters/bot", headers=bearer(acme_secret)).status_code == 200
    assert set(remove_orphaned_merges(db, storage)) == stored

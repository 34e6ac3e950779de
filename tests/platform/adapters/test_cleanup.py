"""Cleanup: orphaned blobs go, referenced and leased ones stay.

The registry-level tests at the end run on SQLite too, the embedded default. Validations
left unfinished are the outbox's (tests/platform/adapters/test_validation_outbox.py).
"""

from __future__ import annotations

import hashlib
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from loramux.adapters.cleanup import FINISHED_UPLOAD_RETENTION, run_cleanup
from loramux.adapters.validation_job import validate_version
from loramux.db.models import AdapterUpload, AdapterVersion
from loramux.db.session import transaction
from loramux.jobs.config import CLEANUP_ORPHANED_BLOBS
from loramux.jobs.queue import job_queue
from loramux.settings import Settings
from loramux.storage import LocalStorage, adapter_key
from tests.fixtures.services import both_registries
from tests.platform.adapters.helpers import CONFIG, WEIGHTS, bearer, upload
from tests.platform.registry_rows import add_adapter_version, add_tenant

WAIT_S = 60.0


def _state(client: Any) -> Any:
    return client.app.state.loramux


def _cleanup(client: Any) -> Any:
    state = _state(client)
    return run_cleanup(state.sessions, state.storage, state.settings)


def _orphan(storage: Any, seed: bytes) -> list[str]:
    """Blobs as a crash between the blob upload and the registry commit leaves them."""
    sha = hashlib.sha256(seed).hexdigest()
    keys = [adapter_key(sha, CONFIG), adapter_key(sha, WEIGHTS)]
    for key in keys:
        storage.put(key, seed)
    return keys


def test_the_worker_task_removes_an_orphaned_blob(client, settings) -> None:  # type: ignore[no-untyped-def]
    storage = _state(client).storage
    keys = _orphan(storage, b"crashed before commit")
    job_queue(settings.resolved_broker_url).send(CLEANUP_ORPHANED_BLOBS)
    deadline = time.monotonic() + WAIT_S
    while any(storage.exists(key) for key in keys):
        assert time.monotonic() < deadline, f"cleanup task did not remove {keys} in {WAIT_S} s"
        time.sleep(0.1)


def test_cleanup_keeps_referenced_and_leased_blobs_and_removes_the_rest(  # type: ignore[no-untyped-def]
    client, make_tenant, peft_adapter_dir, wait_validated, db
) -> None:
    storage = _state(client).storage
    tenant, secret = make_tenant("acme")
    body = upload(client, secret, "bot", peft_adapter_dir).json()
    wait_validated(body["version_id"])
    live = [adapter_key(body["sha256"], CONFIG), adapter_key(body["sha256"], WEIGHTS)]
    orphan = _orphan(storage, b"orphan")
    leased = _orphan(storage, b"in flight")
    with transaction(db) as session:
        session.add(
            AdapterUpload(
                tenant_id=tenant["id"],
                name="in-flight",
                kind="direct",
                sha256=leased[0].split("/")[1],
                weights_bytes=1,
                weights_sha256="0" * 64,
                expires_at=datetime.now(UTC) + timedelta(hours=1),
            )
        )
    report = _cleanup(client)
    assert set(orphan) <= set(report.deleted_blobs)
    assert all(storage.exists(key) for key in live + leased)
    assert not any(storage.exists(key) for key in orphan)

    # Once the lease expires its blobs are orphans too.
    with transaction(db) as session:
        session.execute(
            update(AdapterUpload).values(expires_at=datetime.now(UTC) - timedelta(seconds=1))
        )
    report = _cleanup(client)
    assert report.expired_uploads == 1
    assert not any(storage.exists(key) for key in leased)
    assert all(storage.exists(key) for key in live)


def test_deleted_adapters_blobs_go_unless_another_version_shares_them(  # type: ignore[no-untyped-def]
    client, make_tenant, peft_adapter_dir, make_peft_adapter, wait_validated
) -> None:
    storage = _state(client).storage
    _, secret_a = make_tenant("acme")
    _, secret_b = make_tenant("globex")
    shared = upload(client, secret_a, "bot", peft_adapter_dir).json()
    same = upload(client, secret_b, "bot", peft_adapter_dir).json()
    alone = upload(client, secret_a, "other", make_peft_adapter(seed=7)).json()
    assert shared["sha256"] == same["sha256"]
    for body in (shared, same, alone):
        wait_validated(body["version_id"])
    client.delete("/v1/adapters/bot", headers=bearer(secret_a))
    client.delete("/v1/adapters/other", headers=bearer(secret_a))
    _cleanup(client)
    assert storage.exists(adapter_key(shared["sha256"], WEIGHTS))  # tenant B still uses it
    assert not storage.exists(adapter_key(alone["sha256"], WEIGHTS))
    assert client.get("/v1/adapters/bot", headers=bearer(secret_b)).json()["status"] == "ready"


def test_validation_is_idempotent_by_version_id(  # type: ignore[no-untyped-def]
    client, make_tenant, peft_adapter_dir, wait_validated, db
) -> None:
    from loramux.adapters.base_shape import base_model_shape

    state = _state(client)
    _, secret = make_tenant("acme")
    body = upload(client, secret, "bot", peft_adapter_dir).json()
    ready = wait_validated(body["version_id"])
    shape = base_model_shape(state.settings)
    again = validate_version(db, state.storage, shape, 64, body["version_id"])
    assert again == "ready"
    with db() as session:
        assert session.get(AdapterVersion, body["version_id"]).ready_at == ready.ready_at
    assert validate_version(db, state.storage, shape, 64, "adv_missing") is None


def _registry_cleanup(
    db: sessionmaker[Session], registry_url: str, tmp_path: Path
) -> tuple[LocalStorage, Settings, Any]:
    """Local storage, settings, and ``run() -> report``: cleanup with no worker."""
    settings = Settings(
        home=tmp_path / "home",
        database_url=registry_url,
        storage_url=(tmp_path / "storage").as_uri(),
    )
    storage = LocalStorage(tmp_path / "storage")

    def run() -> Any:
        return run_cleanup(db, storage, settings)

    return storage, settings, run


@both_registries
def test_cleanup_expires_leases_and_removes_orphans_on_either_registry(
    db: sessionmaker[Session], registry_url: str, tmp_path: Path
) -> None:
    storage, _, run = _registry_cleanup(db, registry_url, tmp_path)
    live, orphan = _orphan(storage, b"live"), _orphan(storage, b"orphan")
    leased, lapsed = _orphan(storage, b"leased"), _orphan(storage, b"lapsed")
    now = datetime.now(UTC)
    with transaction(db) as session:
        tenant = add_tenant(session, "acme")
        add_adapter_version(session, tenant.id, "bot", live[0].split("/")[1])

        def lease(name: str, keys: list[str], expires_at: datetime, **fields: Any) -> None:
            session.add(
                AdapterUpload(
                    tenant_id=tenant.id,
                    name=name,
                    kind="direct",
                    sha256=keys[0].split("/")[1],
                    weights_bytes=1,
                    weights_sha256="0" * 64,
                    expires_at=expires_at,
                    **fields,
                )
            )

        lease("in-flight", leased, now + timedelta(hours=1))
        lease("crashed", lapsed, now - timedelta(seconds=1))
        lease(
            "old", orphan, now, status="completed", created_at=now - FINISHED_UPLOAD_RETENTION * 2
        )
    report = run()
    assert report.expired_uploads == 1
    assert sorted(report.deleted_blobs) == sorted(orphan + lapsed)
    assert all(storage.exists(key) for key in live + leased)
    with db() as session:
        uploads = dict(session.execute(select(AdapterUpload.name, AdapterUpload.status)).all())
    assert uploads == {"in-flight": "pending", "crashed": "expired"}

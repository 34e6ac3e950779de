"""Shared merge blobs are deleted only when no merge row, any tenant's, references them;
on both registries (PostgreSQL's advisory lock, SQLite's write lock)."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from loramux.adapters.merge_job import (
    DIGEST_LOCK_CLASS,
    drop_unreferenced,
    lock_digest,
    remove_orphaned_merges,
)
from loramux.db.models import Adapter, AdapterMerge
from loramux.db.session import transaction
from loramux.storage.local import LocalStorage
from tests.fixtures.services import both_registries
from tests.platform.registry_rows import add_adapter_version, add_tenant

DIGEST = "ab" * 32
KEYS = {f"merges/{DIGEST}/config.json", f"merges/{DIGEST}/model.safetensors"}


def merge_row(session: Session, tenant_name: str, status: str) -> str:
    tenant = add_tenant(session, tenant_name)
    version = add_adapter_version(session, tenant.id, "bot", "c" * 64)
    merge = AdapterMerge(
        tenant_id=tenant.id, adapter_version_id=version.id, base_model_id="m",
        status=status, sha256=None if status == "failed" else DIGEST,
    )  # fmt: skip
    session.add(merge)
    session.flush()
    return merge.id


@both_registries
def test_blobs_go_with_the_last_reference_of_any_tenant(
    db: sessionmaker[Session], tmp_path: Path
) -> None:
    storage = LocalStorage(tmp_path / "blobs")
    for key in KEYS:
        storage.put(key, b"x")
    with transaction(db) as session:
        running = merge_row(session, "acme", "running")  # named the digest, storing
        merge_row(session, "globex", "failed")  # over quota: cleaned up after itself
    assert drop_unreferenced(db, storage, DIGEST) == []
    assert set(storage.list("merges/")) == KEYS

    with transaction(db) as session:  # acme's job succeeds: still referenced
        session.execute(
            update(AdapterMerge).where(AdapterMerge.id == running).values(status="succeeded")
        )
    assert drop_unreferenced(db, storage, DIGEST) == []
    assert remove_orphaned_merges(db, storage) == []

    with transaction(db) as session:  # acme deletes its adapter: no reference left
        merge = session.get(AdapterMerge, running)
        assert merge is not None
        session.execute(
            update(Adapter)
            .where(Adapter.tenant_id == merge.tenant_id)
            .values(deleted_at=datetime.now(UTC))
        )
    assert set(drop_unreferenced(db, storage, DIGEST)) == KEYS
    assert list(storage.list("merges/")) == []


def lock_is_free(db: sessionmaker[Session]) -> bool:
    """Whether another connection could take the digest's lock now, without waiting."""
    engine = db.kw["bind"]
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            key = int(DIGEST[:7], 16)
            free = conn.scalar(select(func.pg_try_advisory_xact_lock(DIGEST_LOCK_CLASS, key)))
            conn.rollback()
            return bool(free)
    probe = sqlite3.connect(engine.url.database, timeout=0)
    try:
        probe.execute("BEGIN IMMEDIATE")
        probe.rollback()
        return True
    except sqlite3.OperationalError:
        return False
    finally:
        probe.close()


@both_registries
def test_the_digest_lock_is_held_until_commit(db: sessionmaker[Session]) -> None:
    assert lock_is_free(db)
    with transaction(db) as session:
        lock_digest(session, DIGEST)
        assert not lock_is_free(db)
    assert lock_is_free(db)

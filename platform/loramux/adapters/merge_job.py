"""The merge task's work for one job, idempotent by job id.

A job already ``succeeded`` or ``failed`` is left alone, so a redelivered message, or one
the outbox published again after a timeout (outbox.py), is a no-op. The adapter's
files are fetched and checked against the version's sha256, merged by the engine's own
code (loramux_engine.lora.merge: PEFT's scaling, rsLoRA and patterns included), and each
file of the export is stored under its content address before the row says
``succeeded``, in a transaction that checks the tenant's storage quota with the real size.
Two copies running at once write the same bytes to the same keys; one outcome stands.

Blobs are shared: two tenants' merges of the same bytes have one digest. A job names its
digest in its row before it stores a blob, and blobs are deleted (a failed job's, the
orphans' pass) only when no row references the digest, checked and deleted under the
digest's lock (``lock_digest``), which naming a digest takes too.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from loramux.adapters import registry
from loramux.adapters.merge import merge_key
from loramux.adapters.outbox import MERGE_PENDING as PENDING
from loramux.app import base_model_id
from loramux.base_models import ModelError, resolve_model, sha256_file
from loramux.db.models import Adapter, AdapterMerge, AdapterVersion
from loramux.db.session import transaction
from loramux.settings import Settings
from loramux.storage import BlobCorruptError, BlobNotFound, Storage, StorageError, adapter_key
from loramux_engine.lora.errors import UnsupportedAdapterError
from loramux_engine.lora.files import CONFIG_NAME, WEIGHTS_NAME
from loramux_engine.lora.merge import write_merged_model
from loramux_engine.lora.ref import combine_file_digests

log = logging.getLogger(__name__)
# The first key of the advisory locks on merged exports' digests (lock_digest).
DIGEST_LOCK_CLASS = 0x4D52
FINAL = ("succeeded", "failed")
# The registry or the store unreachable: the task retries (jobs/tasks.py).
TRANSIENT = (OperationalError, StorageError)


class MergeFailed(Exception):
    """The job cannot succeed; the message is the job's ``error``, shown to the tenant."""


def export_sha256(files: list[dict[str, Any]]) -> str:
    """The export's content address: the sha256 of its ``sha256sum`` listing, by name."""
    listing = "".join(
        f"{f['sha256']}  {f['name']}\n" for f in sorted(files, key=lambda f: f["name"])
    )
    return hashlib.sha256(listing.encode()).hexdigest()


def run_merge(
    sessions: sessionmaker[Session], storage: Storage, settings: Settings, merge_id: str
) -> str | None:
    """Run one job; its final status, or None if it is gone or its adapter deleted."""
    with sessions() as session:
        row = session.execute(
            select(AdapterMerge, AdapterVersion, Adapter.deleted_at)
            .join(AdapterVersion, AdapterVersion.id == AdapterMerge.adapter_version_id)
            .join(Adapter, Adapter.id == AdapterVersion.adapter_id)
            .where(AdapterMerge.id == merge_id)
        ).first()
    if row is None:
        return None
    merge, version, deleted_at = row
    if merge.status in FINAL:
        return merge.status
    if deleted_at is not None:
        return _finish(sessions, merge_id, error="the adapter was deleted before its merge ran")
    _update(sessions, merge_id, status="running", progress=0.05, started_at=datetime.now(UTC))
    try:
        files, tmp = _merge(sessions, storage, settings, merge, version)
        with tmp:
            return _store(sessions, storage, merge_id, Path(tmp.name), files)
    except MergeFailed as error:
        return _finish(sessions, merge_id, error=str(error))
    except TRANSIENT:
        raise  # the task retries; the job stays running, its outbox due time still ahead
    except Exception as error:
        log.exception("merge %s failed unexpectedly", merge_id)
        return _finish(
            sessions, merge_id, error=f"the merge failed unexpectedly ({type(error).__name__})"
        )


def _update(sessions: sessionmaker[Session], merge_id: str, **values: Any) -> None:
    with transaction(sessions) as session:
        session.execute(
            update(AdapterMerge)
            .where(AdapterMerge.id == merge_id, AdapterMerge.status.in_(PENDING))
            .values(**values)
        )


def _merge(
    sessions: sessionmaker[Session],
    storage: Storage,
    settings: Settings,
    merge: AdapterMerge,
    version: AdapterVersion,
) -> tuple[list[dict[str, Any]], tempfile.TemporaryDirectory[str]]:
    if merge.base_model_id != base_model_id(settings):
        raise MergeFailed(
            f"the job was requested for the base model {merge.base_model_id!r}, and this "
            "worker serves another"
        )
    try:
        model_dir = resolve_model(settings.model, settings.models_dir)
    except ModelError as error:
        log.error("merge %s: no base model: %s", merge.id, error)
        raise MergeFailed("the base model is not available to the merge worker") from None
    tmp = tempfile.TemporaryDirectory(prefix="loramux-merge-")
    try:
        adapter_dir, out_dir = Path(tmp.name, "adapter"), Path(tmp.name, "export")
        adapter_dir.mkdir()
        try:
            digests = [
                storage.download_to(
                    adapter_key(version.sha256, name), adapter_dir / name, expected_sha256=None
                ).sha256
                for name in (CONFIG_NAME, WEIGHTS_NAME)
            ]
        except (BlobNotFound, BlobCorruptError):
            raise MergeFailed(
                "the adapter's stored files are missing or damaged; upload it again"
            ) from None
        if combine_file_digests(*(bytes.fromhex(d) for d in digests)) != version.sha256:
            raise MergeFailed("the adapter's stored files do not match its sha256")
        _update(sessions, merge.id, progress=0.1)
        progress: Callable[[float], None] = lambda done: _update(  # noqa: E731
            sessions, merge.id, progress=round(0.1 + 0.6 * done, 3)
        )
        try:
            written = write_merged_model(
                model_dir, adapter_dir, out_dir, max(settings.max_lora_rank, 64), progress
            )
        except UnsupportedAdapterError as error:
            raise MergeFailed(str(error)) from None
        files = [
            {"name": path.name, "size_bytes": path.stat().st_size, "sha256": sha256_file(path)}
            for path in written
        ]
        for path in adapter_dir.iterdir():
            path.unlink()
        return files, tmp
    except BaseException:
        tmp.cleanup()
        raise


def _store(
    sessions: sessionmaker[Session],
    storage: Storage,
    merge_id: str,
    work: Path,
    files: list[dict[str, Any]],
) -> str | None:
    digest = export_sha256(files)
    # The row names the digest before any blob is stored, under the digest's lock: a
    # cleanup that deletes these blobs either finished first or sees this reference.
    with transaction(sessions) as session:
        lock_digest(session, digest)
        recorded = session.execute(
            update(AdapterMerge)
            .where(AdapterMerge.id == merge_id, AdapterMerge.status.in_(PENDING))
            .values(sha256=digest)
            .execution_options(synchronize_session=False)
        )
        if getattr(recorded, "rowcount", 0) != 1:  # finished meanwhile (another copy)
            merge = session.get(AdapterMerge, merge_id)
            return merge.status if merge is not None else None
    for i, entry in enumerate(files):
        with (work / "export" / entry["name"]).open("rb") as stream:
            storage.put(merge_key(digest, entry["name"]), stream, sha256=entry["sha256"])
        _update(sessions, merge_id, progress=round(0.7 + 0.29 * (i + 1) / len(files), 3))
    size = sum(entry["size_bytes"] for entry in files)
    with transaction(sessions) as session:
        merge = session.get(AdapterMerge, merge_id)
        if merge is None or merge.status not in PENDING:
            return merge.status if merge is not None else None
        tenant = registry.lock_tenant(session, merge.tenant_id)
        others = registry.storage_used(session, tenant.id) - merge.size_bytes
        over_quota = (
            tenant.max_storage_bytes is not None and others + size > tenant.max_storage_bytes
        )
        if over_quota:
            merge.status, merge.size_bytes, merge.sha256 = "failed", 0, None
            merge.error = (
                f"the merged model is {size} bytes, which would bring the tenant's storage "
                f"over its limit (max_storage_bytes={tenant.max_storage_bytes})"
            )
        else:
            merge.status, merge.progress, merge.error = "succeeded", 1.0, None
            merge.sha256, merge.files, merge.size_bytes = digest, files, size
        merge.finished_at = datetime.now(UTC)
    if over_quota:
        drop_unreferenced(sessions, storage, digest)
        return "failed"
    log.info(
        "merge %s succeeded: %d files, %d bytes, sha256 %s", merge_id, len(files), size, digest
    )
    return "succeeded"


def _finish(sessions: sessionmaker[Session], merge_id: str, *, error: str) -> str | None:
    log.warning("merge %s failed: %s", merge_id, error)
    _update(
        sessions, merge_id, status="failed", error=error, size_bytes=0, sha256=None,
        finished_at=datetime.now(UTC),
    )  # fmt: skip
    with sessions() as session:
        return session.scalar(select(AdapterMerge.status).where(AdapterMerge.id == merge_id))


def lock_digest(session: Session, digest: str) -> None:
    """Hold, until ``session`` commits, the lock that orders naming ``digest`` in a row and
    deleting its blobs: PostgreSQL's advisory lock for the digest (another digest may share
    it, which only serializes the two), SQLite's one write lock (any write takes it)."""
    if session.get_bind().dialect.name == "postgresql":
        key = int(digest[:7], 16)  # 28 bits: a positive int4
        session.execute(select(func.pg_advisory_xact_lock(DIGEST_LOCK_CLASS, key)))
    else:
        session.execute(
            update(AdapterMerge)
            .where(AdapterMerge.id == "")
            .values(sha256=AdapterMerge.sha256)
            .execution_options(synchronize_session=False)
        )


def _referenced(session: Session, digests: set[str]) -> set[str]:
    """Those of ``digests`` a merge row (any tenant's) still needs: a job queued or running
    that named it (its blobs may be stored or on their way), or a succeeded merge of a
    live adapter."""
    live = Adapter.deleted_at.is_(None) & (AdapterMerge.status == "succeeded")
    return set(
        session.scalars(
            select(AdapterMerge.sha256)
            .join(AdapterVersion, AdapterVersion.id == AdapterMerge.adapter_version_id)
            .join(Adapter, Adapter.id == AdapterVersion.adapter_id)
            .where(AdapterMerge.sha256.in_(digests), AdapterMerge.status.in_(PENDING) | live)
        )
    )


def drop_unreferenced(
    sessions: sessionmaker[Session], storage: Storage, digest: str, keys: list[str] | None = None
) -> list[str]:
    """Delete the blobs under ``merges/<digest>/`` (``keys``, else all listed there) unless
    a merge row still references the digest; checked and deleted under the digest's lock,
    so a job naming it meanwhile either waits and stores its blobs again, or is seen."""
    with transaction(sessions) as session:
        lock_digest(session, digest)
        if _referenced(session, {digest}):
            return []
        doomed = keys if keys is not None else list(storage.list(f"merges/{digest}/"))
        for key in doomed:
            storage.delete(key)
    return doomed


def remove_orphaned_merges(sessions: sessionmaker[Session], storage: Storage) -> list[str]:
    """Delete merged models no merge row references (a deleted adapter's, a failed job's),
    each digest checked again under its lock (``drop_unreferenced``)."""
    by_digest: dict[str, list[str]] = {}
    for key in storage.list("merges/"):
        by_digest.setdefault(key.split("/")[1], []).append(key)
    if not by_digest:
        return []
    with sessions() as session:
        kept = _referenced(session, set(by_digest))
    deleted = []
    for digest, keys in by_digest.items():
        if digest not in kept:
            deleted += drop_unreferenced(sessions, storage, digest, keys)
    return deleted

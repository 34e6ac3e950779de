"""The merge task's work for one job, idempotent by job id.

A job already ``succeeded`` or ``failed`` is left alone, so a redelivered message, or one
the outbox published again after a timeout (merge_outbox.py), is a no-op. The adapter's
files are fetched and checked against the version's sha256, merged by the engine's own
code (loramux_engine.lora.merge: PEFT's scaling, rsLoRA and patterns included), and each
file of the export is stored under its content address before the row says
``succeeded``, in a transaction that checks the tenant's storage quota with the real size.
Two copies running at once write the same bytes to the same keys; one outcome stands.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from loramux.adapters import registry
from loramux.adapters.merge import merge_key
from loramux.adapters.merge_outbox import PENDING
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
            merge.status, merge.size_bytes = "failed", 0
            merge.error = (
                f"the merged model is {size} bytes, which would bring the tenant's storage "
                f"over its limit (max_storage_bytes={tenant.max_storage_bytes})"
            )
        else:
            merge.status, merge.progress, merge.error = "succeeded", 1.0, None
            merge.sha256, merge.files, merge.size_bytes = digest, files, size
        merge.finished_at = datetime.now(UTC)
    if over_quota:
        _drop_unreferenced(sessions, storage, digest, files)
        return "failed"
    log.info(
        "merge %s succeeded: %d files, %d bytes, sha256 %s", merge_id, len(files), size, digest
    )
    return "succeeded"


def _finish(sessions: sessionmaker[Session], merge_id: str, *, error: str) -> str | None:
    log.warning("merge %s failed: %s", merge_id, error)
    _update(
        sessions, merge_id, status="failed", error=error, size_bytes=0,
        finished_at=datetime.now(UTC),
    )  # fmt: skip
    with sessions() as session:
        return session.scalar(select(AdapterMerge.status).where(AdapterMerge.id == merge_id))


def _drop_unreferenced(
    sessions: sessionmaker[Session], storage: Storage, digest: str, files: list[dict[str, Any]]
) -> None:
    """Remove a failed job's stored files unless a succeeded merge (the same bytes, perhaps
    another tenant's) holds them."""
    with sessions() as session:
        kept = session.scalar(
            select(AdapterMerge.id).where(
                AdapterMerge.sha256 == digest, AdapterMerge.status == "succeeded"
            )
        )
    if kept is None:
        for entry in files:
            storage.delete(merge_key(digest, entry["name"]))


def _live_merge_shas(session: Session, shas: set[str]) -> set[str]:
    """Those of ``shas`` a succeeded merge of a live adapter names."""
    return set(
        session.scalars(
            select(AdapterMerge.sha256)
            .join(AdapterVersion, AdapterVersion.id == AdapterMerge.adapter_version_id)
            .join(Adapter, Adapter.id == AdapterVersion.adapter_id)
            .where(
                AdapterMerge.sha256.in_(shas),
                AdapterMerge.status == "succeeded",
                Adapter.deleted_at.is_(None),
            )
        )
    )


def remove_orphaned_merges(sessions: sessionmaker[Session], storage: Storage) -> list[str]:
    """Delete merged models no succeeded merge of a live adapter names (a deleted adapter's,
    a failed job's). A job in flight stores its files before its row names them, so none
    is deleted while any job is queued or running; the next pass takes them."""
    keys = list(storage.list("merges/"))
    if not keys:
        return []
    with sessions() as session:
        if session.scalar(select(AdapterMerge.id).where(AdapterMerge.status.in_(PENDING))):
            return []
        kept = _live_merge_shas(session, {key.split("/")[1] for key in keys})
    deleted = []
    for key in keys:
        if key.split("/")[1] not in kept:
            storage.delete(key)
            deleted.append(key)
    return deleted

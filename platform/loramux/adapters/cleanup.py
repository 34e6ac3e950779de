"""Remove blobs nothing references, and what interrupted uploads left behind.

A blob under ``adapters/<sha256>/`` is kept while a live adapter's version that is not
rejected, or a pending upload lease, names that sha256; a staged blob under
``uploads/<id>/`` while its upload is pending. Leases expire after
``adapter_upload_ttl_s``: that is the grace an upload in flight has before its blobs may
go. Each deletion re-reads the registry just before it, so an upload that committed
while the listing ran keeps its blobs. What a put killed mid-write left behind (a temp
file under the local store's ``.tmp/``, an S3 multipart upload never completed) goes once
older than the same TTL. (Validations left unfinished are the outbox's: adapters/outbox.py.)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session, sessionmaker

from loramux.adapters.merge_job import remove_orphaned_merges
from loramux.db.models import Adapter, AdapterUpload, AdapterVersion
from loramux.db.session import transaction
from loramux.settings import Settings
from loramux.storage import Storage

log = logging.getLogger(__name__)

# Finished presigned uploads answer a repeated complete for this long, then go.
FINISHED_UPLOAD_RETENTION = timedelta(days=7)


@dataclass
class CleanupReport:
    deleted_blobs: list[str] = field(default_factory=list)
    removed_partial_uploads: int = 0
    expired_uploads: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "deleted_blobs": self.deleted_blobs,
            "removed_partial_uploads": self.removed_partial_uploads,
            "expired_uploads": self.expired_uploads,
        }


def _live_shas(session: Session, shas: set[str]) -> set[str]:
    """Those of ``shas`` that a kept version or a pending upload still names."""
    if not shas:
        return set()
    versions = (
        select(AdapterVersion.sha256)
        .join(Adapter, Adapter.id == AdapterVersion.adapter_id)
        .where(
            AdapterVersion.sha256.in_(shas),
            AdapterVersion.status != "rejected",
            Adapter.deleted_at.is_(None),
        )
    )
    uploads = select(AdapterUpload.sha256).where(
        AdapterUpload.sha256.in_(shas), AdapterUpload.status == "pending"
    )
    return set(session.scalars(versions)) | set(session.scalars(uploads))


def _pending_uploads(session: Session, ids: set[str]) -> set[str]:
    if not ids:
        return set()
    return set(
        session.scalars(
            select(AdapterUpload.id).where(
                AdapterUpload.id.in_(ids), AdapterUpload.status == "pending"
            )
        )
    )


def _parts(key: str) -> tuple[str, str] | None:
    """``("adapters", sha256)`` or ``("uploads", id)`` for a key of that layout."""
    kind, _, rest = key.partition("/")
    owner, _, filename = rest.partition("/")
    return (kind, owner) if owner and filename and "/" not in filename else None


def remove_orphaned_blobs(sessions: sessionmaker[Session], storage: Storage) -> list[str]:
    # List first, read the registry after: a blob listed before its row committed is then
    # seen as referenced (its lease or version committed before this read).
    keys = [k for k in (*storage.list("adapters/"), *storage.list("uploads/")) if _parts(k)]
    owners: dict[str, set[str]] = {"adapters": set(), "uploads": set()}
    for key in keys:
        kind, owner = _parts(key)  # type: ignore[misc]
        owners[kind].add(owner)
    with sessions() as session:
        kept = _live_shas(session, owners["adapters"]) | _pending_uploads(
            session, owners["uploads"]
        )
    deleted = []
    for key in keys:
        kind, owner = _parts(key)  # type: ignore[misc]
        if owner in kept:
            continue
        with sessions() as session:
            still = (_live_shas if kind == "adapters" else _pending_uploads)(session, {owner})
        if still:
            continue
        storage.delete(key)
        deleted.append(key)
    return deleted


def expire_uploads(sessions: sessionmaker[Session], now: datetime) -> int:
    with transaction(sessions) as session:
        expired = session.execute(
            update(AdapterUpload)
            .where(AdapterUpload.status == "pending", AdapterUpload.expires_at <= now)
            .values(status="expired")
        )
        session.execute(
            delete(AdapterUpload).where(
                AdapterUpload.status != "pending",
                AdapterUpload.created_at <= now - FINISHED_UPLOAD_RETENTION,
            )
        )
        return int(getattr(expired, "rowcount", 0) or 0)


def run_cleanup(
    sessions: sessionmaker[Session], storage: Storage, settings: Settings
) -> CleanupReport:
    now = datetime.now(UTC)
    report = CleanupReport()
    report.expired_uploads = expire_uploads(sessions, now)
    report.deleted_blobs = remove_orphaned_blobs(sessions, storage)
    report.deleted_blobs += remove_orphaned_merges(sessions, storage)
    report.removed_partial_uploads = storage.remove_partial_uploads(settings.adapter_upload_ttl_s)
    if report.deleted_blobs or report.removed_partial_uploads:
        log.info("cleanup: %s", report.as_dict())
    return report

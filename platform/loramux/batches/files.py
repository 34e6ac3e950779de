"""The Files API's registry side: batch input files in, batch output files out.

Blobs live at ``files/<id>`` and are written before the row that names them; content is
read back verified against the row's sha256.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from typing import IO, Any

from sqlalchemy import Select, select
from sqlalchemy.orm import Session, sessionmaker

from loramux.batches.jsonl import count_lines
from loramux.db.models import Batch, File, new_id
from loramux.db.scoped import get_scoped, scoped
from loramux.db.session import transaction
from loramux.errors import Conflict, InvalidRequest, NotFound, PayloadTooLarge
from loramux.settings import Settings
from loramux.storage import Storage, file_key

INPUT_PURPOSE = "batch"
OUTPUT_PURPOSE = "batch_output"
ACTIVE_STATUSES = ("validating", "in_progress", "finalizing", "cancelling")
_CHUNK = 1 << 20


def unix(value: datetime | None) -> int | None:
    if value is None:
        return None
    return int(value.timestamp())


def file_view(row: File) -> dict[str, Any]:
    return {
        "id": row.id,
        "object": "file",
        "bytes": row.bytes,
        "created_at": unix(row.created_at),
        "expires_at": None,
        "filename": row.filename,
        "purpose": row.purpose,
        "status": row.status,
        "status_details": None,
    }


def file_not_found(file_id: str) -> NotFound:
    return NotFound(f"No such File object: {file_id}", param="file_id")


def get_file(session: Session, tenant_id: str, file_id: str) -> File:
    row = get_scoped(session, File, tenant_id, id=file_id)
    if row is None:
        raise file_not_found(file_id)
    return row


def _sha256(stream: IO[bytes]) -> str:
    hasher = hashlib.sha256()
    for chunk in iter(lambda: stream.read(_CHUNK), b""):
        hasher.update(chunk)
    stream.seek(0)
    return hasher.hexdigest()


def create_input_file(
    sessions: sessionmaker[Session],
    storage: Storage,
    settings: Settings,
    *,
    tenant_id: str,
    filename: str,
    purpose: str,
    stream: IO[bytes],
    size: int,
) -> File:
    """Check every line, store the blob, then commit the row (a blob never lacks its checks)."""
    if purpose != INPUT_PURPOSE:
        raise InvalidRequest(
            f"purpose must be {INPUT_PURPOSE!r}: this server runs batch files only",
            param="purpose",
        )
    if size > settings.files_max_bytes:
        raise PayloadTooLarge(f"a batch file may hold at most {settings.files_max_bytes} bytes")
    num_lines = count_lines(stream, max_lines=settings.batch_max_lines)
    stream.seek(0)
    sha256 = _sha256(stream)
    row = File(
        id=new_id("file-"),
        tenant_id=tenant_id,
        filename=filename[:255] or "input.jsonl",
        purpose=purpose,
        bytes=size,
        sha256=sha256,
        storage_key="",
        line_count=num_lines,
    )
    row.storage_key = file_key(row.id)
    storage.put(row.storage_key, stream, sha256=sha256)
    with transaction(sessions) as session:
        session.add(row)
    return row


def put_output_file(
    session: Session, storage: Storage, *, tenant_id: str, file_id: str, filename: str, data: bytes
) -> File:
    """Store a batch's output; re-running it with the same id rewrites the same bytes."""
    key = file_key(file_id)
    sha256 = hashlib.sha256(data).hexdigest()
    storage.put(key, data, sha256=sha256)
    row = session.get(File, file_id)
    if row is None:
        row = File(
            id=file_id,
            tenant_id=tenant_id,
            filename=filename,
            purpose=OUTPUT_PURPOSE,
            bytes=len(data),
            sha256=sha256,
            storage_key=key,
            line_count=data.count(b"\n"),
        )
        session.add(row)
    return row


def files_query(tenant_id: str, purpose: str | None) -> Select[Any]:
    query = scoped(File, tenant_id)
    if purpose is not None:
        query = query.where(File.purpose == purpose)
    return query


def delete_file(session: Session, tenant_id: str, file_id: str) -> File:
    """Soft-delete the row; the caller removes the blob once this commits."""
    row = get_file(session, tenant_id, file_id)
    running = session.scalar(
        select(Batch.id)
        .where(Batch.input_file_id == row.id)
        .where(Batch.status.in_(ACTIVE_STATUSES))
        .limit(1)
    )
    if running is not None:
        raise Conflict(
            f"the file {file_id} is the input of batch {running}, which is still running"
        )
    row.deleted_at = datetime.now(UTC)
    return row

"""Finishing a batch: its output and error files from the staged lines, then the status.

Idempotent: the files' ids derive from the batch id and their bytes from the staged rows
in line order, so a finalize run again (its worker died half-way) rewrites the same blobs
and finds the rows already there; the status moves only from the state it expects.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from loramux.batches.files import put_output_file
from loramux.batches.staging import move_status
from loramux.db.models import Batch, BatchLine
from loramux.db.session import transaction
from loramux.storage import Storage

# The status a batch ends in, and the statuses it may reach it from.
OUTCOMES = {
    "completed": ("finalizing",),
    "cancelled": ("cancelling",),
    "expired": ("in_progress", "finalizing"),
    "failed": ("in_progress", "cancelling"),  # the tenant suspended or the key revoked
}


def output_file_id(batch_id: str, kind: str) -> str:
    return "file-" + hashlib.sha256(f"{batch_id}:{kind}".encode()).hexdigest()[:24]


def output_line(row: BatchLine) -> dict[str, Any]:
    """One line in OpenAI's batch output shape."""
    response = None
    if row.body is not None:
        response = {"status_code": row.status_code, "request_id": row.request_id, "body": row.body}
    return {"id": row.id, "custom_id": row.custom_id, "response": response, "error": row.error}


def _jsonl(lines: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(line, separators=(",", ":")).encode() + b"\n" for line in lines)


def start_finalizing(sessions: sessionmaker[Session], batch_id: str) -> str:
    """in_progress -> finalizing; a cancel that got in first wins. Returns the outcome."""
    with transaction(sessions) as session:
        if move_status(
            session, batch_id, ("in_progress",), status="finalizing",
            finalizing_at=datetime.now(UTC),
        ):  # fmt: skip
            return "completed"
        status = session.scalar(select(Batch.status).where(Batch.id == batch_id))
    return "cancelled" if status == "cancelling" else "completed"


def finalize(
    sessions: sessionmaker[Session], storage: Storage, batch: Batch, outcome: str,
    batch_errors: list[dict[str, Any]] | None = None,
) -> bool:  # fmt: skip
    """Write the files and end the batch as ``outcome`` (with ``batch_errors``, the batch's
    own, if any); False if it had already moved on."""
    with sessions() as session:
        rows = list(
            session.scalars(
                select(BatchLine)
                .where(BatchLine.batch_id == batch.id)
                .order_by(BatchLine.line_index)
            )
        )
    outputs = [output_line(r) for r in rows if r.error is None]
    errors = [output_line(r) for r in rows if r.error is not None]
    now = datetime.now(UTC)
    with transaction(sessions) as session:
        values: dict[str, Any] = {
            "status": outcome,
            f"{outcome}_at": now,
            "lease_owner": None,
            "lease_expires_at": None,
        }
        if batch_errors:
            values["errors"] = {"object": "list", "data": batch_errors}
        for kind, lines in (("output", outputs), ("error", errors)):
            if not lines:
                continue
            file_id = output_file_id(batch.id, kind)
            put_output_file(
                session,
                storage,
                tenant_id=batch.tenant_id,
                file_id=file_id,
                filename=f"{batch.id}_{kind}.jsonl",
                data=_jsonl(lines),
            )
            values[f"{kind}_file_id"] = file_id
        return move_status(session, batch.id, OUTCOMES[outcome], **values)

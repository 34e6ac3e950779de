"""Batch objects: create, read, list and cancel, in OpenAI's shapes and statuses.

validating -> in_progress -> finalizing -> completed, or failed (the input file did not
pass validation, or the tenant was suspended or the batch's key revoked or expired while it
ran: the lines left are refused in the error file), or expired (the completion window ran
out); cancel moves validating or in_progress to cancelling, and the worker finishes it as
cancelled with partial results.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Select, update
from sqlalchemy.orm import Session

from loramux.batches.files import INPUT_PURPOSE, file_not_found, unix
from loramux.batches.jsonl import ENDPOINTS
from loramux.db.models import Batch, File
from loramux.db.scoped import get_scoped, scoped
from loramux.errors import InvalidRequest, NotFound

COMPLETION_WINDOWS = {"24h": timedelta(hours=24)}
CANCELLABLE = ("validating", "in_progress")
MAX_METADATA_PAIRS = 16
TIMESTAMPS = (
    "created_at",
    "in_progress_at",
    "expires_at",
    "finalizing_at",
    "completed_at",
    "failed_at",
    "expired_at",
    "cancelling_at",
    "cancelled_at",
)


def batch_view(batch: Batch) -> dict[str, Any]:
    return {
        "id": batch.id,
        "object": "batch",
        "endpoint": batch.endpoint,
        "errors": batch.errors,
        "input_file_id": batch.input_file_id,
        "completion_window": batch.completion_window,
        "status": batch.status,
        "output_file_id": batch.output_file_id,
        "error_file_id": batch.error_file_id,
        **{name: unix(getattr(batch, name)) for name in TIMESTAMPS},
        "request_counts": {
            "total": batch.total,
            "completed": batch.completed,
            "failed": batch.failed,
        },
        "metadata": batch.batch_metadata,
    }


def _metadata(value: Any) -> dict[str, str] | None:
    if value is None:
        return None
    if (
        not isinstance(value, dict)
        or len(value) > MAX_METADATA_PAIRS
        or not all(
            isinstance(k, str) and len(k) <= 64 and isinstance(v, str) and len(v) <= 512
            for k, v in value.items()
        )
    ):
        raise InvalidRequest(
            f"metadata must map up to {MAX_METADATA_PAIRS} keys (at most 64 characters) to "
            "strings (at most 512 characters)",
            param="metadata",
        )
    return value


def create_batch(
    session: Session, *, tenant_id: str, api_key_id: str | None, body: dict[str, Any]
) -> Batch:
    endpoint = body.get("endpoint")
    if endpoint not in ENDPOINTS:
        raise InvalidRequest(
            f"endpoint must be one of {', '.join(ENDPOINTS)}, got {endpoint!r}", param="endpoint"
        )
    window = body.get("completion_window")
    if window not in COMPLETION_WINDOWS:
        raise InvalidRequest('completion_window must be "24h"', param="completion_window")
    metadata = _metadata(body.get("metadata"))
    file_id = body.get("input_file_id")
    if not isinstance(file_id, str):
        raise InvalidRequest("input_file_id is required", param="input_file_id")
    input_file = get_scoped(session, File, tenant_id, id=file_id)
    if input_file is None:
        raise file_not_found(file_id)
    if input_file.purpose != INPUT_PURPOSE:
        raise InvalidRequest(
            f"the file {file_id} has purpose {input_file.purpose!r}, not {INPUT_PURPOSE!r}",
            param="input_file_id",
        )
    now = datetime.now(UTC)
    batch = Batch(
        tenant_id=tenant_id,
        api_key_id=api_key_id,
        endpoint=endpoint,
        input_file_id=file_id,
        completion_window=window,
        status="validating",
        total=0,
        completed=0,
        failed=0,
        batch_metadata=metadata,
        created_at=now,
        expires_at=now + COMPLETION_WINDOWS[window],
    )
    session.add(batch)
    session.flush()
    return batch


def get_batch(session: Session, tenant_id: str, batch_id: str) -> Batch:
    batch = get_scoped(session, Batch, tenant_id, id=batch_id)
    if batch is None:
        raise NotFound(f"No such Batch object: {batch_id}", param="batch_id")
    return batch


def batches_query(tenant_id: str) -> Select[Any]:
    return scoped(Batch, tenant_id)


def cancel_batch(session: Session, tenant_id: str, batch_id: str) -> Batch:
    """validating or in_progress become cancelling; the worker then finishes the cancel.

    A conditional update, so a worker moving the batch on at the same moment wins cleanly.
    """
    batch = get_batch(session, tenant_id, batch_id)
    moved = session.execute(
        update(Batch)
        .where(Batch.id == batch.id, Batch.status.in_(CANCELLABLE))
        .values(status="cancelling", cancelling_at=datetime.now(UTC))
        .execution_options(synchronize_session=False)
    )
    session.refresh(batch)
    if moved.rowcount == 0 and batch.status != "cancelling":  # type: ignore[attr-defined]
        raise InvalidRequest(
            f"Cannot cancel a batch with status '{batch.status}': only a validating or "
            "in_progress batch can be cancelled.",
            param="batch_id",
            code="batch_not_cancellable",
        )
    return batch

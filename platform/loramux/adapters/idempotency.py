"""``Idempotency-Key``: a retried create returns the first response and creates nothing twice.

The response is stored in the same transaction as the rows it describes, so a key is
either unused or bound to a committed result; two concurrent first tries both do the
work, one commits, and the other returns the winner's response.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from loramux.db.models import IdempotencyKey
from loramux.errors import Conflict, InvalidRequest

HEADER = "Idempotency-Key"
MAX_KEY_LENGTH = 255


@dataclass(frozen=True, slots=True)
class IdempotentRequest:
    tenant_id: str
    key: str
    method: str
    path: str
    request_sha256: str


def request_sha256(fields: dict[str, Any]) -> str:
    """A digest of what the request asks for, independent of multipart boundaries."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def from_header(
    value: str | None, tenant_id: str, method: str, path: str, fields: dict[str, Any]
) -> IdempotentRequest | None:
    if value is None:
        return None
    if not value or len(value) > MAX_KEY_LENGTH or not value.isprintable():
        raise InvalidRequest(
            f"{HEADER} must be 1 to {MAX_KEY_LENGTH} printable characters", param=HEADER
        )
    return IdempotentRequest(tenant_id, value, method, path, request_sha256(fields))


def replay(session: Session, request: IdempotentRequest) -> tuple[int, dict[str, Any]] | None:
    """The stored response of an earlier identical request, or None if the key is unused."""
    row = session.scalar(
        select(IdempotencyKey).where(
            IdempotencyKey.tenant_id == request.tenant_id, IdempotencyKey.key == request.key
        )
    )
    if row is None or row.response_body is None or row.response_status is None:
        return None
    if (row.method, row.path, row.request_sha256) != (
        request.method,
        request.path,
        request.request_sha256,
    ):
        raise Conflict(
            f"this {HEADER} was already used for a different request; use a new key for a "
            "new request",
            param=HEADER,
            code="idempotency_key_reused",
        )
    return row.response_status, row.response_body


def remember(
    session: Session, request: IdempotentRequest, status: int, body: dict[str, Any]
) -> None:
    """Bind the key to this response; a concurrent duplicate fails the flush (IntegrityError)."""
    session.add(
        IdempotencyKey(
            tenant_id=request.tenant_id,
            key=request.key,
            method=request.method,
            path=request.path,
            request_sha256=request.request_sha256,
            response_status=status,
            response_body=body,
        )
    )
    session.flush()

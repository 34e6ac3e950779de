"""The audit log: every write says who did what to which object, never with a secret."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from loramux.db.models import AuditLog


def record(
    session: Session,
    *,
    actor: str,
    action: str,
    target_type: str,
    target_id: str | None,
    tenant_id: str | None = None,
    details: dict[str, Any] | None = None,
) -> None:
    session.add(
        AuditLog(
            actor=actor,
            action=action,
            target_type=target_type,
            target_id=target_id,
            tenant_id=tenant_id,
            details=details,
        )
    )

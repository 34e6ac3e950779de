"""The one way to read a tenant-owned row.

Every tenant-owned model carries ``tenant_id``; reading through here means another
tenant's object is simply absent (a 404), never a 403 that confirms it exists.
"""

from __future__ import annotations

from typing import Any, TypeVar

from sqlalchemy import Select, select
from sqlalchemy.orm import Session

from loramux.db.models import Adapter, AdapterVersion, Batch, File, UsageRecord

TenantOwned = TypeVar("TenantOwned", Adapter, AdapterVersion, File, Batch, UsageRecord)


def scoped(model: type[TenantOwned], tenant_id: str) -> Select[TenantOwned]:
    """``SELECT`` of ``model`` limited to ``tenant_id``, hiding soft-deleted rows."""
    query = select(model).where(model.tenant_id == tenant_id)
    deleted_at: Any = getattr(model, "deleted_at", None)
    if deleted_at is not None:
        query = query.where(deleted_at.is_(None))
    return query


def get_scoped(
    session: Session, model: type[TenantOwned], tenant_id: str, **filters: Any
) -> TenantOwned | None:
    return session.scalars(scoped(model, tenant_id).filter_by(**filters)).first()

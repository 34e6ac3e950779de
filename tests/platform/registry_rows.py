"""Registry rows written straight to the database, for tests below the HTTP API."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session

from loramux.db.models import Adapter, AdapterVersion, Tenant


def add_tenant(session: Session, name: str) -> Tenant:
    tenant = Tenant(name=name)
    session.add(tenant)
    session.flush()
    return tenant


def add_adapter_version(
    session: Session,
    tenant_id: str,
    name: str,
    sha256: str,
    status: str = "ready",
    created_at: datetime | None = None,
) -> AdapterVersion:
    """Version 1 of a new adapter ``name``, as an upload leaves it (no blobs written)."""
    adapter = Adapter(tenant_id=tenant_id, name=name, base_model_id="smollm2-135m-instruct")
    session.add(adapter)
    session.flush()
    fields: dict[str, Any] = {} if created_at is None else {"created_at": created_at}
    version = AdapterVersion(
        adapter_id=adapter.id,
        tenant_id=tenant_id,
        version=1,
        sha256=sha256,
        size_bytes=1,
        rank=8,
        alpha=16.0,
        target_modules=["q_proj"],
        config_key=f"adapters/{sha256}/adapter_config.json",
        weights_key=f"adapters/{sha256}/adapter_model.safetensors",
        status=status,
        **fields,
    )
    session.add(version)
    session.flush()
    return version

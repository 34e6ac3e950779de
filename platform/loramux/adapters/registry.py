"""Adapter and version rows: tenant-scoped reads, quotas, new versions, soft deletion."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import String, Subquery, func, literal, select, union_all
from sqlalchemy.orm import Session

from loramux import tenancy
from loramux.adapters.config_check import ConfigSummary
from loramux.audit import record
from loramux.db.models import Adapter, AdapterMerge, AdapterVersion, Tenant
from loramux.db.scoped import scoped
from loramux.errors import InvalidRequest, NotFound, PermissionDenied
from loramux.storage import adapter_key
from loramux_engine.lora.files import CONFIG_NAME, WEIGHTS_NAME


def validate_adapter_name(name: Any, base_model_id: str) -> str:
    name = tenancy.validate_name(name)
    if set(name) <= {"."}:
        raise InvalidRequest("name may not be dots only", param="name")
    if name == base_model_id:
        raise InvalidRequest(f"{name!r} is the base model's id; choose another name", param="name")
    return name


def _ts(value: datetime | None) -> int | None:
    return int(value.timestamp()) if value else None


def version_view(adapter: Adapter, version: AdapterVersion) -> dict[str, Any]:
    return {
        "id": version.id,
        "object": "adapter.version",
        "adapter_id": adapter.id,
        "name": adapter.name,
        "version": version.version,
        "status": version.status,
        "reason": version.reason,
        "sha256": version.sha256,
        "size_bytes": version.size_bytes,
        "rank": version.rank,
        "alpha": version.alpha,
        "target_modules": list(version.target_modules),
        "created_at": _ts(version.created_at),
        "ready_at": _ts(version.ready_at),
    }


def adapter_view(session: Session, adapter: Adapter) -> dict[str, Any]:
    """The adapter with its newest version's status and reason, and what ``name`` serves."""
    versions = session.scalars(
        scoped(AdapterVersion, adapter.tenant_id)
        .where(AdapterVersion.adapter_id == adapter.id)
        .order_by(AdapterVersion.version.desc())
    ).all()
    latest = versions[0]
    ready = next((v for v in versions if v.status == "ready"), None)
    return {
        **version_view(adapter, latest),
        "id": adapter.id,
        "object": "adapter",
        "version_id": latest.id,
        "base_model": adapter.base_model_id,
        "ready_version": ready.version if ready else None,
        "num_versions": len(versions),
        "created_at": _ts(adapter.created_at),
    }


def find_adapter(session: Session, tenant_id: str, name: str) -> Adapter:
    adapter = session.scalars(scoped(Adapter, tenant_id).where(Adapter.name == name)).first()
    if adapter is None:
        raise NotFound(f"no adapter named {name!r}", param="name", code="adapter_not_found")
    return adapter


def list_adapters(session: Session, tenant_id: str) -> list[dict[str, Any]]:
    adapters = session.scalars(scoped(Adapter, tenant_id).order_by(Adapter.name))
    return [adapter_view(session, adapter) for adapter in adapters]


def list_versions(session: Session, tenant_id: str, name: str) -> list[dict[str, Any]]:
    adapter = find_adapter(session, tenant_id, name)
    versions = session.scalars(
        scoped(AdapterVersion, tenant_id)
        .where(AdapterVersion.adapter_id == adapter.id)
        .order_by(AdapterVersion.version)
    )
    return [version_view(adapter, version) for version in versions]


def stored_holdings() -> Subquery:
    """Everything that counts as a tenant's stored bytes, one row each: every version of an
    adapter (a rejected one holds none) and every merged export (adapters/merge.py: a failed
    merge holds none; a queued or running one holds its reservation). The quota, the
    admin's summary and the bill (billing.py) all read these rows, so they agree.

    Columns: ``tenant_id``, ``kind`` ("adapter" or "merge"), ``adapter``,
    ``adapter_version``, ``base_model``, ``size_bytes``, ``stored_at`` (when the bytes were
    stored: the upload, or the merge's finish; null while a merge runs) and ``deleted_at``
    (the adapter's deletion, which ends both; null while it lives).
    """
    versions = (
        select(
            AdapterVersion.tenant_id.label("tenant_id"),
            literal("adapter", String(8)).label("kind"),
            Adapter.name.label("adapter"),
            AdapterVersion.version.label("adapter_version"),
            Adapter.base_model_id.label("base_model"),
            AdapterVersion.size_bytes.label("size_bytes"),
            AdapterVersion.created_at.label("stored_at"),
            Adapter.deleted_at.label("deleted_at"),
        )
        .join(Adapter, Adapter.id == AdapterVersion.adapter_id)
        .where(AdapterVersion.status != "rejected")
    )
    merges = (
        select(
            AdapterMerge.tenant_id,
            literal("merge", String(8)),
            Adapter.name,
            AdapterVersion.version,
            AdapterMerge.base_model_id,
            AdapterMerge.size_bytes,
            AdapterMerge.finished_at,
            Adapter.deleted_at,
        )
        .join(AdapterVersion, AdapterVersion.id == AdapterMerge.adapter_version_id)
        .join(Adapter, Adapter.id == AdapterVersion.adapter_id)
        .where(AdapterMerge.status != "failed")
    )
    return union_all(versions, merges).subquery("stored_holdings")


def storage_used_by_tenant(session: Session, tenant_id: str | None = None) -> dict[str, int]:
    """Bytes each tenant stores now (``stored_holdings`` of live adapters); one tenant's, or
    every tenant's with any."""
    held = stored_holdings()
    query = (
        select(held.c.tenant_id, func.coalesce(func.sum(held.c.size_bytes), 0))
        .where(held.c.deleted_at.is_(None))
        .group_by(held.c.tenant_id)
    )
    if tenant_id is not None:
        query = query.where(held.c.tenant_id == tenant_id)
    return {tenant: int(used or 0) for tenant, used in session.execute(query)}


def storage_used(session: Session, tenant_id: str) -> int:
    """The bytes ``max_storage_bytes`` limits: the tenant's live adapters' versions and
    merged exports, reservations included (``stored_holdings``)."""
    return storage_used_by_tenant(session, tenant_id).get(tenant_id, 0)


def check_quotas(session: Session, tenant: Tenant, name: str, size_bytes: int) -> None:
    """``max_adapters`` counts names (a new version is free); ``max_storage_bytes`` bytes."""
    is_new = (
        session.scalar(
            scoped(Adapter, tenant.id).where(Adapter.name == name).with_only_columns(Adapter.id)
        )
        is None
    )
    if is_new and tenant.max_adapters is not None:
        count = session.scalar(
            select(func.count()).select_from(scoped(Adapter, tenant.id).subquery())
        )
        if (count or 0) >= tenant.max_adapters:
            raise PermissionDenied(
                f"this tenant already has {count} adapters, its limit (max_adapters="
                f"{tenant.max_adapters}); delete one or ask the operator to raise it",
                code="adapter_quota_exceeded",
            )
    if tenant.max_storage_bytes is not None:
        used = storage_used(session, tenant.id)
        if used + size_bytes > tenant.max_storage_bytes:
            raise PermissionDenied(
                f"this upload of {size_bytes} bytes would bring the tenant's adapter storage to "
                f"{used + size_bytes} bytes, over its limit (max_storage_bytes="
                f"{tenant.max_storage_bytes})",
                code="storage_quota_exceeded",
            )


def lock_tenant(session: Session, tenant_id: str) -> Tenant:
    """The tenant row, locked until commit, so concurrent uploads check quotas in turn."""
    tenant = session.scalar(select(Tenant).where(Tenant.id == tenant_id).with_for_update())
    if tenant is None:
        raise NotFound("tenant not found")
    return tenant


def create_version(
    session: Session,
    tenant: Tenant,
    *,
    name: str,
    base_model_id: str,
    sha256: str,
    size_bytes: int,
    summary: ConfigSummary,
    actor: str,
) -> tuple[Adapter, AdapterVersion]:
    """Version N+1 of ``name`` (creating the adapter at 1), in ``validating``."""
    check_quotas(session, tenant, name, size_bytes)
    adapter = session.scalars(scoped(Adapter, tenant.id).where(Adapter.name == name)).first()
    if adapter is None:
        adapter = Adapter(tenant_id=tenant.id, name=name, base_model_id=base_model_id)
        session.add(adapter)
        session.flush()
    newest = session.scalar(
        select(func.max(AdapterVersion.version)).where(AdapterVersion.adapter_id == adapter.id)
    )
    version = AdapterVersion(
        adapter_id=adapter.id,
        tenant_id=tenant.id,
        version=(newest or 0) + 1,
        sha256=sha256,
        size_bytes=size_bytes,
        rank=summary.rank,
        alpha=summary.alpha,
        target_modules=summary.target_modules,
        config_key=adapter_key(sha256, CONFIG_NAME),
        weights_key=adapter_key(sha256, WEIGHTS_NAME),
        status="validating",
    )
    session.add(version)
    session.flush()
    record(
        session,
        actor=actor,
        action="adapter.upload",
        target_type="adapter_version",
        target_id=version.id,
        tenant_id=tenant.id,
        details={"name": name, "version": version.version, "sha256": sha256},
    )
    session.refresh(adapter)
    session.refresh(version)
    return adapter, version


def delete_adapter(
    session: Session, tenant_id: str, name: str, *, actor: str
) -> tuple[Adapter, list[AdapterVersion]]:
    """Hide the adapter at once; its blobs go when the cleanup task finds them unreferenced."""
    adapter = find_adapter(session, tenant_id, name)
    adapter.deleted_at = datetime.now(UTC)
    versions = list(
        session.scalars(
            scoped(AdapterVersion, tenant_id).where(AdapterVersion.adapter_id == adapter.id)
        )
    )
    record(
        session,
        actor=actor,
        action="adapter.delete",
        target_type="adapter",
        target_id=adapter.id,
        tenant_id=tenant_id,
        details={"name": name, "versions": [v.version for v in versions]},
    )
    session.flush()
    return adapter, versions

"""Tenants, quotas and keys: the writes shared by the admin API and the CLI."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from loramux.audit import record
from loramux.auth.keys import TENANT_DEFAULT_SCOPES, generate_key, invalid_scopes
from loramux.db.models import ApiKey, Tenant
from loramux.errors import Conflict, InvalidRequest, NotFound
from loramux.names import name_problem

QUOTA_FIELDS = (
    "requests_per_minute",
    "tokens_per_minute",
    "max_concurrent_requests",
    "monthly_token_quota",
    "max_adapters",
    "max_storage_bytes",
)
TENANT_STATUSES = ("active", "suspended")


def validate_name(name: str, *, param: str = "name") -> str:
    problem = name_problem(name)
    if problem is not None:
        raise InvalidRequest(problem, param=param)
    return name


def validate_quotas(values: dict[str, Any]) -> dict[str, int | None]:
    quotas: dict[str, int | None] = {}
    for field in QUOTA_FIELDS:
        if field not in values:
            continue
        value = values[field]
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 0
        ):
            raise InvalidRequest(f"{field} must be a non-negative integer or null", param=field)
        quotas[field] = value
    return quotas


def tenant_view(tenant: Tenant) -> dict[str, Any]:
    return {
        "id": tenant.id,
        "object": "tenant",
        "name": tenant.name,
        "status": tenant.status,
        **{field: getattr(tenant, field) for field in QUOTA_FIELDS},
        "created_at": int(tenant.created_at.timestamp()) if tenant.created_at else None,
    }


def key_view(key: ApiKey) -> dict[str, Any]:
    def ts(value: datetime | None) -> int | None:
        return int(value.timestamp()) if value else None

    return {
        "id": key.id,
        "object": "api_key",
        "name": key.name,
        "prefix": key.prefix,
        "tenant_id": key.tenant_id,
        "scopes": list(key.scopes),
        "created_at": ts(key.created_at),
        "last_used_at": ts(key.last_used_at),
        "revoked_at": ts(key.revoked_at),
        "expires_at": ts(key.expires_at),
    }


def create_tenant(session: Session, name: str, quotas: dict[str, Any], *, actor: str) -> Tenant:
    validate_name(name)
    if session.scalar(select(Tenant.id).where(Tenant.name == name)) is not None:
        raise Conflict(f"a tenant named {name!r} already exists", param="name")
    tenant = Tenant(name=name, status="active", **validate_quotas(quotas))
    session.add(tenant)
    try:
        session.flush()
    except IntegrityError as error:  # a concurrent create of the same name
        raise Conflict(f"a tenant named {name!r} already exists", param="name") from error
    record(
        session,
        actor=actor,
        action="tenant.create",
        target_type="tenant",
        target_id=tenant.id,
        tenant_id=tenant.id,
        details={"name": name},
    )
    session.refresh(tenant)
    return tenant


def get_tenant(session: Session, id_or_name: str) -> Tenant:
    tenant = session.get(Tenant, id_or_name) or session.scalar(
        select(Tenant).where(Tenant.name == id_or_name)
    )
    if tenant is None:
        raise NotFound(f"no tenant {id_or_name!r}", param="tenant")
    return tenant


def update_tenant(
    session: Session, tenant: Tenant, changes: dict[str, Any], *, actor: str
) -> Tenant:
    unknown = sorted(set(changes) - set(QUOTA_FIELDS) - {"status"})
    if unknown:
        raise InvalidRequest(f"unknown field {unknown[0]!r}", param=unknown[0])
    quotas = validate_quotas(changes)
    if "status" in changes and changes["status"] not in TENANT_STATUSES:
        raise InvalidRequest("status must be 'active' or 'suspended'", param="status")
    for field, value in quotas.items():
        setattr(tenant, field, value)
    if "status" in changes:
        tenant.status = changes["status"]
    session.flush()
    record(
        session,
        actor=actor,
        action="tenant.update",
        target_type="tenant",
        target_id=tenant.id,
        tenant_id=tenant.id,
        details=changes,
    )
    session.refresh(tenant)
    return tenant


def create_key(
    session: Session,
    tenant: Tenant | None,
    *,
    name: str,
    scopes: list[str] | None,
    actor: str,
    expires_at: datetime | None = None,
) -> tuple[ApiKey, str]:
    """Create a key and return it with its secret, which is never stored nor shown again."""
    validate_name(name)
    if scopes is None:
        scopes = list(TENANT_DEFAULT_SCOPES) if tenant else ["admin"]
    if not isinstance(scopes, list) or not all(isinstance(s, str) for s in scopes) or not scopes:
        raise InvalidRequest("scopes must be a non-empty list of strings", param="scopes")
    bad = invalid_scopes(scopes)
    if bad:
        raise InvalidRequest(f"unknown scope {bad[0]!r}", param="scopes", code="invalid_scope")
    if tenant is not None and "admin" in scopes:
        raise InvalidRequest("tenant keys cannot hold the admin scope", param="scopes")
    material = generate_key()
    key = ApiKey(
        tenant_id=tenant.id if tenant else None,
        name=name,
        prefix=material.prefix,
        secret_sha256=material.secret_sha256,
        scopes=sorted(set(scopes)),
        expires_at=expires_at,
    )
    session.add(key)
    session.flush()
    record(
        session,
        actor=actor,
        action="key.create",
        target_type="api_key",
        target_id=key.id,
        tenant_id=key.tenant_id,
        details={"name": name, "scopes": key.scopes},
    )
    session.refresh(key)
    return key, material.secret


def revoke_key(session: Session, key_id: str, *, actor: str) -> ApiKey:
    key = session.get(ApiKey, key_id)
    if key is None:
        raise NotFound(f"no API key {key_id!r}", param="id")
    if key.revoked_at is None:
        key.revoked_at = datetime.now(UTC)
        record(
            session,
            actor=actor,
            action="key.revoke",
            target_type="api_key",
            target_id=key.id,
            tenant_id=key.tenant_id,
        )
    session.flush()
    return key

"""Registry tables. The schema changes only through an Alembic migration.

Every timestamp is a ``UTCDateTime``: aware UTC in Python on PostgreSQL and SQLite alike.
"""

from __future__ import annotations

import secrets
from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from loramux.db.types import UTCDateTime, utc_now
from loramux.names import NAME_MAX


def new_id(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(12)}"


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[str]: JSON}


def _stamped(**kwargs: Any) -> Mapped[datetime]:
    """A timestamp set when the row is written. ``server_default`` serves raw SQL only; the
    app's inserts stamp ``utc_now()``, the one text form SQLite compares correctly."""
    return mapped_column(UTCDateTime(), default=utc_now(), server_default=func.now(), **kwargs)


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("ten_"))
    name: Mapped[str] = mapped_column(String(NAME_MAX), unique=True)
    status: Mapped[str] = mapped_column(String(16), server_default="active")
    requests_per_minute: Mapped[int | None] = mapped_column(Integer)
    tokens_per_minute: Mapped[int | None] = mapped_column(Integer)
    max_concurrent_requests: Mapped[int | None] = mapped_column(Integer)
    monthly_token_quota: Mapped[int | None] = mapped_column(BigInteger)
    max_adapters: Mapped[int | None] = mapped_column(Integer)
    max_storage_bytes: Mapped[int | None] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = _stamped()
    updated_at: Mapped[datetime] = _stamped(onupdate=utc_now())


class ApiKey(Base):
    """A tenant key, or an admin key when ``tenant_id`` is null and scopes hold ``admin``."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("key_"))
    tenant_id: Mapped[str | None] = mapped_column(
        ForeignKey("tenants.id", ondelete="CASCADE"), index=True
    )
    name: Mapped[str] = mapped_column(String(NAME_MAX))
    prefix: Mapped[str] = mapped_column(String(16), index=True)
    secret_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    scopes: Mapped[list[str]] = mapped_column(JSON)
    created_at: Mapped[datetime] = _stamped()
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class BaseModel(Base):
    __tablename__ = "base_models"

    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64))
    architecture: Mapped[str] = mapped_column(String(64))
    config: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = _stamped()


class Adapter(Base):
    __tablename__ = "adapters"
    __table_args__ = (
        # One live adapter per name in a tenant; soft-deleted rows keep their name.
        Index(
            "uq_adapters_tenant_name_live",
            "tenant_id",
            "name",
            unique=True,
            sqlite_where=text("deleted_at IS NULL"),
            postgresql_where=text("deleted_at IS NULL"),
        ),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("ad_"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(NAME_MAX))
    base_model_id: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = _stamped()
    deleted_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class AdapterVersion(Base):
    """Immutable once ready: weights under a live id never change.

    While ``validating``, the row is the validation's outbox (adapters/outbox.py): its
    message has been published ``validation_attempts`` times, and the dispatcher acts on
    it again at ``validation_due_at`` (null: at once).
    """

    __tablename__ = "adapter_versions"
    __table_args__ = (
        UniqueConstraint("adapter_id", "version"),
        # The dispatcher's scan: only the versions still validating.
        Index(
            "ix_adapter_versions_validating_due",
            "validation_due_at",
            sqlite_where=text("status = 'validating'"),
            postgresql_where=text("status = 'validating'"),
        ),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("adv_"))
    adapter_id: Mapped[str] = mapped_column(
        ForeignKey("adapters.id", ondelete="CASCADE"), index=True
    )
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    version: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    rank: Mapped[int] = mapped_column(Integer)
    alpha: Mapped[float] = mapped_column()
    target_modules: Mapped[list[str]] = mapped_column(JSON)
    config_key: Mapped[str] = mapped_column(String(255))
    weights_key: Mapped[str] = mapped_column(String(255))
    status: Mapped[str] = mapped_column(String(16), server_default="uploading")
    reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = _stamped()
    ready_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    validation_attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    validation_due_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class AdapterMerge(Base):
    """A merge job: one adapter version folded into the base model (adapters/merge_job.py).

    One per version and base model; a second request returns it. While ``queued`` or
    ``running`` the row is the job's outbox, as a validating version is
    (adapters/outbox.py): its message went out ``attempts`` times, and the dispatcher
    acts again at ``due_at``. ``size_bytes`` counts against the tenant's storage quota: the
    export's size once succeeded, the estimate reserved before, 0 once failed.
    """

    __tablename__ = "adapter_merges"
    __table_args__ = (
        UniqueConstraint("adapter_version_id", "base_model_id"),
        Index(
            "ix_adapter_merges_pending_due",
            "due_at",
            sqlite_where=text("status IN ('queued', 'running')"),
            postgresql_where=text("status IN ('queued', 'running')"),
        ),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("mrg_"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    adapter_version_id: Mapped[str] = mapped_column(
        ForeignKey("adapter_versions.id", ondelete="CASCADE")
    )
    base_model_id: Mapped[str] = mapped_column(String(128))
    status: Mapped[str] = mapped_column(String(16), server_default="queued")
    progress: Mapped[float] = mapped_column(default=0.0, server_default="0")
    error: Mapped[str | None] = mapped_column(Text)
    # The export's content address: merges/<sha256>/<file name> in storage.
    sha256: Mapped[str | None] = mapped_column(String(64), index=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    # [{"name", "size_bytes", "sha256"}] once succeeded.
    files: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON)
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    due_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    created_at: Mapped[datetime] = _stamped()
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class AdapterUpload(Base):
    """An adapter upload in flight; while pending and unexpired it leases its blobs.

    The cleanup task deletes no blob a pending upload names, so blobs stored before the
    registry commit are safe until ``expires_at``. Direct uploads delete their row at
    commit; presigned ones keep it (``completed``) so a retried complete is idempotent.
    """

    __tablename__ = "adapter_uploads"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("upl_"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(NAME_MAX))
    kind: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), server_default="pending")
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    config_text: Mapped[str | None] = mapped_column(Text)
    weights_bytes: Mapped[int] = mapped_column(BigInteger)
    weights_sha256: Mapped[str] = mapped_column(String(64))
    staging_key: Mapped[str | None] = mapped_column(String(255))
    version_id: Mapped[str | None] = mapped_column(String(40))
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())
    created_at: Mapped[datetime] = _stamped()


class File(Base):
    """An OpenAI Files API object; the blob lives at ``storage_key``."""

    __tablename__ = "files"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("file-"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    filename: Mapped[str] = mapped_column(String(255))
    purpose: Mapped[str] = mapped_column(String(32))
    bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    storage_key: Mapped[str] = mapped_column(String(255))
    line_count: Mapped[int | None] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16), server_default="processed")
    created_at: Mapped[datetime] = _stamped()
    deleted_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class Batch(Base):
    """An OpenAI Batch API object with its lifecycle timestamps."""

    __tablename__ = "batches"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("batch_"))
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    api_key_id: Mapped[str | None] = mapped_column(String(40))
    endpoint: Mapped[str] = mapped_column(String(64))
    input_file_id: Mapped[str] = mapped_column(ForeignKey("files.id"))
    output_file_id: Mapped[str | None] = mapped_column(String(40))
    error_file_id: Mapped[str | None] = mapped_column(String(40))
    completion_window: Mapped[str] = mapped_column(String(16), server_default="24h")
    status: Mapped[str] = mapped_column(String(16), server_default="validating")
    total: Mapped[int] = mapped_column(Integer, server_default="0")
    completed: Mapped[int] = mapped_column(Integer, server_default="0")
    failed: Mapped[int] = mapped_column(Integer, server_default="0")
    batch_metadata: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSON)
    errors: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = _stamped()
    in_progress_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    finalizing_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    failed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    expired_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    cancelling_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    cancelled_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # The worker running the batch renews this lease; a run finding another's live lease
    # leaves the batch alone, and an expired one means its worker died.
    lease_owner: Mapped[str | None] = mapped_column(String(64))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class BatchLine(Base):
    """One finished line of a batch, staged in the transaction that bills it.

    Unique per (batch, line): a redelivered task skips staged lines, and a line run twice
    by overlapping workers commits (and bills) once.
    """

    __tablename__ = "batch_lines"
    __table_args__ = (UniqueConstraint("batch_id", "line_index"),)

    id: Mapped[str] = mapped_column(
        String(40), primary_key=True, default=lambda: new_id("batch_req_")
    )
    batch_id: Mapped[str] = mapped_column(ForeignKey("batches.id", ondelete="CASCADE"))
    line_index: Mapped[int] = mapped_column(Integer)
    custom_id: Mapped[str] = mapped_column(String(64))
    status_code: Mapped[int | None] = mapped_column(Integer)  # None: no response (expired)
    request_id: Mapped[str | None] = mapped_column(String(64))
    body: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = _stamped()


class UsageRecord(Base):
    """One row per request. ``billing_key`` makes a retried batch line bill once."""

    __tablename__ = "usage_records"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    api_key_id: Mapped[str | None] = mapped_column(String(40))
    adapter_version_id: Mapped[str | None] = mapped_column(String(40))
    request_id: Mapped[str] = mapped_column(String(64))
    endpoint: Mapped[str] = mapped_column(String(64))
    billing_key: Mapped[str | None] = mapped_column(String(128), unique=True)
    prompt_tokens: Mapped[int] = mapped_column(Integer, server_default="0")
    completion_tokens: Mapped[int] = mapped_column(Integer, server_default="0")
    latency_ms: Mapped[int] = mapped_column(Integer, server_default="0")
    status: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[datetime] = _stamped(index=True)


class PriceTable(Base):
    """One version of the operator's price table (billing.py), in force from ``effective_at``
    until the next version's; old versions stay so past usage keeps its prices."""

    __tablename__ = "price_tables"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    prices: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_by: Mapped[str] = mapped_column(String(128))
    effective_at: Mapped[datetime] = _stamped(index=True)


class AuditLog(Base):
    """Who did what to which object. Never holds a secret."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    actor: Mapped[str] = mapped_column(String(128))
    action: Mapped[str] = mapped_column(String(64))
    target_type: Mapped[str] = mapped_column(String(32))
    target_id: Mapped[str | None] = mapped_column(String(64))
    tenant_id: Mapped[str | None] = mapped_column(String(40), index=True)
    details: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = _stamped(index=True)


class IdempotencyKey(Base):
    __tablename__ = "idempotency_keys"
    __table_args__ = (UniqueConstraint("tenant_id", "key"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    key: Mapped[str] = mapped_column(String(255))
    method: Mapped[str] = mapped_column(String(8))
    path: Mapped[str] = mapped_column(String(255))
    request_sha256: Mapped[str] = mapped_column(String(64))
    response_status: Mapped[int | None] = mapped_column(Integer)
    response_body: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = _stamped()


__all__ = [
    "Adapter",
    "AdapterMerge",
    "AdapterUpload",
    "AdapterVersion",
    "ApiKey",
    "AuditLog",
    "Base",
    "BaseModel",
    "Batch",
    "BatchLine",
    "File",
    "IdempotencyKey",
    "PriceTable",
    "Tenant",
    "UsageRecord",
]

"""sqlite timestamps in one text form: CURRENT_TIMESTAMP's stamps gain six fractional digits

SQLite compares timestamps as text. Rows stamped by ``CURRENT_TIMESTAMP`` read
``YYYY-MM-DD HH:MM:SS`` while SQLAlchemy binds ``YYYY-MM-DD HH:MM:SS.ffffff``, so a row
sorted before a bound value of its own instant (list pages repeated rows). New rows are
stamped in the bound form (``loramux.db.types.utc_now``); this rewrites the old ones.
PostgreSQL stores instants, not text: nothing to do there. The schema is unchanged.

Revision ID: 5d0b6c1e9a27
Revises: c03ed55877ce
Create Date: 2026-12-03 07:55:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "5d0b6c1e9a27"
down_revision: str | None = "c03ed55877ce"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Every timestamp column at this revision (all UTCDateTime in the models).
TIMESTAMPS = {
    "tenants": ("created_at", "updated_at"),
    "api_keys": ("created_at", "last_used_at", "revoked_at", "expires_at"),
    "base_models": ("created_at",),
    "adapters": ("created_at", "deleted_at"),
    "adapter_versions": ("created_at", "ready_at"),
    "adapter_uploads": ("expires_at", "created_at"),
    "files": ("created_at", "deleted_at"),
    "batches": (
        "created_at",
        "in_progress_at",
        "finalizing_at",
        "completed_at",
        "failed_at",
        "expired_at",
        "cancelling_at",
        "cancelled_at",
        "expires_at",
        "lease_expires_at",
    ),
    "batch_lines": ("created_at",),
    "usage_records": ("created_at",),
    "audit_log": ("created_at",),
    "idempotency_keys": ("created_at",),
}
SHORT_FORM_LENGTH = len("2026-01-31 12:00:00")


def upgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    for table, columns in TIMESTAMPS.items():
        for column in columns:
            op.execute(
                f"UPDATE {table} SET {column} = strftime('%Y-%m-%d %H:%M:%f000', {column}) "
                f"WHERE length({column}) = {SHORT_FORM_LENGTH}"
            )


def downgrade() -> None:
    # The long form reads back as the same instant under the old code: nothing to undo.
    pass

"""adapter merges: merge jobs, each one adapter version folded into the base model

One row per (adapter version, base model), its own outbox while queued or running
(adapters/merge_outbox.py), and the export's content address, files and size once done.

Revision ID: c4d2b7e9f013
Revises: a7c3e9d41b52
Create Date: 2026-12-03 15:00:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "c4d2b7e9f013"
down_revision: str | None = "a7c3e9d41b52"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

PENDING = sa.text("status IN ('queued', 'running')")


def upgrade() -> None:
    op.create_table(
        "adapter_merges",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("tenant_id", sa.String(length=40), nullable=False),
        sa.Column("adapter_version_id", sa.String(length=40), nullable=False),
        sa.Column("base_model_id", sa.String(length=128), nullable=False),
        sa.Column("status", sa.String(length=16), server_default="queued", nullable=False),
        sa.Column("progress", sa.Double(), server_default="0", nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("sha256", sa.String(length=64), nullable=True),
        sa.Column("size_bytes", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("files", sa.JSON(), nullable=True),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("due_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["adapter_version_id"], ["adapter_versions.id"], ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("adapter_version_id", "base_model_id"),
    )
    with op.batch_alter_table("adapter_merges", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_adapter_merges_sha256"), ["sha256"], unique=False)
        batch_op.create_index(
            batch_op.f("ix_adapter_merges_tenant_id"), ["tenant_id"], unique=False
        )
        batch_op.create_index(
            "ix_adapter_merges_pending_due",
            ["due_at"],
            unique=False,
            sqlite_where=PENDING,
            postgresql_where=PENDING,
        )


def downgrade() -> None:
    with op.batch_alter_table("adapter_merges", schema=None) as batch_op:
        batch_op.drop_index(
            "ix_adapter_merges_pending_due", sqlite_where=PENDING, postgresql_where=PENDING
        )
        batch_op.drop_index(batch_op.f("ix_adapter_merges_tenant_id"))
        batch_op.drop_index(batch_op.f("ix_adapter_merges_sha256"))
    op.drop_table("adapter_merges")

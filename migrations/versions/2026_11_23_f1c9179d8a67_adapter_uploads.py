"""adapter uploads: uploads in flight, which lease their blobs against cleanup

Revision ID: f1c9179d8a67
Revises: bae0051a3934
Create Date: 2026-11-23 18:32:03.986803
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "f1c9179d8a67"
down_revision: str | None = "bae0051a3934"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "adapter_uploads",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("tenant_id", sa.String(length=40), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("status", sa.String(length=16), server_default="pending", nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("config_text", sa.Text(), nullable=True),
        sa.Column("weights_bytes", sa.BigInteger(), nullable=False),
        sa.Column("weights_sha256", sa.String(length=64), nullable=False),
        sa.Column("staging_key", sa.String(length=255), nullable=True),
        sa.Column("version_id", sa.String(length=40), nullable=True),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("adapter_uploads", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_adapter_uploads_sha256"), ["sha256"], unique=False)
        batch_op.create_index(
            batch_op.f("ix_adapter_uploads_tenant_id"), ["tenant_id"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("adapter_uploads", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_adapter_uploads_tenant_id"))
        batch_op.drop_index(batch_op.f("ix_adapter_uploads_sha256"))
    op.drop_table("adapter_uploads")

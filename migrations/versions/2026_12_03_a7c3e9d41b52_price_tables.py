"""price tables: the operator's prices, one row per version, in force from effective_at

Revision ID: a7c3e9d41b52
Revises: 8e4f08cb0f2c
Create Date: 2026-12-03 14:30:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "a7c3e9d41b52"
down_revision: str | None = "8e4f08cb0f2c"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "price_tables",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("prices", sa.JSON(), nullable=False),
        sa.Column("created_by", sa.String(length=128), nullable=False),
        sa.Column(
            "effective_at",
            sa.DateTime(timezone=True),
            server_default=sa.func.now(),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("price_tables", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_price_tables_effective_at"), ["effective_at"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("price_tables", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_price_tables_effective_at"))
    op.drop_table("price_tables")

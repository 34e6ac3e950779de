"""validation outbox on adapter versions: attempts published, and when the next one is due

A version committed ``validating`` carries its validation message in its own row: the
dispatcher (adapters/outbox.py) publishes it, counts the attempts, and acts again at
``validation_due_at``. Versions already validating become due at once (attempts 0, no due
time), so the first start after this upgrade publishes them.

Revision ID: 8e4f08cb0f2c
Revises: 5d0b6c1e9a27
Create Date: 2026-12-03 11:40:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "8e4f08cb0f2c"
down_revision: str | None = "5d0b6c1e9a27"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

VALIDATING = sa.text("status = 'validating'")


def upgrade() -> None:
    with op.batch_alter_table("adapter_versions", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("validation_attempts", sa.Integer(), server_default="0", nullable=False)
        )
        batch_op.add_column(
            sa.Column("validation_due_at", sa.DateTime(timezone=True), nullable=True)
        )
        batch_op.create_index(
            "ix_adapter_versions_validating_due",
            ["validation_due_at"],
            unique=False,
            sqlite_where=VALIDATING,
            postgresql_where=VALIDATING,
        )


def downgrade() -> None:
    with op.batch_alter_table("adapter_versions", schema=None) as batch_op:
        batch_op.drop_index(
            "ix_adapter_versions_validating_due",
            sqlite_where=VALIDATING,
            postgresql_where=VALIDATING,
        )
        batch_op.drop_column("validation_due_at")
        batch_op.drop_column("validation_attempts")

"""an index for the operator's list of failing deliveries

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-29 15:00:00

The admin area lists failed and retrying deliveries newest first. Without an index that walk read
every delivery ever made; this partial index holds only failed and retrying ones, in id order.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

FAILING = "state IN ('failed', 'retrying')"


def upgrade() -> None:
    op.create_index(
        "ix_deliveries_failing",
        "deliveries",
        ["id"],
        unique=False,
        sqlite_where=sa.text(FAILING),
        postgresql_where=sa.text(FAILING),
    )


def downgrade() -> None:
    op.drop_index("ix_deliveries_failing", table_name="deliveries")

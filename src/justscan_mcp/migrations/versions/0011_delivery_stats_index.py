"""an index for a webhook's statistics

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-29 18:50:00

get_webhook_stats counts one webhook's deliveries created since a time, by state and hour: the
index (webhook_id, created_at, state) answers it from the index alone on SQLite (and on
PostgreSQL once the visibility map is current), however big the table.
"""

from __future__ import annotations

from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index(
        "ix_deliveries_webhook_created", "deliveries", ["webhook_id", "created_at", "state"], unique=False
    )


def downgrade() -> None:
    op.drop_index("ix_deliveries_webhook_created", table_name="deliveries")

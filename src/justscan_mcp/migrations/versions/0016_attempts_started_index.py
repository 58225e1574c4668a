"""attempts by start time, for `justscan-mcp status`, the admin overview and /metrics

Revision ID: 0016
Revises: 0015
Create Date: 2026-11-29 21:00:00
"""

from __future__ import annotations

from alembic import op

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index(
        "ix_delivery_attempts_started",
        "delivery_attempts",
        ["started_at", "outcome", "webhook_id"],
    )


def downgrade() -> None:
    op.drop_index("ix_delivery_attempts_started", table_name="delivery_attempts")

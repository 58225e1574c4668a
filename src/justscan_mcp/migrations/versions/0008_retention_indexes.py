"""indexes for the retention sweep

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-29 16:40:00

The sweep deletes old events that have no delivery left and did not decide a first_scan: both
questions are asked per event, so both foreign keys get an index.
"""

from __future__ import annotations

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_deliveries_event_id", "deliveries", ["event_id"], unique=False)
    op.create_index("ix_first_scans_event_id", "first_scans", ["event_id"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_first_scans_event_id", table_name="first_scans")
    op.drop_index("ix_deliveries_event_id", table_name="deliveries")

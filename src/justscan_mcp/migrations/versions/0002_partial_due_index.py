"""claim index: partial on open deliveries, ordered like the claim

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27 20:45:00

The claim orders due work by (next_attempt_at, id). The old index on (state, next_attempt_at)
served `state IN ('pending', 'retrying')` as two ranges, so every claim sorted the whole backlog:
4 ms per claim with 10,000 queued on SQLite, growing with the queue. A partial index holds only
open deliveries, in claim order, and the claim stops after its LIMIT.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

OPEN = sa.text("state IN ('pending', 'retrying')")


def upgrade() -> None:
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.drop_index("ix_deliveries_due")
        batch_op.create_index(
            "ix_deliveries_open",
            ["next_attempt_at", "id"],
            unique=False,
            sqlite_where=OPEN,
            postgresql_where=OPEN,
        )


def downgrade() -> None:
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.drop_index("ix_deliveries_open")
        batch_op.create_index("ix_deliveries_due", ["state", "next_attempt_at"], unique=False)

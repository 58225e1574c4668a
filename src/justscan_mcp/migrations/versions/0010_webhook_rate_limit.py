"""webhooks get an optional rate limit and the bucket that enforces it

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-29 18:10:00

`rate_limit` is deliveries per second (null: unlimited). `rate_tat` is the bucket's theoretical
arrival time (GCRA) and `rate_open_at` when claims may take from the webhook again; every process
on the database shares them.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("webhooks", schema=None) as batch_op:
        batch_op.add_column(sa.Column("rate_limit", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("rate_tat", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("rate_open_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("webhooks", schema=None) as batch_op:
        batch_op.drop_column("rate_open_at")
        batch_op.drop_column("rate_tat")
        batch_op.drop_column("rate_limit")

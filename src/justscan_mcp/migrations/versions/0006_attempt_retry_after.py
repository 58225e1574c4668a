"""attempts record the Retry-After a receiver asked for

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-29 16:20:00

A 429 or 503 with Retry-After moves the next attempt (at most one hour past the schedule's step);
the attempt log says what the receiver asked, in seconds.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("delivery_attempts", schema=None) as batch_op:
        batch_op.add_column(sa.Column("retry_after_seconds", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("delivery_attempts", schema=None) as batch_op:
        batch_op.drop_column("retry_after_seconds")
